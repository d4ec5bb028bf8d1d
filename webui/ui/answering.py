"""Streaming one answer into a chat window, for both tabs, through the one chat service."""

from __future__ import annotations

from typing import Any, AsyncIterator, Optional, Sequence

from api.errors import to_api_error
from chat import ChatRequest, ChatService, ConversationRef, KnowledgeQuery
from webui.ui.common import Throttle, sampling, to_pairs


def sources_block(sources: list[dict]) -> dict:
    """A collapsible block under an answer listing where it came from."""
    if not sources:
        return {"role": "assistant", "content": "No passage in the knowledge base matched this question.",
                "metadata": {"title": "Sources: none", "status": "done"}}
    lines = []
    for i, s in enumerate(sources, 1):
        where = f"**{s['file']}**" + (f", page {s['page']}" if s.get("page") else "")
        snippet = " ".join(s["text"].split())
        snippet = snippet[:280] + ("…" if len(snippet) > 280 else "")
        lines.append(f"{i}. {where} (score {s['score']:.2f})\n\n   > {snippet}")
    return {"role": "assistant", "content": "\n\n".join(lines),
            "metadata": {"title": f"Sources ({len(sources)})", "status": "done"}}


def details_block(trace: dict) -> dict:
    """A collapsible block under an answer: what was retrieved, token counts, timings (the answer's trace)."""
    spans = {s["name"]: s for s in trace.get("spans", [])}
    lines = []
    load = spans.get("history.load")
    if load:
        lines.append(f"- **history**: {load['attributes'].get('turns', 0)} stored turns read in {load['duration_ms']:.0f} ms")
    retrieval = spans.get("retrieval")
    if retrieval:
        a = retrieval["attributes"]
        lines.append(f"- **retrieval** from `{a.get('kb')}` (top {a.get('top_k')}) in {retrieval['duration_ms']:.0f} ms:")
        for hit in a.get("hits") or []:
            page = f", page {hit['page']}" if hit.get("page") else ""
            score = hit.get("score")
            lines.append(f"  - {hit.get('file')}{page}: score {score:.3f}" if isinstance(score, (int, float))
                         else f"  - {hit.get('file')}{page}")
    prompt = spans.get("prompt")
    if prompt:
        a = prompt["attributes"]
        lines.append(f"- **prompt**: {a.get('prompt_tokens')} tokens, {a.get('turns_kept')} of {a.get('turns_given')} "
                     f"messages kept, built in {prompt['duration_ms']:.0f} ms")
    generation = spans.get("generation")
    title = "Details"
    if generation:
        a = generation["attributes"]
        seconds = generation["duration_ms"] / 1000
        tokens = a.get("completion_tokens")
        lines.append(f"- **generation**: {tokens} tokens in {seconds:.2f} s, first token after {a.get('ttft_ms', 0):.0f} ms, "
                     f"finish `{a.get('finish_reason')}`; temperature {a.get('temperature')}, top_p {a.get('top_p')}, "
                     f"top_k {a.get('top_k')}, max_new_tokens {a.get('max_new_tokens')}")
        title = f"Details: {tokens} tokens · {seconds:.1f} s"
    lines.append(f"- trace `{trace.get('id')}`")
    return {"role": "assistant", "content": "\n".join(lines), "metadata": {"title": title, "status": "done"}}


def error_block(message: str) -> dict:
    # the title is always visible, so the reason is readable without expanding anything
    return {"role": "assistant", "content": message, "metadata": {"title": f"Error: {message}", "status": "done"}}


async def stream_answer(
    chat: ChatService,
    history: list[dict],
    prompt: str,
    system_prompt: str,
    controls: Sequence[Any],
    knowledge: Optional[KnowledgeQuery] = None,
    conversation: Optional[ConversationRef] = None,
) -> AsyncIterator[list[dict]]:
    """Yield the chat window's messages as the answer grows (throttled); errors become a visible block.

    `controls` are the sampling sliders' raw values, validated like an API request.
    """
    messages = [*history, {"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]
    yield messages
    throttle = Throttle()
    try:
        request = ChatRequest.from_pairs(prompt, system_prompt or "", to_pairs(history), params=sampling(*controls),
                                         knowledge=knowledge, conversation=conversation)
        async for event in chat.stream(request):
            messages[-1] = {"role": "assistant", "content": event.text}
            if event.done:
                if event.sources is not None:
                    messages.append(sources_block(event.sources))
                if conversation is not None and event.trace is not None:
                    messages.append(details_block(event.trace.as_dict()))
                yield messages
            elif throttle.ready():
                yield messages
    except Exception as exc:  # shown in the page, never swallowed
        if not messages[-1]["content"]:
            messages.pop()
        messages.append(error_block(to_api_error(exc).message))
        yield messages
