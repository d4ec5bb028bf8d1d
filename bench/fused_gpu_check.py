"""The one-pass step against the model's own forward on any device and dtype: logits differences and choices.

    python3 bench/fused_gpu_check.py --model /root/m17 --device cuda --dtype bf16

A padded prefill of two prompts, 12 decode steps, then one pass mixing a
decode step, a newcomer's prompt and the second half of a chunked prompt;
prints the largest logit difference and whether the argmax agrees for each.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.batch import RunningBatch, prefill_inputs  # noqa: E402
from engine.fused_forward import FusedForward, Group  # noqa: E402
from engine.kv_cache import GrowingCache  # noqa: E402


class _Row:
    pass


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    fused, dev, pad = FusedForward(model), args.device, tokenizer.eos_token_id
    report = {}

    def prefill(texts, use_fused):
        prompts = [tokenizer(t)["input_ids"] for t in texts]
        inputs = prefill_inputs(prompts, pad, dev)
        cache = GrowingCache()
        if use_fused:
            logits = fused([Group(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"], cache)])[0]
        else:
            logits = model(**inputs, past_key_values=cache, logits_to_keep=1).logits[:, -1]
        batch = RunningBatch()
        batch.add([_Row() for _ in prompts], cache, inputs["attention_mask"])
        return logits, batch

    def compare(name, want, have):
        report[name] = {"max_abs_diff": float((want.float() - have.float()).abs().max()),
                        "logit_scale": float(want.float().abs().max()),
                        "same_argmax": bool(torch.equal(want.argmax(-1), have.argmax(-1)))}

    texts = ["The capital of France is", "Write a poem about the sea and the sky, with rhymes and feeling"]
    want, theirs = prefill(texts, False)
    have, ours = prefill(texts, True)
    compare("prefill", want, have)
    tokens = want.argmax(-1).tolist()
    worst = None
    for step in range(12):
        w = model(**theirs.step_inputs(tokens)).logits[:, -1]
        inputs = ours.step_inputs(tokens)
        h = fused([Group(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"], ours.cache)])[0]
        compare(f"decode_{step}", w, h)
        worst = max(worst or 0.0, report.pop(f"decode_{step}")["max_abs_diff"])
        tokens = w.argmax(-1).tolist()
    report["decode_12_steps_max_abs_diff"] = worst
    newcomer = tokenizer("Why is the sky blue?")["input_ids"]
    long_prompt = tokenizer("Describe a busy market in the morning, the stalls, the smells and the people.")["input_ids"]
    want_decode = model(**theirs.step_inputs(tokens)).logits[:, -1]
    new_inputs = prefill_inputs([newcomer], pad, dev)
    want_new = model(**new_inputs, past_key_values=GrowingCache(), logits_to_keep=1).logits[:, -1]
    whole = torch.tensor([long_prompt], device=dev)
    want_long = model(input_ids=whole, past_key_values=GrowingCache(), logits_to_keep=1).logits[:, -1]
    half = len(long_prompt) // 2
    chunk_cache = GrowingCache()
    model(input_ids=whole[:, :half], past_key_values=chunk_cache)
    step = ours.step_inputs(tokens)
    have_decode, have_long, have_new = fused([
        Group(step["input_ids"], step["attention_mask"], step["position_ids"], ours.cache),
        Group(whole[:, half:], torch.ones((1, len(long_prompt)), dtype=torch.long, device=dev),
              torch.arange(half, len(long_prompt), device=dev).unsqueeze(0), chunk_cache),
        Group(new_inputs["input_ids"], new_inputs["attention_mask"], new_inputs["position_ids"], GrowingCache()),
    ])
    compare("mixed_decode", want_decode, have_decode)
    compare("mixed_newcomer", want_new, have_new)
    compare("mixed_chunk", want_long, have_long)
    print(json.dumps({"device": str(next(model.parameters()).device), "dtype": args.dtype, **report}, indent=1))


if __name__ == "__main__":
    main()
