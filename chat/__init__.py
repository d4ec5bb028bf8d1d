"""The chat service: the one place where a conversation becomes model input."""

from chat.limits import ChatLimits, RequestLimitError
from chat.service import (
    ChatEvent,
    ChatRequest,
    ChatService,
    ContextOverflowError,
    ConversationRef,
    KnowledgeQuery,
    KnowledgeUnavailableError,
    last_event,
    with_seed,
)

__all__ = [
    "ChatEvent",
    "ChatLimits",
    "RequestLimitError",
    "ChatRequest",
    "ChatService",
    "ContextOverflowError",
    "ConversationRef",
    "KnowledgeQuery",
    "KnowledgeUnavailableError",
    "last_event",
    "with_seed",
]
