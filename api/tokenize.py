"""`POST /tokenize` in vLLM's shape, so a ChatLLM-WebUI in front of another one counts tokens exactly.

A front instance fits conversation history into the context by counting the
rendered prompt's tokens; vLLM and this server answer that here, other
servers leave the front to estimate.
"""

from __future__ import annotations

import asyncio
from typing import Optional

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.openai_schemas import ROLE_ALIASES, ChatCompletionMessage, check_messages
from chat import ChatService
from engine import ChatMessage
from engine.text import utf8_safe

router = APIRouter(tags=["openai"])


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: Optional[str] = None
    messages: list[ChatCompletionMessage] = Field(min_length=1, max_length=2000)
    add_generation_prompt: bool = Field(True, description="only true is supported: the prompt as the model reads it")

    @field_validator("messages")
    @classmethod
    def _roles(cls, messages: list[ChatCompletionMessage]) -> list[ChatCompletionMessage]:
        check_messages(messages)
        return messages

    def chat_messages(self) -> list[ChatMessage]:
        return [ChatMessage(ROLE_ALIASES.get(m.role, m.role), utf8_safe(m.text(i))) for i, m in enumerate(self.messages)]


@router.post("/tokenize", summary="Count the tokens of a rendered chat prompt (vLLM's shape)")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    chat: ChatService = request.app.state.chat
    count = await asyncio.to_thread(chat.engine.count_prompt_tokens, body.chat_messages())
    return {"count": count, "max_model_len": chat.engine.max_model_len}
