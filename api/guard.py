"""What every request passes before any route sees it, in one ASGI middleware.

In order: a request id; the `Origin` of browser requests that change state and
of WebSocket upgrades (cross-site request forgery, WebSocket hijacking); the
token or a WebUI session (with a brake on guessing); the body size, from
Content-Length and by counting what arrives, so chunked bodies are bounded
too; JSON nesting and number size. All of it happens before the body is
parsed. Anything a route raises that nothing else handled becomes a JSON 500
that names the request id and nothing of the internals.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional, Union
from urllib.parse import urlsplit

from starlette.requests import cookie_parser

from api import jsonsafe
from api.auth import token_matches
from api.body import too_large
from api.errors import APIError, error_response
from api.sessions import COOKIE, FailureLimiter, SessionSigner

log = logging.getLogger(__name__)

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

# the API's description is no secret; everything it describes is guarded
PUBLIC_PATHS = frozenset({"/health", "/health/live", "/health/ready", "/login", "/logout", "/openapi.json", "/docs",
                          "/redoc"})
API_PREFIXES = ("/v1/", "/api/", "/health", "/openapi.json", "/docs", "/metrics", "/tokenize")
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
REQUEST_ID = "chatllm.request_id"
AUTHENTICATED = "chatllm.authenticated"
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


@dataclass(frozen=True)
class GuardPolicy:
    token: Optional[str]
    max_request_bytes: int
    max_upload_bytes: int
    max_json_depth: int
    allowed_origins: frozenset[str]
    sessions: Optional[SessionSigner]
    failures: FailureLimiter
    body_timeout: float = 60.0
    public_paths: frozenset[str] = PUBLIC_PATHS


class _BodyTooLarge(Exception):
    pass


def _header(scope: Scope, name: bytes) -> Optional[str]:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def _is_upload(method: str, path: str) -> bool:
    if method != "POST":
        return False
    parts = path.split("/")
    return path == "/gradio_api/upload" or (len(parts) == 5 and parts[1:3] == ["api", "knowledge"] and parts[4] == "files")


def _origin_key(scheme: str, host: str, port: Optional[int]) -> tuple[str, int]:
    return host.lower(), port or _DEFAULT_PORTS.get(scheme, 80)


def same_origin(origin: str, host_header: Optional[str]) -> bool:
    """Whether a browser's Origin names the host the request was sent to."""
    try:
        parsed, host = urlsplit(origin), urlsplit("//" + (host_header or ""))
        if not parsed.scheme or not parsed.hostname or not host.hostname:
            return False
        return _origin_key(parsed.scheme, parsed.hostname, parsed.port) == _origin_key(parsed.scheme, host.hostname, host.port)
    except ValueError:  # a malformed port
        return False


class RequestGuard:
    def __init__(self, app, policy: GuardPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    # ---- checks shared by HTTP and WebSocket ------------------------------------------

    def _origin_error(self, scope: Scope) -> Optional[APIError]:
        origin = _header(scope, b"origin")
        if origin is None:
            return None  # not a browser: it cannot be made to send a request by another site
        normalised = origin.strip().rstrip("/").lower()
        if normalised in self.policy.allowed_origins or (normalised != "null" and same_origin(normalised, _header(scope, b"host"))):
            return None
        return APIError(403, f"requests from the web page at {origin[:200]!r} are not allowed; the server's own "
                             "pages and --allowed-origins are", type_="permission_error", param="origin",
                        code="origin_not_allowed")

    def _auth(self, scope: Scope, count_failures: bool = True) -> Optional[APIError]:
        """None when the request may go on: no token set, the right token, or a live WebUI session."""
        token = self.policy.token
        if not token:
            return None
        client = (scope.get("client") or ("?", 0))[0]
        header = _header(scope, b"authorization")
        if header:
            wait = self.policy.failures.retry_after(client)
            if wait and count_failures:
                return APIError(429, f"too many failed attempts from this address; retry in {int(wait) + 1} s",
                                type_="rate_limit_error", code="too_many_auth_failures", retry_after=int(wait) + 1)
            if token_matches(header, token):
                return None
            if count_failures:
                self.policy.failures.record(client)
            return APIError(401, "invalid token", type_="authentication_error", code="invalid_api_key")
        cookie = cookie_parser(_header(scope, b"cookie") or "").get(COOKIE)
        if self.policy.sessions is not None and self.policy.sessions.valid(cookie):
            return None
        return APIError(401, "missing Authorization header: send the service token", type_="authentication_error",
                        code="invalid_api_key")

    # ---- HTTP ---------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = uuid.uuid4().hex[:16]
        scope[REQUEST_ID] = request_id
        method, path = scope["method"], scope["path"]
        started = exceeded = replaced = False
        upload = _is_upload(method, path)
        limit = self.policy.max_upload_bytes if upload else self.policy.max_request_bytes

        async def guarded_send(message: dict) -> None:
            nonlocal started, replaced
            if replaced:
                return  # the route's own answer to an oversized body was swapped for the 413
            if message["type"] == "http.response.start":
                started = True
                if exceeded and message["status"] != 413:
                    # the route caught the size error and made its own answer: the client gets the true one
                    replaced = True
                    await _reply(scope, receive, send, request_id, too_large(limit))
                    return
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", request_id.encode())]}
            await send(message)

        error = self._admission_error(scope, method, path, limit)
        if error == "login":
            await self._redirect(send, request_id, "/login")
            return
        if error is not None:
            await _reply(scope, receive, send, request_id, error)
            return

        if not upload and (_header(scope, b"content-length") or _header(scope, b"transfer-encoding")):
            # small bodies are read whole here, bounded in size and time, and JSON is checked before any route
            try:
                body = await asyncio.wait_for(_read_body(receive, limit), self.policy.body_timeout)
            except _BodyTooLarge:
                await _reply(scope, receive, send, request_id, too_large(limit))
                return
            except asyncio.TimeoutError:
                await _reply(scope, receive, send, request_id, APIError(408, "the request body did not arrive in time", param="body"))
                return
            if body is None:
                return  # the client left
            error = self._json_error(scope, body)
            if error is not None:
                await _reply(scope, receive, send, request_id, error)
                return
            receive = _replay(body, receive)
        else:
            counted, upstream = 0, receive

            async def counting_receive() -> dict:
                nonlocal counted, exceeded
                message = await upstream()
                counted += len(message.get("body", b""))
                if counted > limit:
                    exceeded = True
                    raise _BodyTooLarge()
                return message

            receive = counting_receive  # uploads stream through, and stop at the limit

        try:
            await self.app(scope, receive, guarded_send)
        except Exception as exc:
            if started:
                log.error("request %s failed after its response started: %r", request_id, exc)
                return
            if exceeded:  # raised by the counting receive, whatever the route made of it
                await _reply(scope, receive, send, request_id, too_large(limit))
                return
            log.exception("request %s (%s %s) failed", request_id, method, path)
            await _reply(scope, receive, send, request_id, APIError(
                500, f"internal error: the request could not be completed (request id {request_id})",
                type_="server_error", code="internal_error"))

    def _admission_error(self, scope: Scope, method: str, path: str, limit: int) -> Union[APIError, str, None]:
        """Origin, token or session, and declared size: an error, "login" (send a browser there), or None."""
        if method in UNSAFE_METHODS and (error := self._origin_error(scope)) is not None:
            return error
        if method != "OPTIONS":
            public = path in self.policy.public_paths
            auth_error = self._auth(scope, count_failures=not public)
            scope[AUTHENTICATED] = auth_error is None
            if auth_error is not None and not public:
                wants_page = method == "GET" and "text/html" in (_header(scope, b"accept") or "")
                return "login" if wants_page and not path.startswith(API_PREFIXES) else auth_error
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                return APIError(400, "Content-Length is not a number", param="body")
            if int(declared) > limit:
                return too_large(limit)
        return None

    def _json_error(self, scope: Scope, body: bytes) -> Optional[APIError]:
        content_type = (_header(scope, b"content-type") or "").lower()
        if not body or "json" not in content_type:
            return None
        try:
            jsonsafe.loads(body, self.policy.max_json_depth)
        except jsonsafe.JSONRejected as exc:
            return APIError(400, str(exc), param="body", code="invalid_json")
        except (ValueError, UnicodeDecodeError):
            return None  # malformed JSON: the route says where, in its own protocol's words
        return None

    @staticmethod
    async def _redirect(send: Send, request_id: str, location: str) -> None:
        await send({"type": "http.response.start", "status": 303, "headers": [
            (b"location", location.encode()), (b"content-length", b"0"), (b"x-request-id", request_id.encode())]})
        await send({"type": "http.response.body", "body": b""})

    # ---- WebSocket ------------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = self._origin_error(scope) or self._auth(scope)
        if error is None:
            await self.app(scope, receive, send)
            return
        if (await receive())["type"] != "websocket.connect":
            return
        if "websocket.http.response" in scope.get("extensions", {}):
            payload = json.dumps(error.body(), ensure_ascii=False).encode("utf-8")
            await send({"type": "websocket.http.response.start", "status": error.status,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
            await send({"type": "websocket.http.response.body", "body": payload})
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": error.message[:120]})


async def _reply(scope: Scope, receive: Receive, send: Send, request_id: str, error: APIError) -> None:
    """The service's one JSON error shape, with the request id, answered before any route."""
    await error_response(error, request_id)(scope, receive, send)


async def _read_body(receive: Receive, limit: int) -> Optional[bytes]:
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if len(body) > limit:
            raise _BodyTooLarge()
        if not message.get("more_body"):
            return bytes(body)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body once, then the real channel (so a route still hears the client disconnect)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
