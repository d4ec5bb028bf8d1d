"""The app factory: one FastAPI app, every surface on one port, services on app.state."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Iterable, Optional

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse

from api import eas_http, eas_ws, health, knowledge_api, openai_api
from api.config import ServerConfig
from api.errors import install_error_handlers
from chat import ChatService

if TYPE_CHECKING:
    from knowledge.service import KnowledgeService

#: a part adds itself to the app (a router, a mounted UI); later issues plug in here
AppPart = Callable[[FastAPI], None]


def build_app(
    settings: ServerConfig,
    chat: ChatService,
    knowledge: Optional["KnowledgeService"] = None,
    ui: Optional[AppPart] = None,
    extra_routers: Iterable[APIRouter] = (),
) -> FastAPI:
    app = FastAPI(
        title="ChatLLM-WebUI",
        summary="EAS ChatLLM, OpenAI-compatible and knowledge-base APIs over one shared model runner",
    )
    app.state.settings = settings
    app.state.chat = chat
    app.state.knowledge = knowledge
    app.state.started_at = int(time.time())
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(knowledge_api.router)
    app.include_router(openai_api.router)
    for router in extra_routers:
        app.include_router(router)
    # POST / and the WebSocket at / come before any UI mounted at /, so they win
    app.include_router(eas_http.router)
    app.include_router(eas_ws.router)
    if ui is not None:
        ui(app)
    else:
        app.add_api_route("/", _landing, methods=["GET"], include_in_schema=False)
    return app


async def _landing() -> HTMLResponse:
    return HTMLResponse(
        "<!doctype html><title>ChatLLM-WebUI</title><h1>ChatLLM-WebUI</h1>"
        "<p>The API is up: <code>POST /</code>, WebSocket <code>/</code>, "
        "<a href='/health'>/health</a>, <a href='/docs'>/docs</a>.</p>"
    )
