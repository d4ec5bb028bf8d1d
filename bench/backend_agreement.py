"""Greedy answers of the llamacpp backend (F16 and the GGUF's native quantization) against the transformers
backend, on the same prompts built by the same code, and how often each says Paris under the default sampling.

    .venv/bin/python bench/backend_agreement.py [--tokens 32] [--default-tries 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import EngineConfig  # noqa: E402
from engine.factory import build_engine  # noqa: E402
from engine.types import ChatMessage, SamplingParams  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "What is 2 + 2?",
             "Who wrote Romeo and Juliet?", "What is the boiling point of water in Celsius?",
             "Give me a synonym for 'happy'.", "What color is the sky on a clear day?", "How many days are in a week?",
             "What is the largest planet in our solar system?", "Translate 'thank you' into Spanish.",
             "What is the chemical symbol for gold?", "How many legs does a spider have?",
             "What is the opposite of 'cold'?", "Name a fruit that is yellow.", "What is 10 times 3?",
             "Which ocean is the largest?"]


async def answer(engine, question: str, params: SamplingParams, tag: str) -> str:
    return "".join([c.delta async for c in engine.generate([ChatMessage("user", question)], params, tag)])


async def survey(engine, tokens: int, tries: int) -> tuple[list[str], float]:
    greedy = [await answer(engine, q, SamplingParams(max_new_tokens=tokens, do_sample=False), f"g{i}")
              for i, q in enumerate(QUESTIONS)]
    d = engine.generation_defaults
    sampled = SamplingParams(max_new_tokens=tokens, temperature=d.get("temperature", 0.95), top_p=d.get("top_p", 0.8),
                             top_k=d.get("top_k", 30))
    paris = [("Paris" in await answer(engine, QUESTIONS[0], sampled, f"d{i}")) for i in range(tries)]
    return greedy, sum(paris) / tries


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--default-tries", type=int, default=20)
    args = parser.parse_args()
    report = {}
    reference = None
    for label, config in [("transformers", EngineConfig()),
                          ("llamacpp-f16", EngineConfig(backend="llamacpp", gguf_compute="f16", max_num_seqs=4)),
                          ("llamacpp-native", EngineConfig(backend="llamacpp", gguf_compute="native", max_num_seqs=4))]:
        engine = build_engine(config)
        try:
            greedy, paris = asyncio.run(survey(engine, args.tokens, args.default_tries))
        finally:
            engine.shutdown()
        reference = reference or greedy
        same = sum(a.strip() == b.strip() for a, b in zip(greedy, reference))
        report[label] = {"greedy_identical_to_transformers": f"{same}/{len(QUESTIONS)}",
                         "paris_rate_with_defaults": paris, "capital_of_france_greedy": greedy[0]}
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
