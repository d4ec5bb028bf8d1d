"""The one interface every backend implements and every surface uses."""

from __future__ import annotations

import abc
from typing import AsyncIterator, Sequence

from engine.generation_defaults import GenerationDefaults
from engine.types import ChatMessage, GenerationChunk, SamplingParams


class Engine(abc.ABC):
    """A loaded model that turns messages into a stream of text deltas.

    `generate` is an async generator: closing it (a client went away, the task
    was cancelled) aborts the request in the backend, so no compute is spent on
    answers nobody reads.
    """

    model_name: str
    max_model_len: int
    #: the model's own sampling defaults, for fields a request leaves out
    generation_defaults: GenerationDefaults = GenerationDefaults()

    @abc.abstractmethod
    def generate(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        request_id: str,
    ) -> AsyncIterator[GenerationChunk]:
        """Stream the answer to a conversation."""

    @abc.abstractmethod
    def generate_from_prompt(
        self, prompt: str, params: SamplingParams, request_id: str
    ) -> AsyncIterator[GenerationChunk]:
        """Stream a raw completion of `prompt`, with no chat template."""

    @abc.abstractmethod
    def abort(self, request_id: str) -> None:
        """Stop a running request; a no-op when it already ended."""

    @abc.abstractmethod
    def count_prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Tokens the rendered conversation takes, before any answer."""

    @abc.abstractmethod
    def health(self) -> dict:
        """What an operator needs to know: loaded, busy, limits."""

    async def ready(self) -> bool:
        """Whether requests can be served now; an in-process model is, once built."""
        return True

    def ignored_params(self, params: SamplingParams) -> list[str]:
        """Sampling fields set in `params` that this backend cannot honour (a remote server's limits)."""
        return []

    def shutdown(self) -> None:
        """Release worker threads; the default backend has nothing to do."""
