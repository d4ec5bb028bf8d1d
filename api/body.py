"""The one 413 error, for request bodies (checked by the guard) and WebSocket frames."""

from __future__ import annotations

from api.errors import APIError


def too_large(limit: int) -> APIError:
    return APIError(
        413, f"request body is larger than the limit of {limit} bytes", param="body", code="request_too_large"
    )
