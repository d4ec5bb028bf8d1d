"""Streaming one answer into a chat window, for both tabs, through the one chat service."""

from __future__ import annotations

from typing import Any, AsyncIterator, Optional, Sequence

from api.errors import to_api_error
from chat import ChatRequest, ChatService, KnowledgeQuery
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
) -> AsyncIterator[list[dict]]:
    """Yield the chat window's messages as the answer grows (throttled); errors become a visible block.

    `controls` are the sampling sliders' raw values, validated like an API request.
    """
    messages = [*history, {"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]
    yield messages
    throttle = Throttle()
    try:
        request = ChatRequest.from_pairs(prompt, system_prompt or "", to_pairs(history), params=sampling(*controls),
                                         knowledge=knowledge)
        async for event in chat.stream(request):
            messages[-1] = {"role": "assistant", "content": event.text}
            if event.done:
                if event.sources is not None:
                    messages.append(sources_block(event.sources))
                yield messages
            elif throttle.ready():
                yield messages
    except Exception as exc:  # shown in the page, never swallowed
        if not messages[-1]["content"]:
            messages.pop()
        messages.append(error_block(to_api_error(exc).message))
        yield messages
