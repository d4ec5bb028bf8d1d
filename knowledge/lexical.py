"""BM25 over chunk texts: the exact-term half of hybrid retrieval.

Dense MiniLM vectors miss exact tokens (version numbers, package names) and
know no Chinese; BM25 over words and CJK character bigrams catches both. The
index is rebuilt from the stored chunk texts, so it never needs its own file.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

import numpy as np

_WORD = re.compile(r"[a-z0-9][a-z0-9_.\-+]*[a-z0-9+]|[a-z0-9]")
_CJK_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_STOP = frozenset(
    "a an and are as at be by can do does for from how i in is it its me my of on or the this to was what when "
    "where which who why will with you your".split()
)


def tokenize(text: str) -> list[str]:
    lowered = text.lower()
    tokens = [w for w in _WORD.findall(lowered) if w not in _STOP]
    for run in _CJK_RUN.findall(lowered):
        tokens.extend(run[i : i + 2] for i in range(max(1, len(run) - 1)))
    return tokens


class BM25Index:
    def __init__(self, texts: Sequence[str], k1: float = 1.5, b: float = 0.75) -> None:
        self._k1, self._b = k1, b
        docs = [Counter(tokenize(t)) for t in texts]
        self._lengths = np.array([sum(d.values()) for d in docs], dtype=np.float32)
        self._avg = float(self._lengths.mean()) if len(docs) else 0.0
        self._postings: dict[str, list[tuple[int, int]]] = {}
        for i, doc in enumerate(docs):
            for term, tf in doc.items():
                self._postings.setdefault(term, []).append((i, tf))
        self._n = len(docs)

    def _idf(self, term: str) -> float:
        df = len(self._postings.get(term, ()))
        return math.log(1 + (self._n - df + 0.5) / (df + 0.5))

    def coverage(self, query: str, doc: int) -> float:
        """Share of the query's term weight (idf) that document `doc` contains, 0..1."""
        terms = set(tokenize(query))
        total = sum(self._idf(t) for t in terms)
        if not total:
            return 0.0
        present = sum(self._idf(t) for t in terms if any(i == doc for i, _ in self._postings.get(t, ())))
        return present / total

    def scores(self, query: str) -> np.ndarray:
        out = np.zeros(self._n, dtype=np.float32)
        if not self._n:
            return out
        norm = self._k1 * (1 - self._b + self._b * self._lengths / max(self._avg, 1e-6))
        for term in set(tokenize(query)):
            posting = self._postings.get(term)
            if not posting:
                continue
            idf = self._idf(term)
            ids = np.fromiter((i for i, _ in posting), dtype=np.int64, count=len(posting))
            tfs = np.fromiter((tf for _, tf in posting), dtype=np.float32, count=len(posting))
            out[ids] += idf * tfs * (self._k1 + 1) / (tfs + norm[ids])
        return out
