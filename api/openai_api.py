"""The OpenAI-compatible API (`/v1/models`, `/v1/chat/completions`, `/v1/completions`).

The vLLM/BladeLLM deployment interface, on the same chat service and engine as
every other surface. Streams are SSE (`data: {...}\\n\\n` ... `data: [DONE]`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import replace
from typing import AsyncIterator, Callable, Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from api.conversation import conversation_from, session_headers
from api.disconnect import ClientGone, unless_disconnected
from api.errors import APIError, error_response, to_api_error
from api.openai_schemas import ChatCompletionRequest, CompletionRequest
from chat import ChatEvent, ChatRequest, ChatService, last_event, with_seed

router = APIRouter(prefix="/v1", tags=["openai"])

SSE_DONE = b"data: [DONE]\n\n"


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


def _check_model(requested: Optional[str], chat: ChatService) -> None:
    if requested and requested != chat.model_name:
        raise APIError(404, f"the model {requested!r} does not exist; this server serves {chat.model_name!r}",
                       type_="not_found_error", param="model", code="model_not_found")


@router.get("/models", summary="The served model")
async def list_models(request: Request) -> dict:
    chat: ChatService = request.app.state.chat
    return {"object": "list", "data": [{
        "id": chat.model_name, "object": "model", "created": request.app.state.started_at,
        "owned_by": "chatllm-webui", "max_model_len": chat.engine.max_model_len,
    }]}


async def _primed(events: AsyncIterator[ChatEvent]) -> tuple[ChatEvent, AsyncIterator[ChatEvent]]:
    """Take the first event now, so a bad request fails before any byte is sent."""
    try:
        return await anext(events), events
    except BaseException:
        await events.aclose()
        raise


async def _merge(streams: list[tuple[ChatEvent, AsyncIterator[ChatEvent]]]) -> AsyncIterator[tuple[int, ChatEvent]]:
    """Interleave several choices' events as they come; closing this closes them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, first: ChatEvent, events: AsyncIterator[ChatEvent]) -> None:
        try:
            await queue.put((index, first))
            async with contextlib.aclosing(events):
                async for event in events:
                    await queue.put((index, event))
        except Exception as exc:
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, first, events)) for i, (first, events) in enumerate(streams)]
    open_choices = len(tasks)
    try:
        while open_choices:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item.done:
                open_choices -= 1
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _streaming(body: Callable[[], AsyncIterator[bytes]], headers: Optional[dict] = None) -> StreamingResponse:
    async def guarded() -> AsyncIterator[bytes]:
        try:
            async for chunk in body():
                yield chunk
        except Exception as exc:  # a mid-stream failure is the last event before [DONE]
            yield sse(to_api_error(exc).body())
        yield SSE_DONE

    return StreamingResponse(guarded(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", **(headers or {})})


def _usage(events: list[ChatEvent]) -> dict:
    prompt = events[0].usage.prompt_tokens if events else 0
    completion = sum(e.usage.completion_tokens for e in events)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ---- chat completions -------------------------------------------------------------------


@router.post("/chat/completions", summary="Chat completion (OpenAI-compatible)", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    chat: ChatService = request.app.state.chat
    _check_model(body.model, chat)
    defaults = chat.engine.generation_defaults
    # left out, an answer may use the rest of the context (as OpenAI and vLLM), unless the model says less
    base = body.to_chat_request(default_max_tokens=defaults.get("max_new_tokens", chat.engine.max_model_len), defaults=defaults)
    base.conversation = conversation_from(request.headers, chat, explicit_history=body.explicit_history,
                                          store=body.store is not False)
    headers = session_headers(base.conversation)
    # with n > 1, the first choice is the one kept in the conversation
    choices = [replace(base, params=with_seed(base.params, i),
                       conversation=base.conversation if i == 0 or base.conversation is None
                       else replace(base.conversation, store=False)) for i in range(body.n)]
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    if not body.stream:
        try:
            finals = await unless_disconnected(request, asyncio.gather(*(chat.complete(c) for c in choices)))
        except ClientGone:
            return Response(status_code=499)
        reply = {
            "id": completion_id, "object": "chat.completion", "created": created, "model": chat.model_name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": e.text},
                         "finish_reason": e.finish_reason, "logprobs": None} for i, e in enumerate(finals)],
            "usage": _usage(finals),
        }
        if finals[0].sources is not None:
            reply["sources"] = finals[0].sources
        return JSONResponse(reply, headers=headers)

    try:
        streams = [await _primed(chat.stream(c)) for c in choices]
    except Exception as exc:
        response = error_response(exc)
        response.headers.update(headers)
        return response

    def chunk(choices_: list, usage=None, **extra) -> bytes:
        obj = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": chat.model_name,
               "choices": choices_, **extra}
        if body.include_usage:
            obj["usage"] = usage
        return sse(obj)

    async def events() -> AsyncIterator[bytes]:
        for i in range(len(streams)):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}])
        finals: dict[int, ChatEvent] = {}
        async with contextlib.aclosing(_merge(streams)) as merged:
            async for index, event in merged:
                if event.delta:
                    yield chunk([{"index": index, "delta": {"content": event.delta}, "finish_reason": None, "logprobs": None}])
                if event.done:
                    finals[index] = event
                    extra = {"sources": event.sources} if event.sources is not None else {}
                    yield chunk([{"index": index, "delta": {}, "finish_reason": event.finish_reason, "logprobs": None}], **extra)
        if body.include_usage:
            yield chunk([], usage=_usage(list(finals.values())))

    return _streaming(events, headers)


# ---- completions ------------------------------------------------------------------------


def _completion_streams(body: CompletionRequest, chat: ChatService) -> list[AsyncIterator[ChatEvent]]:
    params = body.sampling_params(body.max_tokens or 16, chat.engine.generation_defaults)
    out = []
    for prompt in body.prompts():
        for i in range(body.n):
            p = with_seed(params, i)
            if body.langchain:
                # grounded answers go through the chat format, like POST / with langchain
                out.append(chat.stream(ChatRequest.from_pairs(prompt, params=p, knowledge=body.knowledge_query())))
            else:
                out.append(chat.stream_completion(prompt, p))
    return out


@router.post("/completions", summary="Text completion (OpenAI / BladeLLM-compatible)", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response:
    chat: ChatService = request.app.state.chat
    _check_model(body.model, chat)
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    if not body.stream:
        try:
            finals = await unless_disconnected(request, asyncio.gather(*(last_event(s) for s in _completion_streams(body, chat))))
        except ClientGone:
            return Response(status_code=499)
        reply = {
            "id": completion_id, "object": "text_completion", "created": created, "model": chat.model_name,
            "choices": [{"index": i, "text": e.text, "finish_reason": e.finish_reason, "logprobs": None} for i, e in enumerate(finals)],
            "usage": _usage(finals),
        }
        if finals[0].sources is not None:
            reply["sources"] = finals[0].sources
        return JSONResponse(reply)

    try:
        streams = [await _primed(s) for s in _completion_streams(body, chat)]
    except Exception as exc:
        return error_response(exc)

    async def events() -> AsyncIterator[bytes]:
        async with contextlib.aclosing(_merge(streams)) as merged:
            async for index, event in merged:
                if not (event.delta or event.done):
                    continue
                # the BladeLLM stream shape: "" until the last chunk, usage so far in every chunk
                obj = {
                    "id": completion_id,
                    "choices": [{"finish_reason": event.finish_reason or "", "index": index, "logprobs": None, "text": event.delta}],
                    "object": "text_completion",
                    "usage": event.usage.as_dict(),
                    "error_info": None,
                }
                if event.done and event.sources is not None:
                    obj["sources"] = event.sources
                yield sse(obj)

    return _streaming(events)
