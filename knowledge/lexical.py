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
    """Postings are numpy arrays (document ids ascending, term counts), so scoring a query term
    and checking whether a document holds it stay vector operations at 10k+ chunks."""

    def __init__(self, texts: Sequence[str], k1: float = 1.5, b: float = 0.75) -> None:
        self._k1 = k1
        docs = [Counter(tokenize(t)) for t in texts]
        lengths = np.array([sum(d.values()) for d in docs], dtype=np.float32)
        average = float(lengths.mean()) if len(docs) else 0.0
        # BM25's length normalisation depends only on the document: computed once, not per query
        self._norm = k1 * (1 - b + b * lengths / max(average, 1e-6))
        building: dict[str, tuple[list[int], list[int]]] = {}
        for i, doc in enumerate(docs):
            for term, tf in doc.items():
                ids, tfs = building.setdefault(term, ([], []))
                ids.append(i)
                tfs.append(tf)
        self._postings = {t: (np.array(ids, dtype=np.int64), np.array(tfs, dtype=np.float32)) for t, (ids, tfs) in building.items()}
        self._n = len(docs)

    def _idf(self, term: str) -> float:
        posting = self._postings.get(term)
        df = len(posting[0]) if posting else 0
        return math.log(1 + (self._n - df + 0.5) / (df + 0.5))

    def _holds(self, term: str, doc: int) -> bool:
        posting = self._postings.get(term)
        if posting is None:
            return False
        at = int(np.searchsorted(posting[0], doc))
        return at < len(posting[0]) and int(posting[0][at]) == doc

    def coverage(self, query: str, doc: int) -> float:
        """Share of the query's term weight (idf) that document `doc` contains, 0..1."""
        terms = set(tokenize(query))
        total = sum(self._idf(t) for t in terms)
        if not total:
            return 0.0
        return sum(self._idf(t) for t in terms if self._holds(t, doc)) / total

    def scores(self, query: str) -> np.ndarray:
        out = np.zeros(self._n, dtype=np.float32)
        for term in set(tokenize(query)):
            posting = self._postings.get(term)
            if posting is None:
                continue
            ids, tfs = posting
            out[ids] += self._idf(term) * tfs * (self._k1 + 1) / (tfs + self._norm[ids])
        return out
