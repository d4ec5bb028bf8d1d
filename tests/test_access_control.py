"""Token, session and origin checks come before any body is read, on every route."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from urllib.parse import urlsplit

import pytest
import requests
import websockets

from api.sessions import COOKIE, SessionSigner
from tests.conftest import TOKEN, serve

EVIL = "http://evil.example"


def _raw_response(url: str, request: bytes, wait: float = 5.0) -> bytes:
    """Send raw bytes, return what the server answers within `wait` seconds (b'' if nothing)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=wait) as sock:
        sock.sendall(request)
        try:
            return sock.recv(65536)
        except socket.timeout:
            return b""


def _headers_only(url: str, method: str, path: str, length: int, extra: str = "") -> bytes:
    host = urlsplit(url).netloc
    return (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/knowledge/default/search", "/api/knowledge/default/files",
                                  "/gradio_api/queue/join", "/gradio_api/upload", "/"])
def test_no_token_is_refused_before_a_50_mb_body_arrives(secured_server, path):
    started = time.monotonic()
    answer = _raw_response(secured_server.url, _headers_only(secured_server.url, "POST", path, 50_000_000))
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert time.monotonic() - started < 3
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/api/knowledge/default/search", "/",
                                  "/gradio_api/queue/join"])
def test_oversized_body_is_413_before_it_is_read(server, path):
    answer = _raw_response(server.url, _headers_only(server.url, "POST", path, 50_000_000))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["param"] == "body"


@pytest.mark.parametrize("path,content_type", [
    ("/v1/chat/completions", "application/json"),
    ("/api/knowledge/default/search", "application/json"),
    ("/api/knowledge/default/files", "multipart/form-data; boundary=xyz"),
])
def test_chunked_body_without_length_is_counted(server, path, content_type):
    def chunks():
        yield b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="a.txt"\r\n\r\n'
        for _ in range(600):  # 600 MiB, past every limit (uploads: 20 files of 20 MB): reading must stop
            yield b"x" * (1024 * 1024)

    response = requests.post(server.url + path, data=chunks(), headers={"Content-Type": content_type}, timeout=120)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_health_without_token_says_only_alive(secured_server):
    anonymous = requests.get(secured_server.url + "/health", timeout=10).json()
    assert anonymous == {"status": "ok", "ready": True}
    detailed = requests.get(secured_server.url + "/health", headers=secured_server.headers(), timeout=10).json()
    assert detailed["model"] and "bases" in detailed["knowledge"]
    for path in ("/health/live", "/health/ready"):
        assert requests.get(secured_server.url + path, timeout=10).json()["status"] == "ok"


def test_websocket_from_a_foreign_page_is_refused(server):
    async def attempt(origin):
        async with websockets.connect(server.ws_url, origin=origin) as ws:
            await ws.send(json.dumps({"prompt": "Hi", "max_new_tokens": 1}))
            return await ws.recv()

    with pytest.raises(websockets.exceptions.InvalidStatus) as info:
        asyncio.run(attempt(EVIL))
    assert info.value.response.status_code == 403
    assert json.loads(info.value.response.body)["error"]["code"] == "origin_not_allowed"
    # the page's own origin (same host and port) and clients that send no Origin are fine
    assert asyncio.run(attempt(server.url))
    assert asyncio.run(attempt(None))


def test_cross_site_simple_requests_are_refused(server):
    """A page elsewhere can POST text/plain to / without a CORS preflight; the server refuses it."""
    for path, body in (("/", "Hello"), ("/api/knowledge/default/search", '{"query": "x"}')):
        response = requests.post(server.url + path, data=body, headers={"Content-Type": "text/plain", "Origin": EVIL}, timeout=30)
        assert response.status_code == 403 and response.json()["error"]["code"] == "origin_not_allowed"
    response = requests.delete(server.url + "/api/knowledge/some-base", headers={"Origin": "null"}, timeout=30)
    assert response.status_code == 403
    same = requests.post(server.url, data="Hi", headers={"Origin": server.url, "Content-Type": "text/plain"}, timeout=120,
                         params={}, json=None)
    assert same.status_code == 200


def test_allowed_origins_flag(chat_service):
    for live in serve(chat_service, None, allowed_origins="https://app.example.com, http://tools.local:3000"):
        ok = requests.post(live.url, json={"prompt": "Hi", "max_new_tokens": 1}, headers={"Origin": "https://app.example.com"}, timeout=60)
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example.com"
        assert requests.post(live.url, json={"prompt": "Hi"}, headers={"Origin": EVIL}, timeout=30).status_code == 403


def _login(url: str, password: str) -> requests.Response:
    return requests.post(url + "/login", data={"username": "me", "password": password}, allow_redirects=False, timeout=30)


def test_login_gives_an_expiring_session_cookie(secured_server):
    browser = {"Accept": "text/html"}
    page = requests.get(secured_server.url + "/", headers=browser, allow_redirects=False, timeout=30)
    assert page.status_code == 303 and page.headers["location"] == "/login"
    assert requests.get(secured_server.url + "/config", timeout=30).status_code == 401  # Gradio's own routes too

    wrong = _login(secured_server.url, "nope")
    assert wrong.status_code == 401 and "Incorrect" in wrong.text and COOKIE not in wrong.cookies
    right = _login(secured_server.url, TOKEN)
    assert right.status_code == 303
    cookie = right.cookies[COOKIE]
    set_cookie = right.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=lax" in set_cookie and "max-age=43200" in set_cookie

    session = {COOKIE: cookie}
    assert requests.get(secured_server.url + "/", headers=browser, cookies=session, timeout=30).status_code == 200
    assert requests.get(secured_server.url + "/config", cookies=session, timeout=30).status_code == 200
    # the same session works for the APIs from the page, but not from another site
    assert requests.post(secured_server.url, json={"prompt": "Hi", "max_new_tokens": 1}, cookies=session, timeout=60).status_code == 200
    assert requests.post(secured_server.url, json={"prompt": "Hi"}, cookies=session, headers={"Origin": EVIL}, timeout=30).status_code == 403

    signer = SessionSigner(TOKEN, 3600)
    expired = signer.issue(now=time.time() - 7200)
    tampered = cookie[:-1] + ("0" if cookie[-1] != "0" else "1")
    other_token = SessionSigner("another-token", 3600).issue()
    for bad in (expired, tampered, other_token, "1" * 500):
        assert requests.get(secured_server.url + "/config", cookies={COOKIE: bad}, timeout=30).status_code == 401


def test_failed_logins_and_wrong_tokens_are_rate_limited(chat_service):
    for live in serve(chat_service, TOKEN, max_auth_failures=5):
        for _ in range(5):
            assert _login(live.url, "guess").status_code == 401
        limited = _login(live.url, TOKEN)  # even the right password waits now
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
        api = requests.post(live.url, json={"prompt": "Hi"}, headers={"Authorization": "wrong"}, timeout=30)
        assert api.status_code == 429 and api.json()["error"]["code"] == "too_many_auth_failures"

    for live in serve(chat_service, TOKEN, max_auth_failures=3):
        statuses = [requests.get(live.url + "/v1/models", headers={"Authorization": f"Bearer guess{i}"}, timeout=30).status_code
                    for i in range(5)]
        assert statuses == [401, 401, 401, 429, 429]


@pytest.mark.parametrize("path", ["/v1/nope", "/api/knowledge/..%2Fetc/search", "/api/unknown"])
def test_unknown_api_paths_are_json_404(server, path):
    response = requests.post(server.url + path, json={}, timeout=30)
    assert response.status_code == 404 and response.json()["error"]["code"] == "route_not_found"
