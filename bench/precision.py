"""Faster numerics on CPU and what they cost in answers: fp32 vs fp32 with packed weights vs bf16 vs int8.

    .venv/bin/python bench/precision.py                       # every variant, 2 cores
    .venv/bin/python bench/precision.py --variants fp32 fp32-packed fp32-mkl fp32-onednn

For each variant of the embedded model, in this process, one after another:
- speed: the forward pass of one decode step at 1, 8 and 32 rows (KV of 128
  tokens each), and a 256-token prefill, median of several runs;
- quality: greedy answers (48 tokens) to a fixed set of 24 chat prompts,
  compared token by token with fp32's: how many are identical, and the mean
  share of the answer that agrees before the first difference; once one
  prompt at a time and once in batches of 8 (left-padded), where every
  product has 8 rows (the batch sizes a server runs at).

`fp32` is the stock product (`--packed-weights off`); `fp32-packed` keeps
packed weights (`--packed-weights on`, the CPU default), each shape on the
product measured fastest at load; `fp32-mkl` and `fp32-onednn` force one
library's packed product (`--packed-kernel`).

Greedy agreement is the strictest check there is: one flipped near-tie
changes the rest of the answer, so "not identical" does not mean "worse".
The report is printed and written to bench/results/precision.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.server_process import ROOT  # noqa: E402
from engine.batch import prefill_inputs  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.loader import embedded_model_source, load_model  # noqa: E402
from engine.prompting import PromptBuilder  # noqa: E402
from engine.types import ChatMessage  # noqa: E402

PROMPTS = [
    "What is the capital of France?", "Explain how a bicycle works.", "Write a haiku about snow.",
    "Why is the sky blue?", "Give three tips for learning to cook.", "What does a compiler do?",
    "Describe a busy market in the morning.", "How do plants make food?", "What is 12 times 12?",
    "Name three planets in our solar system.", "Write a short story about a lighthouse keeper.",
    "What are the benefits of regular exercise?", "Translate 'good morning' into French.",
    "How does a refrigerator keep food cold?", "What is the difference between weather and climate?",
    "Suggest a name for a pet turtle.", "Explain what a database index is.", "Why do leaves change colour in autumn?",
    "Write a polite email declining a meeting.", "What is photosynthesis?", "How many legs does a spider have?",
    "What is the boiling point of water?", "Describe the rules of chess briefly.", "What is machine learning?",
]
ANSWER_TOKENS = 48


def load(variant: str):
    precision = "bf16" if variant == "bf16" else "fp32"
    kernel = {"fp32-packed": "auto", "fp32-mkl": "mkl", "fp32-onednn": "onednn"}.get(variant)
    # the model's own forward is what is timed here: its projections stay separate (joined ones serve the one-pass step)
    config = EngineConfig(precision=precision, packed_weights="on" if kernel else "off", packed_kernel=kernel or "auto",
                          fused_step="off")
    model, tokenizer, _ = load_model(embedded_model_source(), config)
    if variant == "int8":
        from engine.loader import quantize_int8

        model = quantize_int8(model)
    return model, tokenizer


@torch.inference_mode()
def greedy_answers(model, tokenizer) -> list[list[int]]:
    builder = PromptBuilder(tokenizer, None, [tokenizer.eos_token_id])
    answers = []
    for prompt in PROMPTS:
        ids = torch.tensor([builder.encode_chat([ChatMessage("user", prompt)])])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=ANSWER_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
        answers.append(out[0, ids.shape[1]:].tolist())
    return answers


@torch.inference_mode()
def batched_greedy_answers(model, tokenizer, batch: int = 8) -> list[list[int]]:
    builder = PromptBuilder(tokenizer, None, [tokenizer.eos_token_id])
    answers = []
    for start in range(0, len(PROMPTS), batch):
        encoded = [builder.encode_chat([ChatMessage("user", p)]) for p in PROMPTS[start:start + batch]]
        inputs = prefill_inputs(encoded, tokenizer.eos_token_id, "cpu")  # left-padded, as the runner pads
        width = inputs["input_ids"].shape[1]
        out = model.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=ANSWER_TOKENS,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
        answers += [row[width:].tolist() for row in out]
    return answers


@torch.inference_mode()
def step_times(model, rows: int, past: int = 128, repeats: int = 7) -> float:
    from transformers import DynamicCache

    ids = torch.randint(100, 20000, (rows, past))
    cache = DynamicCache()
    model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    times = []
    for i in range(repeats):
        layers = [(k.clone(), v.clone()) for k, v in ((layer.keys, layer.values) for layer in cache.layers)]
        step_cache = DynamicCache(ddp_cache_data=layers)
        nxt = torch.randint(100, 20000, (rows, 1))
        started = time.perf_counter()
        model(input_ids=nxt, past_key_values=step_cache, use_cache=True, position_ids=torch.full((rows, 1), past))
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


@torch.inference_mode()
def prefill_time(model, tokens: int = 256, repeats: int = 5) -> float:
    from transformers import DynamicCache

    times = []
    for _ in range(repeats):
        ids = torch.randint(100, 20000, (1, tokens))
        started = time.perf_counter()
        model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def agreement(reference: list[list[int]], answers: list[list[int]]) -> dict:
    identical, shares = 0, []
    for ref, got in zip(reference, answers):
        identical += ref == got
        same = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        shares.append(same / max(len(ref), 1))
    return {"identical_answers": f"{identical}/{len(reference)}", "mean_agreeing_prefix": round(statistics.fmean(shares), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["fp32", "fp32-packed", "bf16", "int8"])
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    report, reference, batched_reference = {"threads": torch.get_num_threads(), "variants": {}}, None, None
    for variant in args.variants:
        model, tokenizer = load(variant)
        answers = greedy_answers(model, tokenizer)
        batched = batched_greedy_answers(model, tokenizer)
        if reference is None:
            reference, batched_reference = answers, batched
        row = {
            "decode_step_ms": {rows: round(step_times(model, rows) * 1000, 1) for rows in (1, 8, 32)},
            "prefill_256_ms": round(prefill_time(model) * 1000, 1),
            "vs_first_variant": agreement(reference, answers),
            "vs_first_variant_batched_8": agreement(batched_reference, batched),
            "sample_answer": tokenizer.decode(answers[0]),
        }
        print(variant, json.dumps(row), flush=True)
        report["variants"][variant] = row
        del model
    out = ROOT / "bench" / "results" / "precision.json"
    out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
