"""Gaps between a stream's tokens, in process (no HTTP), with staggered closed-loop clients.

    .venv/bin/python bench/step_gaps.py --streams 8 --fused-step auto
    .venv/bin/python bench/step_gaps.py --streams 8 --fused-step off

Each client sends 3 requests one after the other (unique prompts, 96 tokens,
ignore_eos, temperature 0.8, top_p 0.95); clients start 4 s / N apart, so
newcomers arrive while the others decode. Prints chunks/s, the p50/p99
gap between one stream's consecutive chunks (the engine's part of ITL) and
the p50 time to a request's first chunk, alone and with the others running
(the engine's part of TTFT), without the HTTP side's noise.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.stats import percentile  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.factory import build_engine  # noqa: E402
from engine.types import ChatMessage, SamplingParams  # noqa: E402

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle works.",
           "Describe the water cycle to a child.", "What are the benefits of regular exercise?",
           "Write a poem about autumn leaves.", "Explain the rules of chess briefly.",
           "Describe a busy market in the morning.", "Why is the sky blue?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--fused-step", default="auto", choices=["auto", "off"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    engine = build_engine(EngineConfig(fused_step=args.fused_step))
    params = SamplingParams(max_new_tokens=96, temperature=0.8, top_p=0.95, ignore_eos=True)
    gaps: list[float] = []
    ttfts: list[float] = []
    chunks = 0

    async def client(number: int, stagger: float) -> None:
        nonlocal chunks
        await asyncio.sleep(number * stagger)
        for r in range(args.rounds):
            messages = [ChatMessage("system", "You are a helpful assistant."),
                        ChatMessage("user", f"(Request {args.streams}-{number}-{r}.) {PROMPTS[(number + r) % len(PROMPTS)]}")]
            last = sent = time.perf_counter()
            async for _ in engine.generate(messages, params, f"gaps-{number}-{r}"):
                now = time.perf_counter()
                if last is not sent:
                    gaps.append(now - last)
                else:
                    ttfts.append(now - sent)
                last, chunks = now, chunks + 1

    asyncio.run(client(0, 0))  # warm-up, then the same client alone: TTFT alone
    alone = ttfts[1:]
    gaps.clear()
    ttfts.clear()
    chunks = 0

    async def everyone() -> None:
        await asyncio.gather(*(client(c, 4.0 / args.streams) for c in range(args.streams)))

    started = time.perf_counter()
    asyncio.run(everyone())
    elapsed = time.perf_counter() - started
    print(f"streams {args.streams}, --fused-step {args.fused_step}: {chunks / elapsed:.1f} chunks/s, "
          f"gap p50 {percentile(gaps, 0.5) * 1000:.1f} ms, p99 {percentile(gaps, 0.99) * 1000:.1f} ms; "
          f"first chunk p50 {percentile(ttfts, 0.5) * 1000:.1f} ms (alone {percentile(alone, 0.5) * 1000:.1f} ms)")
    engine.shutdown()


if __name__ == "__main__":
    main()
