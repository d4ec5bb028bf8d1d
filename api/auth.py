"""Token checks for HTTP routes and WebSocket upgrades (EAS bare token or Bearer)."""

from __future__ import annotations

import hmac
from typing import Optional

from fastapi import Request
from starlette.requests import HTTPConnection

from api.errors import APIError


def token_matches(header: Optional[str], token: str) -> bool:
    if not header:
        return False
    presented = header.strip()
    if presented[:7].lower() == "bearer ":
        presented = presented[7:].strip()
    return hmac.compare_digest(presented.encode(), token.encode())


def check_token(conn: HTTPConnection) -> None:
    token: Optional[str] = conn.app.state.settings.token
    if token and not token_matches(conn.headers.get("authorization"), token):
        missing = not conn.headers.get("authorization")
        raise APIError(
            401,
            "missing Authorization header: send the service token" if missing else "invalid token",
            type_="authentication_error",
            code="invalid_api_key",
        )


async def require_token(request: Request) -> None:
    """FastAPI dependency for HTTP routes."""
    check_token(request)
