"""The chat service: the one place where a conversation becomes model input."""

from chat.service import ChatEvent, ChatRequest, ChatService

__all__ = ["ChatEvent", "ChatRequest", "ChatService"]
