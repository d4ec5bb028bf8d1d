"""What the chat service reports about each request, for metrics; the default reports nowhere."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class RequestTimings:
    """One generation as vLLM's request metrics see it (seconds, tokens)."""

    started: float
    first_token: Optional[float] = None
    token_times: list[float] = field(default_factory=list)
    queue_s: Optional[float] = None
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finish_reason: str = "abort"  # until a last chunk says otherwise

    def inter_token_latencies(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


class ChatObserver:
    """Hooks the chat service calls; metrics subclass this, the default does nothing."""

    def generation_finished(self, timings: RequestTimings, ended: float) -> None:
        pass

    def retrieval_finished(self, seconds: float, hits: int, matched: bool) -> None:
        pass
