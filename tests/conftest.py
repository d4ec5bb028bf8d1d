"""Shared fixtures: one engine for the whole session, live servers on real ports."""

from __future__ import annotations

import inspect
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach for a model hub

from api.app import build_app  # noqa: E402
from api.config import ServerConfig  # noqa: E402
from chat import ChatService  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.factory import build_engine  # noqa: E402
from engine.passing_thread import run_in_passing_thread  # noqa: E402
from knowledge.config import KnowledgeConfig  # noqa: E402
from knowledge.embeddings import Embedder, build_embedder  # noqa: E402
from knowledge.service import KnowledgeService  # noqa: E402
from tests import db_servers  # noqa: E402

TOKEN = "test-token-7f3a"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = ROOT / "tests" / "artifacts"
RAG_DEV = ROOT.parent / "shared" / "rag-dev"


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Tests marked `torch_side_thread` run their body in a thread that then ends.

    A test that runs the model or a product in pytest's main thread leaves
    torch's OpenMP helpers alive for the rest of the session, and from then on
    the shared engine's worker ran every step ~1.6x slower
    (engine/passing_thread.py)."""
    if pyfuncitem.get_closest_marker("torch_side_thread") is None or inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    arguments = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    run_in_passing_thread(lambda: pyfuncitem.obj(**arguments), "test-torch-work")
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    ws_url: str
    token: Optional[str]
    app: object

    def headers(self) -> dict[str, str]:
        return {"Authorization": self.token} if self.token else {}


class _ServerThread:
    """uvicorn on its own thread and event loop, with the service's own settings, but in-process."""

    def __init__(self, app, settings: ServerConfig) -> None:
        import uvicorn

        from api.serving import uvicorn_config

        self.server = uvicorn.Server(uvicorn_config(app, settings, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def engine():
    built = build_engine(EngineConfig())
    yield built
    built.shutdown()


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return build_embedder(None)


@pytest.fixture(scope="session")
def knowledge(embedder, tmp_path_factory) -> Iterator[KnowledgeService]:
    service = KnowledgeService(KnowledgeConfig(knowledge_dir=str(tmp_path_factory.mktemp("knowledge"))), embedder)
    yield service
    service.shutdown()


@pytest.fixture(scope="session")
def chat_service(engine, knowledge) -> Iterator[ChatService]:
    from metrics.registry import Metrics

    service = ChatService(engine, knowledge, observer=Metrics(engine.model_name))
    yield service
    service.shutdown()


def serve(chat_service, token: Optional[str], knowledge=None, extra_routers=(), port: Optional[int] = None,
          **settings) -> Iterator[LiveServer]:
    """Serve the given services (on a fresh port unless given) until the generator is closed."""
    from webui.ui import mount_ui

    port = port or free_port()
    config = ServerConfig(token=token, port=port, **settings)
    knowledge = knowledge if knowledge is not None else chat_service.knowledge
    ui = mount_ui(chat_service, knowledge, config.ui_concurrency, knowledge.config.max_upload_mb)
    app = build_app(config, chat_service, knowledge=knowledge, ui=ui, extra_routers=extra_routers)
    with _ServerThread(app, config):
        yield LiveServer(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/", token, app)


@pytest.fixture(scope="session")
def server(chat_service) -> Iterator[LiveServer]:
    """An open server (no token), as `make run` starts it."""
    yield from serve(chat_service, None)


@pytest.fixture(scope="session")
def secured_server(chat_service) -> Iterator[LiveServer]:
    """The same engine behind --token."""
    yield from serve(chat_service, TOKEN)


@pytest.fixture
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def short_context_server(knowledge) -> Iterator[LiveServer]:
    """The embedded model with a 1024-token context, for tests whose prompts fill the context: trimming
    behaves as at 8192 tokens, but a full prompt is read in about 2 s instead of 30 (its converted copy
    loads in under a second)."""
    engine = build_engine(EngineConfig(max_model_len=1024))
    service = ChatService(engine, knowledge)
    yield from serve(service, None)
    service.shutdown()
    engine.shutdown()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


# throwaway database servers, started the first time a test asks for one

@pytest.fixture(scope="session")
def postgres():
    if not db_servers.postgres_available():
        pytest.fail("PostgreSQL 15 is not installed (make test installs it)")
    with db_servers.postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def mariadb_url():
    if not db_servers.mariadb_available():
        pytest.fail("MariaDB is not installed (make test installs it)")
    with db_servers.mariadb_server() as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium for the browser tests (never a downloaded build)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # launch() starts Chromium on a fresh, empty temporary profile
        instance = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield instance
        instance.close()
