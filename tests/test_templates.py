"""Golden prompts: the exact string each --model-type family renders.

The expected strings are written out by hand from each family's published
chat format, since the models themselves cannot be loaded here.
"""

import pytest

from engine.templates import get_template, family_names
from engine.types import ChatMessage

CONVERSATION = [
    ChatMessage("system", "You are terse."),
    ChatMessage("user", "Hi!"),
    ChatMessage("assistant", "Hello."),
    ChatMessage("user", "What is 2+2?"),
]

GOLDEN = {
    "chatml": (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "llama2": (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi! [/INST] Hello. </s>"
        "<s>[INST] What is 2+2? [/INST]"
    ),
    "llama3": (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "chatglm3": (
        "[gMASK]sop<|system|>\n You are terse.<|user|>\n Hi!<|assistant|>\n Hello."
        "<|user|>\n What is 2+2?<|assistant|>"
    ),
    "baichuan2": "You are terse.<reserved_106>Hi!<reserved_107>Hello.<reserved_106>What is 2+2?<reserved_107>",
    "falcon": "System: You are terse.\nUser: Hi!\nFalcon: Hello.\nUser: What is 2+2?\nFalcon:",
    "mistral": "<s>[INST] You are terse.\n\nHi! [/INST] Hello.</s>[INST] What is 2+2? [/INST]",
    "gemma": (
        "<bos><start_of_turn>user\nYou are terse.\n\nHi!<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n"
    ),
    "deepseek": (
        "<｜begin▁of▁sentence｜>You are terse.\n\n"
        "User: Hi!\n\nAssistant: Hello.<｜end▁of▁sentence｜>"
        "User: What is 2+2?\n\nAssistant:"
    ),
    "deepseek-coder": (
        "<｜begin▁of▁sentence｜>You are terse.\n"
        "### Instruction:\nHi!\n### Response:\nHello.\n<|EOT|>\n"
        "### Instruction:\nWhat is 2+2?\n### Response:\n"
    ),
}
# the ChatML families differ only in their default system prompt
GOLDEN["qwen"] = GOLDEN["qwen2"] = GOLDEN["yi"] = GOLDEN["chatml"]
GOLDEN["mixtral"] = GOLDEN["mistral"]


@pytest.mark.parametrize("family", sorted(GOLDEN))
def test_family_renders_documented_format(family):
    assert get_template(family).render(CONVERSATION) == GOLDEN[family]


def test_every_family_has_a_golden():
    aliases = {"qwen1.5", "qwen2.5", "llama-2", "llama-3"}
    assert set(family_names()) - aliases == set(GOLDEN)


def test_qwen_adds_its_default_system_prompt_when_none_given():
    rendered = get_template("qwen2").render([ChatMessage("user", "Hi!")])
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    )


def test_deepseek_coder_default_system_prompt():
    rendered = get_template("deepseek-coder").render([ChatMessage("user", "Hi!")])
    assert rendered.startswith("<｜begin▁of▁sentence｜>You are an AI programming assistant, utilizing the DeepSeek Coder model")
    assert rendered.endswith("### Instruction:\nHi!\n### Response:\n")


def test_families_without_system_role_keep_user_turns_intact():
    no_system = [ChatMessage("user", "Hi!")]
    assert get_template("gemma").render(no_system) == "<bos><start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\n"
    assert get_template("mistral").render(no_system) == "<s>[INST] Hi! [/INST]"
    assert get_template("llama2").render(no_system) == "<s>[INST] Hi! [/INST]"


def test_unknown_family_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown --model-type 'gpt9'.*chatml"):
        get_template("gpt9")


@pytest.mark.parametrize(
    "family,stop",
    [("qwen2", "<|im_end|>"), ("llama3", "<|eot_id|>"), ("llama2", "</s>"), ("gemma", "<end_of_turn>"),
     ("falcon", "\nUser:"), ("deepseek-coder", "<|EOT|>"), ("chatglm3", "<|user|>")],
)
def test_families_name_their_end_of_answer(family, stop):
    assert stop in get_template(family).stop
