"""The command line: documented flags, one-line start-up failures, and a real start."""

import os
import subprocess
import sys
import tempfile
import time

import pytest
import requests

from tests.conftest import ROOT, free_port

SERVER = [sys.executable, str(ROOT / "webui" / "webui_server.py")]


def _run(*args, timeout=120, env=None):
    if "--data-dir" not in args:  # the conversation database opens first: never in the checkout's ./data
        args = (*args, "--data-dir", tempfile.mkdtemp(prefix="chatllm-cli-"))
    return subprocess.run(
        [*SERVER, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def test_help_documents_every_flag():
    out = _run("--help").stdout
    for flag in ["--host", "--port", "--model-path", "--model-type", "--precision", "--device",
                 "--max-model-len", "--backend", "--served-model-name", "--token", "--trust-remote-code"]:
        assert flag in out
    assert "qwen2" in out and "llama3" in out and "chatglm3" in out


def _one_line_error(result) -> str:
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return errors[0]


def test_missing_model_path(tmp_path):
    line = _one_line_error(_run("--model-path", str(tmp_path / "nothing-here"), "--knowledge-dir", str(tmp_path / "kb")))
    assert "does not exist" in line and "nothing-here" in line


def test_directory_without_model(tmp_path):
    (tmp_path / "model").mkdir()
    line = _one_line_error(_run("--model-path", str(tmp_path / "model"), "--knowledge-dir", str(tmp_path / "kb")))
    assert "no config.json" in line and str(tmp_path / "model") in line


def test_unreadable_model_file(tmp_path):
    if os.geteuid() == 0:
        # root reads anything: use a file that exists but is not a model
        bad = tmp_path / "broken.gguf"
        bad.write_bytes(b"not a gguf file")
        line = _one_line_error(_run("--model-path", str(bad), "--knowledge-dir", str(tmp_path / "kb")))
        assert "could not load GGUF file" in line and "broken.gguf" in line
    else:
        bad = tmp_path / "secret.gguf"
        bad.write_bytes(b"x")
        bad.chmod(0)
        assert "not readable" in _one_line_error(_run("--model-path", str(bad), "--knowledge-dir", str(tmp_path / "kb")))


def test_hub_id_that_cannot_be_downloaded(tmp_path):
    line = _one_line_error(_run("--model-path", "Qwen/Qwen2-7B-Instruct", "--knowledge-dir", str(tmp_path / "kb")))
    assert "Qwen/Qwen2-7B-Instruct" in line and "could not download" in line


def test_vllm_backend_not_installed(tmp_path):
    line = _one_line_error(_run("--backend", "vllm", "--knowledge-dir", str(tmp_path)))
    assert "vllm" in line and "not installed" in line


def test_unknown_model_type_is_refused_by_argparse():
    result = _run("--model-type", "gpt9")
    assert result.returncode == 2 and "invalid choice: 'gpt9'" in result.stderr


@pytest.mark.slow
def test_real_start_serves_the_embedded_model(tmp_path):
    """`python webui/webui_server.py` from the repository root, as `make run` starts it."""
    port = free_port()
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(
        [*SERVER, "--port", str(port), "--served-model-name", "smol", "--max-model-len", "2048",
         "--data-dir", str(tmp_path / "data")],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, open(tmp_path / "server.log").read()
            try:
                if requests.get(url + "/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        health = requests.get(url + "/health", timeout=5).json()
        assert health["model"] == "smol" and health["engine"]["max_model_len"] == 2048
        answer = requests.post(url, json={"prompt": "What is the capital of France?", "do_sample": False, "max_new_tokens": 20}, timeout=120).json()
        assert "Paris" in answer["response"]
        # conversations are kept by default, in SQLite in the data folder, next to the knowledge bases
        assert health["history"]["database"] == f"sqlite:///{tmp_path / 'data' / 'chat_history.db'}"
        assert (tmp_path / "data" / "chat_history.db").exists() and (tmp_path / "data" / "knowledge").is_dir()
        stored = requests.get(f"{url}/api/sessions/{answer['session_id']}", timeout=10).json()
        assert stored["messages"][1]["content"] == answer["response"]
        log.seek(0)
        printed = log.read()
        assert f"http://127.0.0.1:{port}" in printed
        assert "no --token set" in printed
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_bad_knowledge_settings_fail_fast(tmp_path):
    line = _one_line_error(_run("--chunk-size", "100", "--chunk-overlap", "200", "--knowledge-dir", str(tmp_path)))
    assert "--chunk-overlap" in line
    line = _one_line_error(_run("--embedding-model", str(tmp_path / "no-model"), "--knowledge-dir", str(tmp_path)))
    assert "embedding model path" in line and "does not exist" in line
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Answer: {question}")
    line = _one_line_error(_run("--rag-prompt-file", str(prompt), "--knowledge-dir", str(tmp_path)))
    assert "{context}" in line


def test_bad_history_settings_fail_fast(tmp_path):
    result = _run("--service-name", "Bad-Name", "--data-dir", str(tmp_path))
    assert result.returncode == 2 and "--service-name 'Bad-Name'" in result.stderr and "Traceback" not in result.stderr
    line = _one_line_error(_run("--history-db", "postgresql+psycopg://nobody@127.0.0.1:1/none", "--data-dir", str(tmp_path),
                                timeout=300))
    assert "conversation database" in line and "127.0.0.1:1" in line and "OperationalError" in line
