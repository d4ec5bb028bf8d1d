"""Write the embedded GGUF model as a plain Hugging Face directory, for `transformers serve`.

    .venv/bin/python bench/convert_gguf_for_peer.py /tmp/smollm2-hf

`transformers serve` cannot take the GGUF file directly (its GGUF-derived
config names no architecture), and `save_pretrained` refuses a GGUF-loaded
model, so the dequantised weights are copied into a fresh LlamaForCausalLM.
Same weights as our server runs, so the comparison is like for like.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import LlamaForCausalLM  # noqa: E402

from engine.config import EngineConfig  # noqa: E402
from engine.loader import load_model, resolve_model_source  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/smollm2-hf")
    model, tokenizer, _ = load_model(resolve_model_source(None), EngineConfig())
    model.config.architectures = ["LlamaForCausalLM"]
    fresh = LlamaForCausalLM(model.config)
    fresh.load_state_dict(model.state_dict())
    fresh.generation_config = model.generation_config
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(out)


if __name__ == "__main__":
    main()
