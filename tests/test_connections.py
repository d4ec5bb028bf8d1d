"""Slow, idle and greedy connections cannot hold the server: header timeouts, a connection cap, bounded WebSockets."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from urllib.parse import urlsplit

import pytest
import requests
import websockets

from tests.conftest import serve


@pytest.fixture(scope="module")
def strict_server(chat_service):
    yield from serve(chat_service, None, header_timeout=1.0, ws_idle_timeout=2.0, ws_max_pending=2)


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def test_slow_headers_are_cut_off_and_others_are_served(strict_server):
    slow = []
    for _ in range(30):
        sock = _connect(strict_server.url)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and then nothing more
        slow.append(sock)
    # served while they hang
    assert requests.get(strict_server.url + "/health", timeout=10).status_code == 200
    started = time.monotonic()
    assert all(_closed_by_server(sock, within=5) for sock in slow)
    assert time.monotonic() - started < 6
    for sock in slow:
        sock.close()


def test_a_connection_that_never_sends_anything_is_closed(strict_server):
    with _connect(strict_server.url) as sock:
        assert _closed_by_server(sock, within=5)


def test_endless_headers_are_cut_off(strict_server):
    with _connect(strict_server.url) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(200):
                sock.sendall(b"X-Pad: " + b"a" * 1000 + b"\r\n")
        except (ConnectionResetError, BrokenPipeError):
            pass
        assert _closed_by_server(sock, within=5)


def test_past_the_connection_cap_requests_get_json_503(chat_service):
    for live in serve(chat_service, None, max_connections=10):
        held = [_connect(live.url) for _ in range(10)]
        try:
            time.sleep(0.5)  # let the server accept them all
            response = requests.get(live.url + "/health", timeout=10)
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "too_many_connections" and response.headers["retry-after"]
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.3)
        assert requests.get(live.url + "/health", timeout=10).status_code == 200


def test_an_idle_websocket_is_closed(strict_server):
    async def idle():
        async with websockets.connect(strict_server.ws_url) as ws:
            await ws.send(json.dumps({"prompt": "Hi", "max_new_tokens": 2}))
            replies = []
            while (reply := await ws.recv()) != "<EOS>":
                replies.append(reply)
            started = time.monotonic()
            with pytest.raises(websockets.exceptions.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 15)
            return time.monotonic() - started, replies

    waited, replies = asyncio.run(idle())
    assert replies and 1.5 < waited < 10


def test_a_websocket_that_floods_frames_is_slowed_not_buffered(strict_server):
    """Frames used to be queued without bound in the server's memory, as fast as the client could send them.

    Now the server stops reading once two frames wait; what is left in flight is
    the kernel's socket buffers (up to 32 MiB + 4 MiB on this machine's loopback),
    so 60 MB of frames cannot all be sent.
    """
    frame = json.dumps({"prompt": "Count to ten.", "max_new_tokens": 16, "padding": "x" * 100_000})

    async def flood():
        # no compression: 100 KB of padding must really be 100 KB on the wire
        async with websockets.connect(strict_server.ws_url, max_size=None, compression=None) as ws:
            sent = 0

            async def send_all():
                nonlocal sent
                for _ in range(600):
                    await ws.send(frame)
                    sent += 1

            try:
                await asyncio.wait_for(send_all(), 6)
                return sent, True
            except asyncio.TimeoutError:
                return sent, False

    sent, finished = asyncio.run(flood())
    assert not finished and sent < 500, f"the server took {sent} frames of 100 KB without answering them"
    # the flooding client is gone; others are served
    assert requests.post(strict_server.url, json={"prompt": "Hi", "max_new_tokens": 2}, timeout=60).status_code == 200
