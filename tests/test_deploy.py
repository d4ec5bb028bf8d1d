"""deploy/: the compose file's service commands use only flags `--help` documents, and its wiring is consistent."""

from __future__ import annotations

import re
from urllib.parse import urlparse

import yaml

from tests.conftest import ROOT
from tests.test_cli import _run

DEPLOY = ROOT / "deploy"


def _compose() -> dict:
    # ${VAR:?message} stands for a secret given at `docker compose up`
    text = re.sub(r"\$\{[A-Z_]+(:[?-][^}]*)?\}", "secret", (DEPLOY / "docker-compose.yml").read_text())
    return yaml.safe_load(text)


def _flags(command: list[str]) -> dict[str, str]:
    out = {}
    for part in command:
        if part.startswith("--"):
            name, _, value = part.partition("=")
            out[name] = value
    return out


def test_instance_flags_are_the_servers_own():
    compose = _compose()
    documented = set(re.findall(r"--[a-z][a-z0-9-]+", _run("--help").stdout))
    command = compose["services"]["chatllm"]["command"]
    assert command[:2] == ["python", "webui/webui_server.py"]
    flags = _flags(command)
    assert set(flags) <= documented, set(flags) - documented
    # every host a flag names is a service of the file, on the port that service listens on
    services = compose["services"]
    engine = urlparse(flags["--engine-url"])
    assert engine.hostname == "vllm" and "--port=8000" in services["vllm"]["command"] and engine.port == 8000
    assert urlparse(flags["--milvus-uri"]).hostname == "milvus"
    database = urlparse(flags["--history-db"])
    assert database.scheme == "postgresql+psycopg" and database.hostname == "postgres"
    assert database.path.lstrip("/") == services["postgres"]["environment"]["POSTGRES_DB"]
    assert flags["--vector-store"] == "milvus" and flags["--backend"] == "openai"
    served = _flags(services["vllm"]["command"])
    assert flags["--engine-model"] == served["--served-model-name"]


def test_load_balancer_reaches_the_instances_and_hides_metrics():
    nginx = (DEPLOY / "nginx.conf").read_text()
    assert re.search(r"server\s+chatllm:8000;", nginx)
    assert "proxy_buffering off" in nginx and "Upgrade $http_upgrade" in nginx  # streams and the WebSocket
    assert re.search(r"location = /metrics \{\s*return 404;", nginx)
    assert "--metrics-public" in _compose()["services"]["chatllm"]["command"]
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert {job["job_name"] for job in prometheus["scrape_configs"]} == {"chatllm", "vllm"}


def test_images_are_pinned():
    for name, service in _compose()["services"].items():
        if "image" in service:
            assert ":" in service["image"] and not service["image"].endswith(":latest"), name
