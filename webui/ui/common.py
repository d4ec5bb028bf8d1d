"""Pieces both tabs share: sampling defaults, history conversion, stream throttling."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

from api.schemas import EASChatRequest
from engine import SamplingParams
from engine.generation_defaults import GenerationDefaults

#: seconds between two screen updates of a streaming answer
STREAM_UPDATE_INTERVAL = 0.08


def text_of(content: Any) -> str:
    """Chatbot message content as plain text (Gradio may hand back a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("value") or "")
    if isinstance(content, (list, tuple)):
        return "".join(text_of(part) for part in content)
    return "" if content is None else str(content)


def is_answer(message: dict) -> bool:
    """Assistant turns that are answers, not the collapsible source/notice blocks under them."""
    return message.get("role") == "assistant" and not (message.get("metadata") or {}).get("title")


def to_pairs(messages: list[dict]) -> list[tuple[str, str]]:
    """Chat window messages -> [user, assistant] pairs for the chat service."""
    pairs: list[tuple[str, str]] = []
    pending: Optional[str] = None
    for message in messages or []:
        if message.get("role") == "user":
            pending = text_of(message.get("content"))
        elif is_answer(message) and pending is not None:
            pairs.append((pending, text_of(message.get("content"))))
            pending = None
    return pairs


def slider_defaults(defaults: GenerationDefaults) -> dict[str, Any]:
    """Where the sliders open: what POST / gives a request that sets nothing, so both surfaces behave alike."""
    params = EASChatRequest().sampling_params(defaults)
    return {name: getattr(params, name) for name in ("max_new_tokens", "temperature", "top_p", "top_k", "do_sample")}


def sampling(max_new_tokens: Any, temperature: Any, top_p: Any, top_k: Any, do_sample: Any) -> SamplingParams:
    """The sliders' values through the API's own schema: a page can be bypassed, the bounds cannot.

    Raises pydantic's ValidationError naming the field, shown in the chat as an error.
    """
    fields = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
              "do_sample": do_sample}
    # sliders hand over floats for integer settings
    for name in ("max_new_tokens", "top_k"):
        if isinstance(fields[name], float) and fields[name].is_integer():
            fields[name] = int(fields[name])
    return EASChatRequest.model_validate(fields).sampling_params()


@dataclass
class Throttle:
    """Lets a screen update through at most every `interval` seconds."""

    interval: float = STREAM_UPDATE_INTERVAL
    _last: float = 0.0

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            return True
        return False


def last_user_turn(messages: list[dict]) -> tuple[list[dict], Optional[str]]:
    """Split off the last user message and everything after it (for Regenerate)."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return messages[:i], text_of(messages[i].get("content"))
    return messages, None
