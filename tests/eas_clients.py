"""Clients written the way the product documentation's reference scripts call the service.

They use `requests` and `websocket-client` exactly as those scripts do (JSON
body via `json=`, bare token in `Authorization`, `iter_lines(delimiter=b"\\0")`,
a `WebSocketApp` that sends every frame from `on_open`), so passing tests mean
the documented scripts work against this server with only host and token set.
"""

from __future__ import annotations

import json
import threading
from typing import Iterable, Optional

import requests
import websocket


def post_http_request(
    host: str,
    authorization: str,
    prompt: str,
    system_prompt: str = "Act like you are programmer with 5+ years of experience.",
    history: Optional[list] = None,
    max_new_tokens: int = 2048,
    temperature: float = 0.95,
    top_k: int = 1,
    top_p: float = 0.8,
    langchain: bool = False,
    use_stream_chat: bool = False,
) -> requests.Response:
    headers = {"User-Agent": "Test Client", "Authorization": f"{authorization}"}
    payload = {
        "prompt": prompt,
        "system_prompt": system_prompt,
        "top_k": top_k,
        "top_p": top_p,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "use_stream_chat": use_stream_chat,
        "history": history or [],
    }
    if langchain:
        payload["langchain"] = langchain
    return requests.post(host, headers=headers, json=payload, stream=use_stream_chat, timeout=300)


def get_response(response: requests.Response) -> tuple[str, list]:
    data = json.loads(response.content)
    return data["response"], data["history"]


def get_streaming_response(response: requests.Response) -> Iterable[dict]:
    for chunk in response.iter_lines(chunk_size=8192, decode_unicode=False, delimiter=b"\0"):
        if chunk:
            yield json.loads(chunk.decode("utf-8"))


def run_websocket_conversation(url: str, authorization: str, frames: list[dict], expect_eos: int, timeout: float = 300) -> list[str]:
    """Send every frame on open (as the documented multi-round client does); collect messages until `expect_eos` <EOS>."""
    received: list[str] = []
    eos_count = 0
    done = threading.Event()

    def on_open(ws):
        for frame in frames:
            ws.send(json.dumps(frame, ensure_ascii=False).encode("utf8"))

    def on_message(ws, message):
        nonlocal eos_count
        received.append(message)
        if message == "<EOS>":
            eos_count += 1
            if eos_count == expect_eos:
                done.set()
                ws.close()

    app = websocket.WebSocketApp(
        url,
        on_open=on_open,
        on_message=on_message,
        on_error=lambda ws, err: done.set(),
        on_close=lambda ws, *a: done.set(),
        header=["Authorization: " + authorization],
    )
    thread = threading.Thread(target=app.run_forever, kwargs={"ping_interval": 2}, daemon=True)
    thread.start()
    done.wait(timeout)
    app.close()
    thread.join(timeout=5)
    return received


def split_answers(messages: list[str]) -> list[list[str]]:
    """Group WebSocket messages into one list per <EOS>."""
    answers, current = [], []
    for m in messages:
        if m == "<EOS>":
            answers.append(current)
            current = []
        else:
            current.append(m)
    return answers
