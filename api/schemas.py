"""Request schemas: every field check the EAS protocol needs lives here."""

from __future__ import annotations

from typing import Annotated, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from chat import ChatRequest, KnowledgeQuery
from engine import SamplingParams
from engine.generation_defaults import GenerationDefaults
from engine.text import utf8_safe


def _lenient_bool(value):
    """EAS clients send Python's str(True): accept 'True'/'true'/'false' as well as JSON booleans."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError("must be a boolean (true/false)")
    if isinstance(value, bool):
        return value
    raise ValueError("must be a boolean (true/false)")


LenientBool = Annotated[bool, BeforeValidator(_lenient_bool)]

# Protocol bounds, the same on every surface (README, "Limits"). Values the model
# cannot use are refused here; the few documented clamps happen in the engine
# (max_new_tokens to the context, top_k past the vocabulary means off,
# temperature below 1e-5 means greedy).
MAX_NEW_TOKENS = 1 << 20
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 1_000_000
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
MAX_SEED = 2**64 - 1


class EASChatRequest(BaseModel):
    """The EAS ChatLLM request body (POST / and WebSocket frames)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: str = ""
    question: Optional[str] = Field(None, description="the application-flow API's name for prompt (used when prompt is empty)")
    system_prompt: str = ""
    history: list[tuple[str, str]] = Field(default_factory=list)
    max_new_tokens: int = Field(2048, ge=1, le=MAX_NEW_TOKENS, description="capped to what the context leaves")
    use_stream_chat: Optional[LenientBool] = None
    temperature: float = Field(0.95, ge=0.0, le=MAX_TEMPERATURE, description="0 (or below 1e-5) is greedy")
    top_k: int = Field(30, ge=0, le=MAX_TOP_K, description="0 disables; at or past the vocabulary size, the same")
    top_p: float = Field(0.8, gt=0.0, le=1.0)
    do_sample: LenientBool = True
    use_cache: LenientBool = True
    repetition_penalty: float = Field(1.0, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    stop: Optional[Union[str, list[str]]] = None
    stop_sequences: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    langchain: LenientBool = False
    kb: str = Field("default", min_length=1, max_length=100)
    top_k_docs: int = Field(3, ge=1, le=50)

    @field_validator("history", mode="before")
    @classmethod
    def _history_pairs(cls, value):
        if value is None:
            return []
        if not isinstance(value, list):
            raise ValueError("must be a list of [user, assistant] pairs")
        for i, pair in enumerate(value):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"item {i} must be a [user, assistant] pair")
            if not all(isinstance(s, str) for s in pair):
                raise ValueError(f"item {i} must hold two strings")
        return value

    @model_validator(mode="after")
    def _question_is_prompt(self):
        # written through __dict__: assignment would count these as fields the client sent
        values = self.__dict__
        if not self.prompt and self.question:
            values["prompt"] = self.question
        # JSON escapes can carry lone surrogates, which no reply (it echoes the prompt) could encode
        values["prompt"], values["system_prompt"] = utf8_safe(self.prompt), utf8_safe(self.system_prompt)
        values["history"] = [(utf8_safe(u), utf8_safe(a)) for u, a in self.history]
        return self

    @property
    def explicit_history(self) -> bool:
        """The request brought its own history (even an empty one): stored turns are not added."""
        return "history" in self.model_fields_set

    def stop_strings(self) -> tuple[str, ...]:
        out: list[str] = []
        for value in (self.stop, self.stop_sequences):
            if isinstance(value, str):
                out.append(value)
            elif value:
                out.extend(value)
        return tuple(s for s in out if s)

    def sampling_params(self, defaults: GenerationDefaults = GenerationDefaults()) -> SamplingParams:
        """Fields the client sent are used exactly; for the others the model's defaults, then the protocol's."""
        def pick(name: str):
            return defaults.for_field(self, name)

        return SamplingParams(
            max_new_tokens=pick("max_new_tokens"),
            temperature=pick("temperature"),
            top_k=pick("top_k"),
            top_p=pick("top_p"),
            do_sample=self.do_sample,
            repetition_penalty=pick("repetition_penalty"),
            stop=self.stop_strings(),
            seed=self.seed,
        )

    def to_chat_request(self, defaults: GenerationDefaults, system_prompt: Optional[str] = None, history=None) -> ChatRequest:
        return ChatRequest.from_pairs(
            prompt=self.prompt,
            system_prompt=self.system_prompt if system_prompt is None else system_prompt,
            history=self.history if history is None else history,
            params=self.sampling_params(defaults),
            knowledge=KnowledgeQuery(self.kb, self.top_k_docs) if self.langchain else None,
        )
