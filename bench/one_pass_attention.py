"""The one-pass step's decode attention (sdpa's CPU kernel or two plain products) and joined projections: speed, answers.

    .venv/bin/python bench/one_pass_attention.py

In process, embedded model as the server loads it (fp32, packed weights), 2
threads. Three ways: q/k/v and gate/up joined (engine/joined_projections.py)
with decode attention by two plain products (engine/fused_forward.py
`decode_attention`, the default), joined with the model's own sdpa, and the
projections separate (`--fused-step` planning without joining) with plain
products. For each:
- speed: one one-pass decode step at 1, 8 and 32 rows with 180 tokens of KV
  per row (the width a 32-stream benchmark runs at), median of 15;
- answers: greedy answers (48 tokens, cut after the first end-of-answer token)
  to bench/precision.py's 24 prompts, decoded through the one-pass step like
  the scheduler does (one prompt at a time, and 8 left-padded rows at once),
  compared token by token with `model.generate`'s answers one at a time
  (the model's own forward, projections separate).

The report is printed and written to bench/results/one_pass_attention.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.precision import ANSWER_TOKENS, PROMPTS, agreement, greedy_answers  # noqa: E402
from bench.server_process import ROOT  # noqa: E402
from engine.batch import RunningBatch, prefill_inputs  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.fused_forward import FusedForward, Group  # noqa: E402
from engine.kv_cache import GrowingCache, GrowingLayer  # noqa: E402
from engine.loader import embedded_model_source, load_model  # noqa: E402
from engine.prompting import PromptBuilder  # noqa: E402
from engine.types import ChatMessage  # noqa: E402

PAST = 180


def _cut(answer: list[int], eos: int) -> list[int]:
    return answer[:answer.index(eos) + 1] if eos in answer else answer


@torch.inference_mode()
def one_pass_answers(model, tokenizer, fused: FusedForward, batch: int) -> list[list[int]]:
    builder = PromptBuilder(tokenizer, None, [tokenizer.eos_token_id])
    answers: list[list[int]] = []
    for start in range(0, len(PROMPTS), batch):
        encoded = [builder.encode_chat([ChatMessage("user", p)]) for p in PROMPTS[start:start + batch]]
        inputs = prefill_inputs(encoded, tokenizer.eos_token_id, "cpu")
        cache = GrowingCache()
        logits = fused([Group(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"], cache)])[0]
        running = RunningBatch()
        running.add([object() for _ in encoded], cache, inputs["attention_mask"])
        tokens = logits.argmax(-1).tolist()
        out = [[t] for t in tokens]
        for _ in range(ANSWER_TOKENS - 1):
            step = running.step_inputs(tokens)
            logits = fused([Group(step["input_ids"], step["attention_mask"], step["position_ids"], running.cache)])[0]
            tokens = logits.argmax(-1).tolist()
            for row, t in zip(out, tokens):
                row.append(t)
        answers += [_cut(a, tokenizer.eos_token_id) for a in out]
    return answers


@torch.inference_mode()
def step_ms(model, fused: FusedForward, rows: int, repeats: int = 15) -> float:
    config = model.config
    head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    layers = []
    for _ in range(config.num_hidden_layers):
        keys = torch.randn(rows, config.num_key_value_heads, PAST + 64, head_dim)
        layers.append(GrowingLayer.holding(keys, torch.randn_like(keys), PAST))
    cache = GrowingCache.of_layers(layers)
    mask = torch.ones(rows, PAST + 1, dtype=torch.long)
    mask[:rows // 2, :40] = 0  # half the rows shorter, as in a running batch
    positions = mask.sum(1, keepdim=True) - 1
    times = []
    for _ in range(repeats + 2):
        for layer in cache.layers:
            layer.truncate(PAST)
        started = time.perf_counter()
        fused([Group(torch.randint(100, 20000, (rows, 1)), mask, positions, cache)])
        times.append(time.perf_counter() - started)
    return statistics.median(times[2:]) * 1000


def main() -> None:
    torch.set_grad_enabled(False)
    model, tokenizer, _ = load_model(embedded_model_source(), EngineConfig(precision="fp32"))
    separate, _, _ = load_model(embedded_model_source(), EngineConfig(precision="fp32", fused_step="off"))
    eos = tokenizer.eos_token_id
    reference = [_cut(a, eos) for a in greedy_answers(separate, tokenizer)]
    report = {"threads": torch.get_num_threads(), "kv_tokens_per_row": PAST, "ways": {}}
    for name, products, weights in (("joined, products", True, model), ("joined, sdpa", False, model),
                                    ("separate, products", True, separate)):
        fused = FusedForward(weights, decode_products=products)
        row = {
            "decode_step_ms": {rows: round(step_ms(weights, fused, rows), 1) for rows in (1, 8, 32)},
            "vs_generate_alone": agreement(reference, one_pass_answers(weights, tokenizer, fused, 1)),
            "vs_generate_batched_8": agreement(reference, one_pass_answers(weights, tokenizer, fused, 8)),
        }
        print(name, json.dumps(row), flush=True)
        report["ways"][name] = row
    out = ROOT / "bench" / "results" / "one_pass_attention.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
