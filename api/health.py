"""Liveness and readiness for operators and load balancers.

Without the token `/health` says only that the service is alive and ready;
the model, load and knowledge-base names are for those holding the token.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.guard import AUTHENTICATED
from knowledge.store import KnowledgeBaseError

router = APIRouter()


@router.get("/health", summary="Service status (details with the token)")
async def health(request: Request) -> dict:
    state = request.app.state
    history = state.chat.history
    ready = await state.chat.engine.ready()
    status = "unavailable" if not ready else "degraded" if history is not None and history.degraded else "ok"
    if not request.scope.get(AUTHENTICATED, False):
        return {"status": status, "ready": ready}
    return {
        "status": status,
        "ready": ready,
        "model_loaded": True,
        "model": state.chat.model_name,
        "engine": state.chat.engine.health(),
        "auth": bool(state.settings.token),
        "knowledge": await asyncio.to_thread(_knowledge, state.knowledge),
        "history": state.chat.history.health() if state.chat.history is not None else {"enabled": False},
    }


@router.get("/health/live", summary="The process is up")
async def live() -> dict:
    return {"status": "ok"}


@router.get("/health/ready", summary="The model is loaded and requests are served",
            responses={503: {"description": "the inference engine cannot be reached"}})
async def ready(request: Request):
    # the app is built only after the model has loaded; what can still fail is a remote inference engine
    if await request.app.state.chat.engine.ready():
        return {"status": "ok", "ready": True}
    return JSONResponse({"status": "unavailable", "ready": False}, status_code=503, headers={"Retry-After": "5"})


def _knowledge(service) -> dict:
    if service is None:
        return {"enabled": False}
    try:
        bases = service.names()  # asks the catalog once (a Milvus query), not once to check and once to list
    except KnowledgeBaseError as exc:  # a Milvus outage: health still answers, and says so
        return {"enabled": True, "status": "unavailable", "error": str(exc)}
    return {
        "enabled": True,
        "embedding_model": service.embedder.name,
        "dimension": service.embedder.dimension,
        "bases": bases,
        "chunks": service.total_chunks(),
    }
