"""Single-stream tokens/s: POST / on the real server vs bare `model.generate`.

    .venv/bin/python bench/single_stream.py [--tokens 128] [--runs 5]

Starts the real server (WebUI mounted, as `make run` does) and loads the same
model in this process, then alternates the two, never at once: a greedy
request through POST /, then `model.generate` for the same number of tokens,
`--runs` times. Prints one JSON object with both medians and their ratio.
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


def _server_rate(url: str, body: dict) -> tuple[float, int]:
    started = time.perf_counter()
    reply = requests.post(url, json=body, timeout=600).json()
    produced = reply["usage"]["completion_tokens"]
    return produced / (time.perf_counter() - started), produced


def _generate_rate(model, ids, tokens: int) -> float:
    import torch

    with torch.inference_mode():
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    from engine.config import EngineConfig
    from engine.loader import load_model, resolve_model_source

    model, tokenizer, _ = load_model(resolve_model_source(None), EngineConfig())
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    body = {"prompt": PROMPT, "do_sample": False, "max_new_tokens": args.tokens}
    server_rates, generate_rates = [], []
    with tempfile.TemporaryDirectory() as kb, running_server(["--knowledge-dir", kb]) as url:
        _server_rate(url, {**body, "max_new_tokens": 8})  # warm-up both
        _generate_rate(model, ids, 8)
        # alternate the two so a slow spell of the machine hits both alike; the idle server costs nothing meanwhile
        for _ in range(args.runs):
            rate, produced = _server_rate(url, body)
            server_rates.append(rate)
            generate_rates.append(_generate_rate(model, ids, produced))  # the same length the server produced
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
