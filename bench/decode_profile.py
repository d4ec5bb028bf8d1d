"""Where a decode step's time goes, and what `torch.compile` does to it.

    .venv/bin/python bench/decode_profile.py                     # eager: step times + torch profiler table
    .venv/bin/python bench/decode_profile.py --compile layers    # each layer's MLP and RMSNorms compiled
    .venv/bin/python bench/decode_profile.py --compile model     # the whole forward compiled (minutes)

In process, embedded model, fp32: one decode step with 128 tokens of KV per
row in the runner's own GrowingCache, at 1, 8 and 32 rows; the first call
of each width is reported apart (that is where compilation happens).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.config import EngineConfig  # noqa: E402
from engine.kv_cache import GrowingCache  # noqa: E402
from engine.loader import embedded_model_source, load_model  # noqa: E402

PAST = 128


def compiled(model, what: str):
    if what == "layers":
        for layer in model.model.layers:
            layer.mlp = torch.compile(layer.mlp, dynamic=True)
            layer.input_layernorm = torch.compile(layer.input_layernorm, dynamic=True)
            layer.post_attention_layernorm = torch.compile(layer.post_attention_layernorm, dynamic=True)
    elif what == "model":
        model.forward = torch.compile(model.forward, dynamic=True)
    return model


def step_fn(model, rows: int):
    prompt = torch.randint(100, 20000, (rows, PAST))
    cache = GrowingCache()
    model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)

    def step() -> float:
        fresh = GrowingCache([(layer.keys, layer.values) for layer in cache.layers])
        started = time.perf_counter()
        model(input_ids=torch.randint(100, 20000, (rows, 1)), past_key_values=fresh, use_cache=True,
              attention_mask=torch.ones(rows, PAST + 1, dtype=torch.long), position_ids=torch.full((rows, 1), PAST))
        return time.perf_counter() - started
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", choices=["none", "layers", "model"], default="none")
    parser.add_argument("--profile-rows", type=int, nargs="*", default=[1, 8], help="rows to profile (eager only)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, _, _ = load_model(embedded_model_source(), EngineConfig(precision="fp32"))
    model = compiled(model, args.compile)
    for rows in (1, 8, 32):
        step = step_fn(model, rows)
        first = step()
        times = [step() for _ in range(8)]
        print(f"{args.compile} rows={rows}: step median {statistics.median(times[1:]) * 1000:.1f} ms, first call {first:.1f} s",
              flush=True)
    if args.compile != "none":
        return
    from torch.profiler import ProfilerActivity, profile

    for rows in args.profile_rows:
        step = step_fn(model, rows)
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        print(f"--- {rows} rows, 3 steps ---")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
