"""The shared model runner: one model, loaded once, served to every surface."""

from engine.types import (
    ChatMessage,
    EngineError,
    EngineOverloadedError,
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
    "EngineOverloadedError",
    "GenerationChunk",
    "ModelLoadError",
    "PromptTooLongError",
    "SamplingParams",
    "Usage",
]
