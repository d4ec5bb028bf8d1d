"""`--backend vllm`: the engine runs as a supervised child process, here any OpenAI-compatible server.

`--engine-command` puts our own `--api-only` server where `vllm serve` would
go, so start-up, readiness, restart after a crash and stop on shutdown are
exercised for real without a GPU.
"""

import os
import signal
import subprocess
import sys
import time

import requests

from tests.conftest import ROOT, free_port
from tests.test_cli import SERVER, _one_line_error, _run


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the front server exited"
        try:
            if requests.get(url + "/health/ready", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise AssertionError("not ready in time")


def _gone(pid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def _ask(url: str) -> requests.Response:
    return requests.post(url, json={"prompt": "What is the capital of France?", "do_sample": False,
                                    "max_new_tokens": 20}, timeout=120)


def test_supervised_engine_starts_restarts_after_a_crash_and_stops_with_the_service(tmp_path):
    engine = (f"{sys.executable} {ROOT / 'webui' / 'webui_server.py'} --api-only --no-history --port {{port}} "
              f"--data-dir {tmp_path / 'engine'}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "front.log", "w")
    front = subprocess.Popen([*SERVER, "--port", str(port), "--api-only", "--no-history", "--data-dir",
                              str(tmp_path / "front"), "--backend", "vllm", "--engine-command", engine],
                             stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    child = None
    try:
        _wait_ready(url, front)
        health = requests.get(url + "/health").json()["engine"]
        assert health["backend"] == "openai" and health["engine_url"].startswith("http://127.0.0.1:")
        child = health["process"]["pid"]
        assert health["process"]["running"] and health["process"]["restarts"] == 0
        assert "Paris" in _ask(url).json()["response"]

        os.kill(child, signal.SIGKILL)  # the engine crashes
        deadline = time.monotonic() + 10
        while requests.get(url + "/health/ready").status_code != 503:
            assert time.monotonic() < deadline, "the front kept saying ready with its engine dead"
            time.sleep(0.2)
        down = _ask(url)
        assert down.status_code == 503 and down.json()["error"]["code"] == "engine_unavailable"

        _wait_ready(url, front)  # restarted by the supervisor
        health = requests.get(url + "/health").json()["engine"]
        assert health["process"]["restarts"] == 1 and health["process"]["pid"] != child
        child = health["process"]["pid"]
        assert "Paris" in _ask(url).json()["response"]
    finally:
        front.send_signal(signal.SIGTERM)
        front.wait(60)
        log.close()
    assert child is not None and _gone(child), "the engine outlived the service"
    output = (tmp_path / "front.log").read_text()
    assert "starting the inference engine" in output and "[engine]" in output  # its output is in our log
    assert "exited with status -9" in output and "restarting" in output


def test_vllm_missing_is_explained(tmp_path):
    line = _one_line_error(_run("--backend", "vllm", "--model-path", "Qwen/Qwen2-7B-Instruct",
                                "--knowledge-dir", str(tmp_path / "kb")))
    assert "pip install vllm" in line and "GPU" in line and "--engine-command" in line


def test_remote_backend_flags_are_checked(tmp_path):
    line = _one_line_error(_run("--backend", "openai", "--knowledge-dir", str(tmp_path / "kb")))
    assert "--engine-url" in line
    line = _one_line_error(_run("--backend", "vllm", "--engine-command", "python -m http.server",
                                "--knowledge-dir", str(tmp_path / "kb")))
    assert "{port}" in line
    dead = f"http://127.0.0.1:{free_port()}/v1"
    line = _one_line_error(_run("--backend", "openai", "--engine-url", dead, "--engine-wait", "1",
                                "--knowledge-dir", str(tmp_path / "kb")))
    assert dead in line and "cannot be reached" in line
