"""Run torch work on the side in a thread that then ends, so that it leaves no OpenMP threads behind.

libgomp gives every thread that starts a parallel region its own pool of
helper threads, kept until that thread exits, and when the process holds
more of them than there are CPUs it stops letting helpers spin between
regions (GOMP_SPINCOUNT is then capped at 100 unless the wait policy is
passive). Every one of the ~300 small operations of a decode step then
waits for a helper to wake: with one idle thread alive that had once run a
product, a 1-row step went 37 -> 59 ms and an 8-row step 72 -> 106 ms on 2
cores (bench/README.md, "Round 5"). The model's own work runs in the engine's
worker; anything else that must touch torch at start-up (checking packed
weights, say) runs here instead of in the main thread, which lives forever.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def run_in_passing_thread(work: Callable[[], T], name: str = "torch-side-work") -> T:
    """`work()` in a new thread, joined; its result, or its exception raised here."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # handed back to the caller as is
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
