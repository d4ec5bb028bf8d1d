"""What a live side thread that once ran torch work costs the engine's worker (libgomp's spin throttling).

    .venv/bin/python bench/side_threads.py

In this process, the embedded model's decode step (bench/precision.py's
probe) at 1 and 8 rows, always run from a fresh "worker" thread, while:
nothing else has touched torch; a thread that ran a small product has ended
(what engine/passing_thread.py does); such a thread is still alive, idle (a
thread pool's worker after one embedding, or a main thread that ran a
check); it has ended again. Medians in ms; the report goes to
bench/results/side_threads.json.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.precision import load, step_times  # noqa: E402
from bench.server_process import ROOT  # noqa: E402
from engine.passing_thread import run_in_passing_thread  # noqa: E402


def side_work() -> None:
    torch.randn(256, 256) @ torch.randn(256, 256)


def main() -> None:
    torch.set_grad_enabled(False)
    model, _ = load("fp32-packed")

    def probe() -> dict:
        return run_in_passing_thread(lambda: {rows: round(step_times(model, rows) * 1000, 1) for rows in (1, 8)}, "worker")

    report = {"worker alone": probe()}
    run_in_passing_thread(side_work)
    report["after a side thread that ran a product ended"] = probe()
    release = threading.Event()

    def lingering() -> None:
        side_work()
        release.wait()

    holder = threading.Thread(target=lingering)
    holder.start()
    report["while that side thread is alive and idle"] = probe()
    release.set()
    holder.join()
    report["after it ended"] = probe()
    for what, times in report.items():
        print(f"{what}: decode step {times} ms", flush=True)
    out = ROOT / "bench" / "results" / "side_threads.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
