"""How long choosing the next tokens takes for a batch of rows, with real logits.

    .venv/bin/python bench/sampling_speed.py

In process, embedded model, 2 threads. The logits are the model's own for
the next token after 32 chat prompts; `engine.sampling.sample_batch` picks
one token per row for 1, 8 and 32 rows under three settings: the embedded
model's defaults (temperature 0.2, top_p 0.5), the EAS protocol's defaults
(temperature 0.95, top_k 30, top_p 0.8) and serve_bench.py's (temperature
0.8, top_p 0.95). Median of 30 calls after 3 warm-up calls; written to
bench/results/sampling_speed.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.precision import PROMPTS  # noqa: E402
from bench.server_process import ROOT  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.loader import embedded_model_source, load_model  # noqa: E402
from engine.prompting import PromptBuilder  # noqa: E402
from engine.sampling import make_generator, sample_batch  # noqa: E402
from engine.types import ChatMessage, SamplingParams  # noqa: E402

SETTINGS = {
    "embedded model (t 0.2, top_p 0.5)": SamplingParams(temperature=0.2, top_p=0.5, top_k=0),
    "EAS (t 0.95, top_k 30, top_p 0.8)": SamplingParams(temperature=0.95, top_k=30, top_p=0.8),
    "serve_bench (t 0.8, top_p 0.95)": SamplingParams(temperature=0.8, top_p=0.95, top_k=0),
}


def main() -> None:
    torch.set_grad_enabled(False)
    model, tokenizer, _ = load_model(embedded_model_source(), EngineConfig())
    builder = PromptBuilder(tokenizer, None, [tokenizer.eos_token_id])
    rows = []
    for prompt in (PROMPTS * 2)[:32]:
        ids = torch.tensor([builder.encode_chat([ChatMessage("user", prompt)])])
        rows.append(model(input_ids=ids, logits_to_keep=1).logits[0, -1])
    logits = torch.stack(rows)
    report = {"threads": torch.get_num_threads(), "ms": {}}
    for name, params in SETTINGS.items():
        report["ms"][name] = {}
        for count in (1, 8, 32):
            generators = [make_generator(i) for i in range(count)]
            batch = logits[:count]
            times = []
            for i in range(33):
                started = time.perf_counter()
                sample_batch(batch, [params] * count, generators)
                if i >= 3:
                    times.append(time.perf_counter() - started)
            report["ms"][name][count] = round(statistics.median(times) * 1000, 2)
        print(name, json.dumps(report["ms"][name]), flush=True)
    out = ROOT / "bench" / "results" / "sampling_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
