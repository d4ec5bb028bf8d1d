"""Reusing the KV of token sequences the model has already read.

Every chat prompt starts with the same system prompt, and a conversation's
next prompt starts with its previous prompt and answer. Keeping the keys and
values of recent prompts (and of finished answers) lets a new prompt skip the
part it shares with one of them: only the rest is prefilled. The KV of a
position depends only on the tokens up to it, so any common prefix of an
entry can be reused, not just whole entries.

Only the engine's worker thread touches this object.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

LayerKV = tuple[torch.Tensor, torch.Tensor]  # keys, values: [1, kv_heads, tokens, head_dim]


@dataclass(frozen=True)
class PrefixMatch:
    tokens: int  # how many leading prompt tokens come from the cache
    kv: Optional[list[LayerKV]]  # their keys and values per layer, None when tokens == 0


NO_MATCH = PrefixMatch(0, None)


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    differs = torch.nonzero(a[:n] != b[:n])
    return int(differs[0]) if len(differs) else n


class PrefixCache:
    """Least-recently-used KV entries within a token budget (0 turns the cache off)."""

    def __init__(self, max_tokens: int, min_match: int = 8) -> None:
        self.max_tokens = max_tokens
        self.min_match = min_match
        self._entries: collections.OrderedDict[tuple[int, ...], tuple[torch.Tensor, list[LayerKV]]] = collections.OrderedDict()
        self._tokens = 0
        self.hit_tokens = 0
        self.lookups = 0
        self.query_tokens = 0

    @property
    def enabled(self) -> bool:
        return self.max_tokens > 0

    def stats(self) -> dict:
        return {"entries": len(self._entries), "tokens": self._tokens, "max_tokens": self.max_tokens,
                "lookups": self.lookups, "query_tokens": self.query_tokens, "hit_tokens": self.hit_tokens}

    def lookup(self, prompt_ids: Sequence[int]) -> PrefixMatch:
        """The longest cached start of `prompt_ids`, leaving at least its last token to compute."""
        if not self.enabled:
            return NO_MATCH
        self.lookups += 1
        self.query_tokens += len(prompt_ids)  # every query counts, as in vLLM: an empty cache is all misses
        if not self._entries:
            return NO_MATCH
        prompt = torch.tensor(prompt_ids)
        best_key, best = None, 0
        for key, (ids, _) in self._entries.items():
            n = _common_prefix(ids, prompt)
            if n > best:
                best_key, best = key, n
        # the last prompt token must go through the model: its logits give the first answer token
        best = min(best, len(prompt_ids) - 1)
        if best_key is None or best < self.min_match:
            return NO_MATCH
        self._entries.move_to_end(best_key)
        self.hit_tokens += best
        kv = [(k[:, :, :best], v[:, :, :best]) for k, v in self._entries[best_key][1]]
        return PrefixMatch(best, kv)

    def store(self, token_ids: Sequence[int], kv: Callable[[], list[LayerKV]]) -> None:
        """Keep the KV of `token_ids`; `kv` copies it out of the batch, called only if it is kept."""
        n = len(token_ids)
        if not self.enabled or n < self.min_match or n > self.max_tokens:
            return
        ids = torch.tensor(token_ids)
        covered = []
        for key, (held, _) in self._entries.items():
            shared = _common_prefix(held, ids)
            if shared == n:
                self._entries.move_to_end(key)  # an entry already covers these tokens
                return
            if shared == len(held):
                covered.append(key)  # the new entry covers this one
        for key in covered:
            self._drop(key)
        self._entries[tuple(token_ids)] = (ids, kv())
        self._tokens += n
        while self._tokens > self.max_tokens:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple[int, ...]) -> None:
        ids, _ = self._entries.pop(key)
        self._tokens -= len(ids)
