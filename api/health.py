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
    }
