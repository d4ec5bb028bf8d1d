"""The shared model runner: one model, loaded once, served to every surface."""

from engine.types import (
    ChatMessage,
    EngineError,
    GenerationChunk,
    ModelLoadError,
    PromptTooLongError,
    SamplingParams,
    Usage,
)
from engine.base import Engine

__all__ = [
    "ChatMessage",
    "Engine",
    "EngineError",
    "GenerationChunk",
    "ModelLoadError",
    "PromptTooLongError",
    "SamplingParams",
    "Usage",
]
