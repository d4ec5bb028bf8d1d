"""The grounded-answer prompt, in the question's language, and the no-knowledge reply."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

from knowledge.store import Hit

ENGLISH = (
    "Answer the question using only the passages below, taken from the knowledge base. "
    "If the passages do not contain the answer, say that the knowledge base has no information about it. "
    "Be concise.\n\n{context}\n\nQuestion: {question}"
)
CHINESE = (
    "请只根据下面来自知识库的资料回答问题。如果资料中没有答案，请说明知识库中没有相关信息。回答要简洁。\n\n"
    "{context}\n\n问题：{question}"
)
NO_MATCH = {
    "en": "I found nothing in the knowledge base \"{kb}\" that matches this question, so I cannot answer it from the documents.",
    "zh": "知识库“{kb}”中没有找到与这个问题相关的内容，因此无法根据文档回答。",
}
_CJK = re.compile(r"[\u3400-\u9fff]")


def language_of(text: str) -> str:
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return "en"
    return "zh" if sum(1 for c in letters if _CJK.match(c)) / len(letters) > 0.3 else "en"


class RagPrompt:
    def __init__(self, custom_file: Optional[str] = None) -> None:
        self._custom: Optional[str] = None
        if custom_file:
            path = Path(custom_file)
            if not path.is_file():
                raise ValueError(f"--rag-prompt-file {path} does not exist")
            text = path.read_text(encoding="utf-8")
            missing = [p for p in ("{context}", "{question}") if p not in text]
            if missing:
                raise ValueError(f"--rag-prompt-file {path} must contain {' and '.join(missing)}")
            self._custom = text

    def render(self, question: str, hits: Sequence[Hit]) -> str:
        template = self._custom or (CHINESE if language_of(question) == "zh" else ENGLISH)
        context = "\n\n".join(
            f"[{i}] {h.file}" + (f", page {h.page}" if h.page else "") + f"\n{h.text}" for i, h in enumerate(hits, 1)
        )
        # plain replacement: documents may contain braces that str.format would choke on
        return template.replace("{context}", context).replace("{question}", question)

    @staticmethod
    def no_match(question: str, kb: str) -> str:
        return NO_MATCH[language_of(question)].format(kb=kb)
