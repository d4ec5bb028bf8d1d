"""Batching mechanisms compared in one process on the same model: which one the runner is built on.

    .venv/bin/python bench/batching_mechanisms.py                 # 32 prompts, 96 new tokens each
    .venv/bin/python bench/batching_mechanisms.py --batch 8 --new-tokens 64

Runs, one after the other, greedy decoding of the same `--batch` chat prompts:
  generate          one `model.generate` call over the left-padded batch (no joins or leaves:
                    an upper bound for a static batch)
  generate_batch    transformers' continuous batching (`model.generate_batch`, paged KV cache)
  engine            this server's runner: the same prompts submitted as concurrent requests
                    (iteration-level batching over a shared left-padded DynamicCache,
                    streaming per request; prefix reuse off so every mechanism prefills
                    the same tokens)
and prints output tokens/s for each as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.serve_bench import PROMPTS  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.factory import build_engine  # noqa: E402
from engine.types import ChatMessage, SamplingParams  # noqa: E402


def _prompts(engine, batch: int) -> list[list[int]]:
    return [engine._prompts.encode_chat([ChatMessage("user", PROMPTS[i % len(PROMPTS)])]) for i in range(batch)]


def run_generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> tuple[int, float]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    started = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=pad_id)
    return (out.shape[1] - width) * len(prompts), time.perf_counter() - started


def run_generate_batch(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> tuple[int, float]:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=pad_id)
    started = time.perf_counter()
    outputs = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
    elapsed = time.perf_counter() - started
    return sum(len(o.generated_tokens) for o in outputs.values()), elapsed


def run_engine(engine, prompts_text: list[str], new_tokens: int) -> tuple[int, float]:
    params = SamplingParams(do_sample=False, max_new_tokens=new_tokens, ignore_eos=True)

    async def one(i: int, text: str) -> int:
        count = 0
        async for chunk in engine.generate([ChatMessage("user", text)], params, f"mech-{i}-{time.monotonic_ns()}"):
            count = chunk.usage.completion_tokens if chunk.usage else count
        return count

    async def all_of_them() -> int:
        return sum(await asyncio.gather(*(one(i, t) for i, t in enumerate(prompts_text))))

    started = time.perf_counter()
    tokens = asyncio.run(all_of_them())
    return tokens, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    engine = build_engine(EngineConfig(prefix_cache_tokens=0, precision=args.precision, max_num_seqs=max(32, args.batch)))
    model, pad_id = engine._model, engine._tokenizer.pad_token_id or engine._tokenizer.eos_token_id or 0
    prompts = _prompts(engine, args.batch)
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    run_engine(engine, texts[:2], 4)  # warm-up
    results = {}
    for name, fn in (("generate", lambda: run_generate(model, prompts, args.new_tokens, pad_id)),
                     ("generate_batch", lambda: run_generate_batch(model, prompts, args.new_tokens, pad_id)),
                     ("engine", lambda: run_engine(engine, texts, args.new_tokens))):
        try:
            tokens, seconds = fn()
            results[name] = {"tokens": tokens, "seconds": round(seconds, 2), "tok_per_s": round(tokens / seconds, 1)}
        except Exception as exc:  # a mechanism that fails here is reported, not fatal
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print(json.dumps({name: results[name]}), flush=True)
    engine.shutdown()
    print(json.dumps({"batch": args.batch, "new_tokens": args.new_tokens, "precision": args.precision, **results}, indent=2))


if __name__ == "__main__":
    main()
