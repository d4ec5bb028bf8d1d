"""The OpenAI-compatible stream as it comes over the wire: SSE events up to `[DONE]`, their text, finish
reason and usage, and the message inside an error body."""

from __future__ import annotations

import json
from typing import AsyncIterator, Optional

from engine.remote_errors import EngineUpstreamError
from engine.types import Usage


async def drain(lines: AsyncIterator[str]) -> None:
    async for _ in lines:
        pass


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[dict]:
    """Events up to `[DONE]`; `lines` is left where that was, for the caller to read to its end."""
    async for line in lines:
        if not line.startswith("data:"):
            continue  # comments, keep-alives, event names
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError:
            raise EngineUpstreamError(f"the inference engine sent a stream event that is not JSON: {data[:200]!r}") from None
        if isinstance(event, dict) and "error" in event:
            raise EngineUpstreamError(f"the inference engine failed mid-answer: {message_of(event)}")
        if isinstance(event, dict):
            yield event


def parse_event(event: dict, chat: bool) -> tuple[str, Optional[str], Optional[Usage]]:
    usage = None
    if isinstance(event.get("usage"), dict):
        u = event["usage"]
        details = u.get("prompt_tokens_details") if isinstance(u.get("prompt_tokens_details"), dict) else {}
        usage = Usage(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0),
                      int(details.get("cached_tokens") or 0))
    choices = event.get("choices") or []
    if not choices:
        return "", None, usage
    choice = choices[0]
    delta = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
    return delta or "", choice.get("finish_reason"), usage


def mapped_finish_reason(remote: Optional[str]):
    return "length" if remote == "length" else "stop"


def message_of(body) -> str:
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message") or error.get("detail") or error)[:500]
        if "detail" in body:
            return str(body["detail"])[:500]
        return str(error)[:500]
    return str(body)[:500]


def error_text(content: bytes) -> str:
    try:
        return message_of(json.loads(content))
    except ValueError:
        return content.decode("utf-8", "replace")[:500]
