"""The chat service: the one place where a conversation becomes model input."""

from chat.service import (
    ChatEvent,
    ChatRequest,
    ChatService,
    ContextOverflowError,
    KnowledgeQuery,
    KnowledgeUnavailableError,
    last_event,
    with_seed,
)

__all__ = [
    "ChatEvent",
    "ChatRequest",
    "ChatService",
    "ContextOverflowError",
    "KnowledgeQuery",
    "KnowledgeUnavailableError",
    "last_event",
    "with_seed",
]
