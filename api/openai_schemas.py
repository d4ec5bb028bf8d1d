"""OpenAI-compatible request schemas (chat completions, completions) and their translation."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from api.schemas import (
    MAX_NEW_TOKENS,
    MAX_REPETITION_PENALTY,
    MAX_SEED,
    MAX_TOP_K,
    MIN_REPETITION_PENALTY,
    LenientBool,
)
from chat import ChatRequest, KnowledgeQuery
from engine import ChatMessage, SamplingParams
from engine.generation_defaults import GenerationDefaults

MAX_N = 8
# OpenAI's own newer name for the system role
ROLE_ALIASES = {"developer": "system"}
UNSUPPORTED = {
    "logprobs": "logprobs are not supported by this server",
    "tools": "tool calling is not supported by this server",
    "echo": "echoing the prompt is not supported by this server",
    "suffix": "insertion (suffix) is not supported by this server",
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    include_usage: LenientBool = False


class _Common(BaseModel):
    """Sampling fields both endpoints share, with OpenAI's ranges."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=MAX_TOP_K, description="extension: 0 or -1 disables")
    repetition_penalty: float = Field(1.0, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY, description="extension")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: LenientBool = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[Any] = None
    ignore_eos: LenientBool = Field(False, description="extension (as in vLLM): keep generating past end-of-sequence, for benchmarks")
    # knowledge-base extension, as on POST /
    langchain: LenientBool = False
    kb: str = Field("default", min_length=1, max_length=100)
    top_k_docs: int = Field(3, ge=1, le=50)

    @field_validator("logprobs", "tools", "echo", "suffix", check_fields=False)
    @classmethod
    def _unsupported(cls, value, info: ValidationInfo):
        """Features this server does not have are refused, never silently ignored."""
        if value:
            raise ValueError(UNSUPPORTED[info.field_name])
        return value

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return tuple(s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s)

    def sampling_params(self, max_new_tokens: int, defaults: GenerationDefaults = GenerationDefaults()) -> SamplingParams:
        """Fields the client sent are used exactly; for the others the model's defaults, then OpenAI's."""
        def pick(name: str):
            return defaults.for_field(self, name)

        temperature = pick("temperature")
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=max(pick("top_k"), 0),
            top_p=pick("top_p"),
            do_sample=temperature > 0,
            repetition_penalty=pick("repetition_penalty"),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=self.stop_strings(),
            seed=self.seed,
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def knowledge_query(self) -> Optional[KnowledgeQuery]:
        return KnowledgeQuery(self.kb, self.top_k_docs) if self.langchain else None


class ChatCompletionMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    role: str
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    name: Optional[str] = None

    def text(self, index: int) -> str:
        """The message's text; non-text parts are refused, naming the part."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        pieces = []
        for j, part in enumerate(self.content):
            kind = part.get("type")
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(
                    f"messages[{index}].content[{j}]: part type {kind!r} is not supported; this model reads text parts only"
                )
            pieces.append(part["text"])
        return "".join(pieces)


def check_messages(messages: list[ChatCompletionMessage]) -> None:
    """Known roles and text-only content, naming the first message that breaks either."""
    for i, m in enumerate(messages):
        if ROLE_ALIASES.get(m.role, m.role) not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}].role: unknown role {m.role!r}; use system, user or assistant")
        m.text(i)


class ChatCompletionRequest(_Common):
    messages: list[ChatCompletionMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=MAX_NEW_TOKENS)
    tools: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None
    store: Optional[bool] = Field(None, description="false: do not keep this exchange in the session's history")

    @field_validator("messages")
    @classmethod
    def _messages(cls, messages: list[ChatCompletionMessage]) -> list[ChatCompletionMessage]:
        check_messages(messages)
        if ROLE_ALIASES.get(messages[-1].role, messages[-1].role) != "user":
            raise ValueError("the last message must be from the user")
        return messages

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value):
        if value and value.get("type") not in (None, "text"):
            raise ValueError("only text responses are supported")
        return value

    @property
    def explicit_history(self) -> bool:
        """Turns before the last user message: the request brings its own history."""
        return sum(1 for m in self.messages if ROLE_ALIASES.get(m.role, m.role) != "system") > 1

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens

    def to_chat_request(self, default_max_tokens: int, defaults: GenerationDefaults = GenerationDefaults()) -> ChatRequest:
        system_parts, turns = [], []
        for i, m in enumerate(self.messages):
            role = ROLE_ALIASES.get(m.role, m.role)
            if role == "system":
                system_parts.append(m.text(i))
            else:
                turns.append(ChatMessage(role, m.text(i)))
        asked = self.requested_max_tokens()
        return ChatRequest(
            turns=turns,
            system_prompt="\n\n".join(p for p in system_parts if p),
            params=self.sampling_params(asked or default_max_tokens, defaults),
            knowledge=self.knowledge_query(),
            fit_history=False,
            exact_max_tokens=asked is not None,
            history_param="messages",
        )


class CompletionRequest(_Common):
    prompt: Union[str, list[str]]
    max_tokens: Optional[int] = Field(16, ge=1, le=MAX_NEW_TOKENS)
    echo: LenientBool = False
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("must hold at least one prompt")
        return value

    @model_validator(mode="after")
    def _choice_limit(self) -> "CompletionRequest":
        if len(self.prompts()) * self.n > MAX_N:
            raise ValueError(f"n: at most {MAX_N} completions per request (prompts × n)")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


FinishReason = Literal["stop", "length"]
