"""The app factory: one FastAPI app, every surface on one port, services on app.state."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Iterable, Optional

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from api import eas_http, eas_ws, health, history_api, knowledge_api, login, metrics_api, openai_api, tokenize
from api.config import ServerConfig
from api.errors import APIError, error_response, install_error_handlers
from api.guard import PUBLIC_PATHS, GuardPolicy, RequestGuard
from api.metrics_api import HttpMetrics
from api.sessions import FailureLimiter, SessionSigner
from chat import ChatService
from metrics.registry import Metrics

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
    metrics: Optional[Metrics] = None,
) -> FastAPI:
    app = FastAPI(
        title="ChatLLM-WebUI",
        summary="EAS ChatLLM, OpenAI-compatible and knowledge-base APIs over one shared model runner",
    )
    app.state.settings = settings
    app.state.chat = chat
    app.state.knowledge = knowledge
    app.state.started_at = int(time.time())
    app.state.sessions = SessionSigner(settings.token, settings.session_hours * 3600) if settings.token else None
    app.state.auth_failures = FailureLimiter(settings.max_auth_failures)
    # the chat service's observer when it is one: then per-request engine histograms are filled too
    metrics = metrics or (chat.observer if isinstance(chat.observer, Metrics) else Metrics(chat.model_name))
    metrics.attach(chat, knowledge)
    app.state.metrics = metrics
    install_error_handlers(app)
    if settings.origins():
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=sorted(settings.origins()), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=True)
    # added last, so it runs first: nothing reaches a route before its checks
    app.add_middleware(RequestGuard, policy=GuardPolicy(
        token=settings.token,
        max_request_bytes=settings.max_request_bytes,
        max_upload_bytes=max(settings.max_request_bytes, _upload_bytes(knowledge)),
        max_json_depth=settings.max_json_depth,
        allowed_origins=settings.origins(),
        sessions=app.state.sessions,
        failures=app.state.auth_failures,
        body_timeout=settings.body_timeout,
        public_paths=PUBLIC_PATHS | ({"/metrics"} if settings.metrics_public else set()),
    ))
    app.add_middleware(HttpMetrics, metrics=metrics)  # outermost: refusals by the guard are counted too
    app.include_router(login.router)
    app.include_router(health.router)
    app.include_router(metrics_api.router)
    app.include_router(knowledge_api.router)
    app.include_router(history_api.router)
    app.include_router(openai_api.router)
    app.include_router(tokenize.router)
    for router in extra_routers:
        app.include_router(router)
    # POST / and the WebSocket at / come before any UI mounted at /, so they win
    app.include_router(eas_http.router)
    app.include_router(eas_ws.router)
    # an unknown API path is a JSON 404 here, not an HTML or differently shaped one from the page
    for prefix in ("/v1", "/api"):
        app.add_api_route(prefix + "/{rest:path}", _no_such_route, include_in_schema=False,
                          methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    if ui is not None:
        ui(app)
    else:
        app.add_api_route("/", _landing, methods=["GET"], include_in_schema=False)
    return app


def _upload_bytes(knowledge: Optional["KnowledgeService"]) -> int:
    """Largest upload body: every allowed file at the size limit, plus multipart framing."""
    if knowledge is None:
        return 0
    return int(knowledge.config.max_upload_mb * 2**20) * knowledge.config.max_upload_files + 64 * 1024


async def _no_such_route(request: Request) -> JSONResponse:
    return error_response(APIError(404, f"no route {request.method} {request.url.path[:200]}", type_="not_found_error",
                                   code="route_not_found"))


async def _landing() -> HTMLResponse:
    return HTMLResponse(
        "<!doctype html><title>ChatLLM-WebUI</title><h1>ChatLLM-WebUI</h1>"
        "<p>The API is up: <code>POST /</code>, WebSocket <code>/</code>, "
        "<a href='/health'>/health</a>, <a href='/docs'>/docs</a>.</p>"
    )
