"""The transformers backend on a GPU: answers agree with CPU fp32, seeded sampling works, batched throughput.

    # here, on CPU, once: the reference answers
    .venv/bin/python bench/gpu_check.py --make-reference ref.json
    # on the GPU machine (bf16 and fp32 on CUDA, against that reference)
    python3 bench/gpu_check.py --model SmolLM2-135M-Instruct.Q4_1.gguf --reference ref.json --out gpu.json

Drives the engine in process (no HTTP server: the GPU machine has torch and
transformers, not the web stack): the same scheduler, batching, sampling and
prefix cache every surface uses. Agreement is exact equality of greedy answers
(48 tokens) over fixed questions; throughput is unique prompts, answers of
fixed length (ignore_eos), all streams started together and again staggered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.config import EngineConfig  # noqa: E402
from engine.factory import build_engine  # noqa: E402
from engine.types import ChatMessage, SamplingParams  # noqa: E402

QUESTIONS = [
    "What is the capital of France?", "How many legs does a spider have?", "Name three primary colors.",
    "What is 12 times 12?", "Who wrote Romeo and Juliet?", "What gas do plants absorb from the air?",
    "Translate 'good morning' into Spanish.", "What is the boiling point of water in Celsius?",
    "Give one tip for better sleep.", "What is the largest planet in the solar system?",
    "Write a haiku about the sea.", "Explain what a CPU does in one sentence.",
    "中国的首都是哪里？", "请用一句话介绍长城。", "What does HTTP stand for?", "List the days of the week.",
]
ANSWER_TOKENS = 48


async def _answer(engine, text: str, params: SamplingParams, rid: str) -> str:
    out = ""
    async for chunk in engine.generate([ChatMessage("user", text)], params, rid):
        out += chunk.delta
    return out


async def greedy_answers(engine) -> list[str]:
    params = SamplingParams(do_sample=False, max_new_tokens=ANSWER_TOKENS)
    return list(await asyncio.gather(*(_answer(engine, q, params, f"g{i}") for i, q in enumerate(QUESTIONS))))


async def seeded_sampling(engine) -> dict:
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, max_new_tokens=24, seed=1234)
    first = await asyncio.gather(*(_answer(engine, q, params, f"s{i}") for i, q in enumerate(QUESTIONS[:4])))
    again = await asyncio.gather(*(_answer(engine, q, params, f"t{i}") for i, q in enumerate(QUESTIONS[:4])))
    return {"answers": len(first), "non_empty": sum(bool(a) for a in first), "same_seed_same_text": first == again}


async def load(engine, streams: int, tokens: int, stagger_s: float = 0.0) -> dict:
    params = SamplingParams(do_sample=False, max_new_tokens=tokens, ignore_eos=True)
    ttfts, gaps, produced = [], [], []

    async def one(i: int) -> None:
        await asyncio.sleep(i * stagger_s)
        began, last, n = time.perf_counter(), None, 0
        prompt = f"Request {i}: write a long essay about the number {i * 7919 % 100003} and its history."
        async for chunk in engine.generate([ChatMessage("user", prompt)], params, f"l{streams}-{i}-{stagger_s}"):
            now = time.perf_counter()
            if chunk.delta:
                if last is None:
                    ttfts.append(now - began)
                else:
                    gaps.append(now - last)
                last = now
            if chunk.finish_reason:
                n = chunk.usage.completion_tokens
        produced.append(n)

    began = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(streams)))
    wall = time.perf_counter() - began
    gaps.sort()
    return {"streams": streams, "tokens_each": tokens, "stagger_s": stagger_s, "wall_s": round(wall, 2),
            "tok_s": round(sum(produced) / wall, 1), "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1),
            "ttft_max_ms": round(max(ttfts) * 1000, 1), "itl_p50_ms": round(statistics.median(gaps) * 1000, 2),
            "itl_p99_ms": round(gaps[int(len(gaps) * 0.99) - 1] * 1000, 2)}


def run_on(model: str, precision: str, device: str, levels: list[int], tokens: int, reference,
           fused_step: str = "auto") -> dict:
    engine = build_engine(EngineConfig(model_path=model, device=device, precision=precision, max_num_seqs=max(levels),
                                       fused_step=fused_step))
    try:
        health = engine.health()
        out: dict = {"device": health["device"], "dtype": health["dtype"]}
        answers = asyncio.run(greedy_answers(engine))
        out["answers"] = answers
        if reference is not None:
            same = [a == r for a, r in zip(answers, reference)]
            out["greedy_agreement"] = f"{sum(same)}/{len(same)}"
        out["seeded_sampling"] = asyncio.run(seeded_sampling(engine))
        asyncio.run(load(engine, 4, 16))  # warm-up: kernels, allocator
        out["load"] = [asyncio.run(load(engine, n, tokens)) for n in levels]
        out["staggered"] = asyncio.run(load(engine, max(levels), tokens, stagger_s=0.05))
        return out
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded GGUF")
    parser.add_argument("--make-reference", help="write CPU fp32 greedy answers here and stop")
    parser.add_argument("--reference")
    parser.add_argument("--levels", default="1,8,32,64,128")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--precisions", default="bf16,fp32")
    parser.add_argument("--device", default="cuda", help="cpu runs the same checks here (a dry run of the script)")
    parser.add_argument("--fused-step", default="auto", choices=["auto", "off"])
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.make_reference:
        engine = build_engine(EngineConfig(model_path=args.model, device="cpu", precision="fp32"))
        Path(args.make_reference).write_text(json.dumps(asyncio.run(greedy_answers(engine)), ensure_ascii=False,
                                                        indent=1))
        engine.shutdown()
        return
    import torch

    reference = json.loads(Path(args.reference).read_text()) if args.reference else None
    levels = [int(n) for n in args.levels.split(",")]
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    result = {"gpu": gpu, "torch": torch.__version__, "runs": {}}
    for precision in args.precisions.split(","):
        result["runs"][precision] = run_on(args.model, precision, args.device, levels, args.tokens, reference, args.fused_step)
        print(json.dumps({precision: {k: v for k, v in result["runs"][precision].items() if k != "answers"}}),
              flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
