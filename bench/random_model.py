"""A model of a real shape with random weights, for throughput measurements where the weights cannot travel.

    python3 bench/random_model.py --tokenizer-dir TOK --out /tmp/smollm2-1.7b-random [--shape smollm2-1.7b]

Speed does not depend on the weights' values (answers are forced to a fixed
length with ignore_eos), so a GPU machine that cannot download a model still
measures the runner at a realistic size. Quality needs real weights: see
bench/gpu_check.py's agreement check with the embedded model.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

# published shapes (config.json of the named model)
SHAPES = {
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True, rope_theta=130000.0,
                         max_position_embeddings=8192),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=49152, tie_word_embeddings=False, rope_theta=500000.0,
                       max_position_embeddings=8192),  # Llama-3-8B's body; the vocabulary is the tokenizer's
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shape", default="smollm2-1.7b", choices=sorted(SHAPES))
    args = parser.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2, **SHAPES[args.shape])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    out = Path(args.out)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (Path(args.tokenizer_dir) / name).exists():
            shutil.copy(Path(args.tokenizer_dir) / name, out / name)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.shape}: {params / 1e9:.2f}B parameters (random), saved to {out}")


if __name__ == "__main__":
    main()
