"""Single-stream tokens/s: POST / on the real server vs bare `model.generate`.

    .venv/bin/python bench/single_stream.py [--tokens 128] [--runs 3]

Runs the two one after the other (never at once) on the same prompt and the
same number of output tokens, and prints one JSON object with both rates and
their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.server_process import running_server  # noqa: E402

PROMPT = "Write a long, detailed essay about the history of the Roman empire."


def measure_server(tokens: int, runs: int) -> tuple[list[float], int]:
    with tempfile.TemporaryDirectory() as kb, running_server(["--knowledge-dir", kb]) as url:
        body = {"prompt": PROMPT, "do_sample": False, "max_new_tokens": tokens}
        requests.post(url, json={**body, "max_new_tokens": 8}, timeout=300)  # warm-up
        rates, produced = [], tokens
        for _ in range(runs):
            started = time.perf_counter()
            reply = requests.post(url, json=body, timeout=600).json()
            elapsed = time.perf_counter() - started
            produced = reply["usage"]["completion_tokens"]
            rates.append(produced / elapsed)
        return rates, produced


def measure_generate(tokens: int, runs: int) -> list[float]:
    import torch

    from engine.config import EngineConfig
    from engine.loader import load_model, resolve_model_source

    model, tokenizer, _ = load_model(resolve_model_source(None), EngineConfig())
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    with torch.inference_mode():
        model.generate(ids, **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8})
        rates = []
        for _ in range(runs):
            started = time.perf_counter()
            out = model.generate(ids, **kwargs)
            rates.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - started))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    server_rates, produced = measure_server(args.tokens, args.runs)
    # the same length for generate as the server actually produced
    generate_rates = measure_generate(produced, args.runs)
    server, bare = statistics.median(server_rates), statistics.median(generate_rates)
    print(json.dumps({
        "output_tokens": produced,
        "post_root_tok_s": round(server, 2),
        "model_generate_tok_s": round(bare, 2),
        "ratio": round(server / bare, 3),
        "runs": {"post_root": [round(r, 2) for r in server_rates], "generate": [round(r, 2) for r in generate_rates]},
    }, indent=2))


if __name__ == "__main__":
    main()
