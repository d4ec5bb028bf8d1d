"""The chat service: the one place where a conversation becomes model input."""

from chat.service import ChatEvent, ChatRequest, ChatService, KnowledgeQuery, KnowledgeUnavailableError

__all__ = ["ChatEvent", "ChatRequest", "ChatService", "KnowledgeQuery", "KnowledgeUnavailableError"]
