"""Counters a service keeps for itself, safe to bump from its worker threads and to read at scrape time."""

from __future__ import annotations

import threading
from collections import defaultdict


class Tally:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: defaultdict[str, float] = defaultdict(float)

    def add(self, name: str, amount: float = 1) -> None:
        with self._lock:
            self._values[name] += amount

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)
