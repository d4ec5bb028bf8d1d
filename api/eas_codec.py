"""Decoding EAS ChatLLM requests and encoding replies; shared by HTTP and WebSocket."""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from pydantic import ValidationError

from api import jsonsafe
from api.errors import APIError, from_validation_error
from api.schemas import EASChatRequest
from chat import ChatEvent


def parse_body(raw: bytes, content_type: Optional[str], json_expected: bool = False, max_depth: int = 32) -> dict[str, Any]:
    """A JSON object is a request whatever its label; other text is the prompt.

    Where JSON is expected (a JSON content type, a WebSocket frame), JSON that is
    not an object is an error rather than a prompt.
    """
    if not raw.strip():
        raise APIError(400, "empty request body: send the prompt as text, or a JSON object", param="prompt")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "request body is not valid UTF-8 text", param="body") from None
    declared_json = bool(content_type) and "json" in content_type.lower()
    try:
        obj = jsonsafe.loads(text, max_depth)
    except jsonsafe.JSONRejected as exc:
        raise APIError(400, str(exc), param="body", code="invalid_json") from None
    except json.JSONDecodeError as exc:
        if declared_json or text.lstrip()[:1] in ("{", "["):
            raise APIError(
                400, f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", param="body"
            ) from None
        return {"prompt": text}
    if isinstance(obj, dict):
        return obj
    if declared_json or json_expected:
        raise APIError(400, f"the JSON body must be an object, not {_json_kind(obj)}", param="body")
    return {"prompt": text}


def _json_kind(obj: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(obj), "a number")


def validate(fields: dict[str, Any]) -> EASChatRequest:
    try:
        return EASChatRequest.model_validate(fields)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def require_prompt(request: EASChatRequest) -> None:
    if not request.prompt.strip():
        raise APIError(400, "prompt: must not be empty", param="prompt")


def reply_history(history: Sequence[Sequence[str]], prompt: str, answer: str) -> list[list[str]]:
    return [list(pair) for pair in history] + [[prompt, answer]]


def reply_object(event: ChatEvent, request: EASChatRequest, history: Optional[Sequence] = None, full_history: bool = True) -> dict:
    """The reply JSON; cumulative `response`, usage and finish_reason once done.

    `history` always ends with the current [prompt, answer] pair; intermediate
    stream frames carry only that pair (`full_history=False`) and the last
    frame the whole conversation, so a long history is sent once, not per token.
    """
    earlier = (request.history if history is None else history) if full_history else ()
    body: dict[str, Any] = {
        "response": event.text,
        "history": reply_history(earlier, request.prompt, event.text),
    }
    if event.done:
        body["usage"] = event.usage.as_dict()
        body["finish_reason"] = event.finish_reason
        if event.sources is not None:
            body["sources"] = event.sources
    return body
