"""Liveness and readiness for operators and load balancers."""

from __future__ import annotations

from fastapi import APIRouter, Request

router = APIRouter()


@router.get("/health", summary="Model and service status")
async def health(request: Request) -> dict:
    state = request.app.state
    return {
        "status": "ok",
        "ready": True,
        "model_loaded": True,
        "model": state.chat.model_name,
        "engine": state.chat.engine.health(),
        "auth": bool(state.settings.token),
        "knowledge": _knowledge(state.knowledge),
    }


def _knowledge(service) -> dict:
    if service is None:
        return {"enabled": False}
    return {
        "enabled": True,
        "embedding_model": service.embedder.name,
        "dimension": service.embedder.dimension,
        "bases": service.names(),
        "chunks": service.total_chunks(),
    }
