"""Chat-template families selectable with `--model-type`.

Each family renders a conversation into the exact prompt string its models
were trained on and names the strings that end an answer. Without
`--model-type` the tokenizer's own template is used instead (see
`engine.prompting`).
"""

from engine.templates.families import FAMILIES, ChatTemplate, get_template, family_names

__all__ = ["FAMILIES", "ChatTemplate", "get_template", "family_names"]
