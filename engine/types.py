"""Plain data passed between the chat service and the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

#: temperatures below this sample as greedy (as in vLLM): dividing logits by less overflows
GREEDY_TEMPERATURE = 1e-5

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True)
class SamplingParams:
    """Everything that decides which tokens come out, for one request.

    Greedy decoding is `do_sample=False` or `temperature == 0`; both spellings
    exist because the EAS protocol and the OpenAI protocol each use one.
    """

    max_new_tokens: int = 2048
    temperature: float = 0.95
    top_k: int = 30
    top_p: float = 0.8
    do_sample: bool = True
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None
    ignore_eos: bool = False  # benchmarks: always produce max_new_tokens

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature < GREEDY_TEMPERATURE

    @property
    def counts_output(self) -> bool:
        """Whether sampling needs the per-token counts of the answer so far."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was reused, where the engine says (not part of the API's usage)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass
class GenerationChunk:
    """One step of a generation: new text, and on the last chunk why it ended."""

    delta: str
    finish_reason: Optional[FinishReason] = None
    usage: Usage = field(default_factory=Usage)
    queue_s: Optional[float] = None  # on the last chunk, where the backend knows: time waiting for a batch slot


class EngineError(Exception):
    """An error the engine reports to the caller as a sentence."""


class ModelLoadError(EngineError):
    """The model could not be found or loaded; the message names what was tried."""


class PromptTooLongError(EngineError):
    """The prompt does not leave room for even one new token in the context."""

    def __init__(self, prompt_tokens: int, max_model_len: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_model_len = max_model_len
        super().__init__(
            f"the prompt is {prompt_tokens} tokens, but the model's context is "
            f"{max_model_len} tokens and at least one must be left for the answer"
        )


class EngineOverloadedError(EngineError):
    """The waiting queue is full; the caller should retry later."""
