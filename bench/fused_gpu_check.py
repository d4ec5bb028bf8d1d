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
from tests.test_fused_step import one_pass_against_forward  # noqa: E402


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
    report: dict = {"device": str(next(model.parameters()).device), "dtype": args.dtype}
    worst_decode = 0.0
    for name, want, have, _ in one_pass_against_forward(model, tokenizer, args.device):
        diff = float((want.float() - have.float()).abs().max())
        same = bool(torch.equal(want.argmax(-1), have.argmax(-1)))
        if name.startswith("decode_"):
            worst_decode = max(worst_decode, diff)
            report["decode_12_steps_same_argmax"] = report.get("decode_12_steps_same_argmax", True) and same
            continue
        report[name] = {"max_abs_diff": diff, "logit_scale": float(want.float().abs().max()), "same_argmax": same}
    report["decode_12_steps_max_abs_diff"] = worst_decode
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
