"""BM25 over chunk texts: the exact-term half of hybrid retrieval.

Dense vectors miss exact tokens (version numbers, package names); BM25 catches
them. Chinese has no spaces, so CJK runs are cut into words by jieba (the
Rust port, rjieba) in search mode, which also emits the shorter words inside
long ones ("中华人民共和国" -> "中华", "华人", "人民", "共和", "共和国", ...):
on the rag-dev-zh set that lifted hit@3 over character bigrams (bench/README.md).
The index is rebuilt from the stored chunk texts, so it never needs its own file.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Callable, Sequence

import numpy as np
import rjieba

_WORD = re.compile(r"[a-z0-9][a-z0-9_.\-+]*[a-z0-9+]|[a-z0-9]")
_CJK_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_STOP = frozenset(
    "a an and are as at be by can do does for from how i in is it its me my of on or the this to was what when "
    "where which who why will with you your".split()
)


# particles and pronouns that carry no topic
_CJK_STOP = frozenset("的 了 是 在 和 与 或 及 吗 呢 吧 啊 我 你 他 她 它 们 这 那 个 有 也 就 都 要 会 能 可以 怎么 什么 如何 哪些 多少".split())


def tokenize(text: str) -> list[str]:
    lowered = text.lower()
    tokens = [w for w in _WORD.findall(lowered) if w not in _STOP]
    for run in _CJK_RUN.findall(lowered):
        tokens.extend(word for word in rjieba.cut_for_search(run) if word not in _CJK_STOP)
    return tokens


class BM25Index:
    """Postings are numpy arrays (document ids ascending, term counts), so scoring a query term
    and checking whether a document holds it stay vector operations at 10k+ chunks."""

    def __init__(self, texts: Sequence[str], k1: float = 1.5, b: float = 0.75,
                 tokenizer: Callable[[str], list[str]] = tokenize) -> None:
        self._k1 = k1
        self._tokenize = tokenizer
        docs = [Counter(tokenizer(t)) for t in texts]
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
        terms = set(self._tokenize(query))
        total = sum(self._idf(t) for t in terms)
        if not total:
            return 0.0
        return sum(self._idf(t) for t in terms if self._holds(t, doc)) / total

    def scores(self, query: str) -> np.ndarray:
        out = np.zeros(self._n, dtype=np.float32)
        for term in set(self._tokenize(query)):
            posting = self._postings.get(term)
            if posting is None:
                continue
            ids, tfs = posting
            out[ids] += self._idf(term) * tfs * (self._k1 + 1) / (tfs + self._norm[ids])
        return out


#: reciprocal-rank-fusion constant, as in the original RRF paper
RRF_K = 60


def fuse(dense_positions: Sequence[int], lexical_scores: np.ndarray, depth: int, top_k: int) -> list[int]:
    """Reciprocal-rank fusion of a dense ranking and BM25 scores: the best `top_k` positions.

    Ranks, not scores, are added, because cosine and BM25 live on unrelated scales.
    """
    dense_rank = {int(p): r for r, p in enumerate(dense_positions) if p >= 0}
    lexical_order = [int(p) for p in np.argsort(-lexical_scores)[:depth] if lexical_scores[p] > 0]
    lexical_rank = {p: r for r, p in enumerate(lexical_order)}
    fused = {
        p: sum(1.0 / (RRF_K + 1 + ranks[p]) for ranks in (dense_rank, lexical_rank) if p in ranks)
        for p in set(dense_rank) | set(lexical_rank)
    }
    return sorted(fused, key=lambda p: -fused[p])[:top_k]
