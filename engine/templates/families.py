"""The chat formats of the model families users deploy, from their model cards."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Sequence

from engine.types import ChatMessage


def _fold_system(messages: Sequence[ChatMessage]) -> tuple[str, list[ChatMessage]]:
    """Split leading system text from the turns (several system messages join)."""
    system_parts = [m.content for m in messages if m.role == "system"]
    turns = [m for m in messages if m.role != "system"]
    return "\n\n".join(p for p in system_parts if p), turns


class ChatTemplate(abc.ABC):
    """Renders messages (ending with a user turn) plus the assistant cue.

    The rendered text carries any BOS token itself, so it is tokenized without
    adding special tokens.
    """

    #: strings that mark the end of an answer in this format
    stop: tuple[str, ...] = ()

    @abc.abstractmethod
    def render(self, messages: Sequence[ChatMessage]) -> str: ...


@dataclass
class ChatML(ChatTemplate):
    """`<|im_start|>role\\n...<|im_end|>` (Qwen, Yi and generic ChatML)."""

    default_system: str = ""
    stop: tuple[str, ...] = ("<|im_end|>",)

    def render(self, messages: Sequence[ChatMessage]) -> str:
        system, turns = _fold_system(messages)
        system = system or self.default_system
        out = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        for m in turns:
            out += f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n"
        return out + "<|im_start|>assistant\n"


@dataclass
class Llama2(ChatTemplate):
    """`<s>[INST] <<SYS>>...<</SYS>> user [/INST] answer </s>` (Llama-2-chat)."""

    stop: tuple[str, ...] = ("</s>",)

    def render(self, messages: Sequence[ChatMessage]) -> str:
        system, turns = _fold_system(messages)
        out = ""
        for i, m in enumerate(turns):
            if m.role == "user":
                text = m.content.strip()
                if i == 0 and system:
                    text = f"<<SYS>>\n{system}\n<</SYS>>\n\n{text}"
                out += f"<s>[INST] {text} [/INST]"
            else:
                out += f" {m.content.strip()} </s>"
        return out


@dataclass
class Llama3(ChatTemplate):
    """Header-and-`<|eot_id|>` format of Llama 3 Instruct."""

    stop: tuple[str, ...] = ("<|eot_id|>", "<|end_of_text|>")

    def render(self, messages: Sequence[ChatMessage]) -> str:
        out = "<|begin_of_text|>"
        for m in messages:
            out += f"<|start_header_id|>{m.role}<|end_header_id|>\n\n{m.content.strip()}<|eot_id|>"
        return out + "<|start_header_id|>assistant<|end_header_id|>\n\n"


@dataclass
class ChatGLM3(ChatTemplate):
    """`[gMASK]sop<|role|>\\n content` of ChatGLM3-6B."""

    stop: tuple[str, ...] = ("<|user|>", "<|observation|>")

    def render(self, messages: Sequence[ChatMessage]) -> str:
        out = "[gMASK]sop"
        for m in messages:
            out += f"<|{m.role}|>\n {m.content}"
        return out + "<|assistant|>"


@dataclass
class Baichuan2(ChatTemplate):
    """System text, then `<reserved_106>` user / `<reserved_107>` assistant tokens."""

    stop: tuple[str, ...] = ("</s>",)

    def render(self, messages: Sequence[ChatMessage]) -> str:
        system, turns = _fold_system(messages)
        out = system
        for m in turns:
            out += ("<reserved_106>" if m.role == "user" else "<reserved_107>") + m.content
        return out + "<reserved_107>"


@dataclass
class Falcon(ChatTemplate):
    """`System:` / `User:` / `Falcon:` lines of Falcon-instruct."""

    stop: tuple[str, ...] = ("\nUser:", "<|endoftext|>")

    def render(self, messages: Sequence[ChatMessage]) -> str:
        system, turns = _fold_system(messages)
        lines = [f"System: {system}"] if system else []
        for m in turns:
            lines.append(f"{'User' if m.role == 'user' else 'Falcon'}: {m.content.strip()}")
        return "\n".join(lines) + "\nFalcon:"


@dataclass
class MistralInst(ChatTemplate):
    """`<s>[INST] user [/INST] answer</s>[INST] ...` (Mistral/Mixtral Instruct).

    These models have no system role: the system text opens the first user turn.
    """

    stop: tuple[str, ...] = ("</s>",)

    def render(self, messages: Sequence[ChatMessage]) -> str:
        system, turns = _fold_system(messages)
        out = "<s>"
        for i, m in enumerate(turns):
            if m.role == "user":
                text = f"{system}\n\n{m.content}" if i == 0 and system else m.content
                out += f"[INST] {text} [/INST]"
            else:
                out += f" {m.content}</s>"
        return out


@dataclass
class Gemma(ChatTemplate):
    """`<start_of_turn>user|model ... <end_of_turn>`; system folds into the first user turn."""

    stop: tuple[str, ...] = ("<end_of_turn>", "<eos>")

    def render(self, messages: Sequence[ChatMessage]) -> str:
        system, turns = _fold_system(messages)
        out = "<bos>"
        for i, m in enumerate(turns):
            role = "user" if m.role == "user" else "model"
            text = f"{system}\n\n{m.content}" if i == 0 and system else m.content
            out += f"<start_of_turn>{role}\n{text.strip()}<end_of_turn>\n"
        return out + "<start_of_turn>model\n"


@dataclass
class DeepSeekChat(ChatTemplate):
    """`User: ...\\n\\nAssistant: ...<｜end▁of▁sentence｜>` (DeepSeek LLM / V2 chat)."""

    stop: tuple[str, ...] = ("<｜end▁of▁sentence｜>", "\nUser:")

    def render(self, messages: Sequence[ChatMessage]) -> str:
        system, turns = _fold_system(messages)
        out = "<｜begin▁of▁sentence｜>" + (f"{system}\n\n" if system else "")
        for m in turns:
            if m.role == "user":
                out += f"User: {m.content}\n\n"
            else:
                out += f"Assistant: {m.content}<｜end▁of▁sentence｜>"
        return out + "Assistant:"


@dataclass
class DeepSeekCoder(ChatTemplate):
    """`### Instruction:` / `### Response:` of DeepSeek-Coder-Instruct, with its default system."""

    default_system: str = (
        "You are an AI programming assistant, utilizing the DeepSeek Coder model, "
        "developed by DeepSeek Company, and you only answer questions related to "
        "computer science. For politically sensitive questions, security and privacy "
        "issues, and other non-computer science questions, you will refuse to answer"
    )
    stop: tuple[str, ...] = ("<|EOT|>",)

    def render(self, messages: Sequence[ChatMessage]) -> str:
        system, turns = _fold_system(messages)
        out = "<｜begin▁of▁sentence｜>" + (system or self.default_system) + "\n"
        for m in turns:
            if m.role == "user":
                out += f"### Instruction:\n{m.content}\n"
            else:
                out += f"### Response:\n{m.content}\n<|EOT|>\n"
        return out + "### Response:\n"


_QWEN_SYSTEM = "You are a helpful assistant."

#: `--model-type` value -> template; aliases share one object
FAMILIES: dict[str, ChatTemplate] = {
    "chatml": ChatML(),
    "qwen": ChatML(default_system=_QWEN_SYSTEM, stop=("<|im_end|>", "<|endoftext|>")),
    "qwen2": ChatML(default_system=_QWEN_SYSTEM, stop=("<|im_end|>", "<|endoftext|>")),
    "yi": ChatML(stop=("<|im_end|>", "<|endoftext|>")),
    "llama2": Llama2(),
    "llama3": Llama3(),
    "chatglm3": ChatGLM3(),
    "baichuan2": Baichuan2(),
    "falcon": Falcon(),
    "mistral": MistralInst(),
    "gemma": Gemma(),
    "deepseek": DeepSeekChat(),
    "deepseek-coder": DeepSeekCoder(),
}
FAMILIES["qwen1.5"] = FAMILIES["qwen2"]
FAMILIES["qwen2.5"] = FAMILIES["qwen2"]
FAMILIES["mixtral"] = FAMILIES["mistral"]
FAMILIES["llama-2"] = FAMILIES["llama2"]
FAMILIES["llama-3"] = FAMILIES["llama3"]


def family_names() -> list[str]:
    return sorted(FAMILIES)


def get_template(name: str) -> ChatTemplate:
    try:
        return FAMILIES[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown --model-type {name!r}; choose one of: {', '.join(family_names())}"
        ) from None
