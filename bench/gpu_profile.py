"""Where a GPU decode step's time goes: the bare forward pass against the runner's whole iteration.

    python3 bench/gpu_profile.py --model DIR

One row, 128 tokens of KV: (1) the model's forward alone on the runner's
GrowingCache, timed with CUDA synchronisation; (2) the engine streaming one
answer, its inter-token gap; (3) a torch profiler table of the engine's
iterations (self CPU time), which shows host-side work and synchronisations.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.config import EngineConfig  # noqa: E402
from engine.factory import build_engine  # noqa: E402
from engine.kv_cache import GrowingCache  # noqa: E402
from engine.types import ChatMessage, SamplingParams  # noqa: E402

PAST = 128


def bare_forward_ms(model) -> float:
    device = next(model.parameters()).device
    cache = GrowingCache()
    model(input_ids=torch.randint(100, 20000, (1, PAST), device=device), past_key_values=cache, use_cache=True,
          logits_to_keep=1)
    times = []
    for _ in range(20):
        fresh = GrowingCache([(layer.keys, layer.values) for layer in cache.layers])
        torch.cuda.synchronize()
        began = time.perf_counter()
        model(input_ids=torch.randint(100, 20000, (1, 1), device=device), past_key_values=fresh, use_cache=True,
              attention_mask=torch.ones(1, PAST + 1, dtype=torch.long, device=device),
              position_ids=torch.full((1, 1), PAST, device=device))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return statistics.median(times[2:]) * 1000


async def stream_gaps(engine, tokens: int) -> list[float]:
    gaps, last = [], None
    params = SamplingParams(do_sample=False, max_new_tokens=tokens, ignore_eos=True)
    async for chunk in engine.generate([ChatMessage("user", "Write an essay.")], params, f"p{time.time()}"):
        now = time.perf_counter()
        if last is not None and chunk.delta:
            gaps.append(now - last)
        last = now
    return gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--precision", default="bf16")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    engine = build_engine(EngineConfig(model_path=args.model, device="cuda", precision=args.precision))
    try:
        print(f"bare forward, 1 row: {bare_forward_ms(engine._model):.1f} ms", flush=True)
        asyncio.run(stream_gaps(engine, 16))  # warm-up
        gaps = asyncio.run(stream_gaps(engine, 64))
        print(f"engine inter-token gap, 1 stream: median {statistics.median(gaps) * 1000:.1f} ms", flush=True)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            asyncio.run(stream_gaps(engine, 16))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18), flush=True)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
