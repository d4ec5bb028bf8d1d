"""`GET /metrics` for Prometheus, and the HTTP middleware that counts every request by route and status.

The token guards `/metrics` like any API route unless `--metrics-public`; a
route is labelled by its template (`/api/history/sessions/{session_id}`), never
by the raw path, so label sets stay bounded whatever clients send.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from metrics.registry import CONTENT_TYPE, Metrics

router = APIRouter(tags=["operations"])


@router.get("/metrics", summary="Prometheus metrics (vLLM's engine metric names, and chatllm_ ones)",
            response_class=Response)
async def metrics(request: Request) -> Response:
    registry: Metrics = request.app.state.metrics
    # a scrape reads every service's state: off the event loop
    return Response(await asyncio.to_thread(registry.exposition), media_type=CONTENT_TYPE)


class HttpMetrics:
    """Outermost ASGI layer: it sees the guard's refusals as well as the routes' answers."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began, status = time.perf_counter(), 500

        async def recording_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None)
            if template is None:
                template = "unmatched"
            elif template in ("", "/") and scope.get("path", "/") != "/":
                template = "/{ui}"  # the page mounted at the root: its assets share one label
            self.metrics.http_finished(scope.get("method", "?"), template, status, time.perf_counter() - began)
