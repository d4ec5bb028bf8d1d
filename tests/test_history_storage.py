"""The conversation store itself: migrations, retention, bounds, outages, shutdown, two instances, OTLP."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest
import sqlalchemy as sa

from history import Exchange, HistoryConfig, HistoryService, migrate
from history.repository import HistoryRepository
from tests.conftest import ROOT, free_port
from tests.db_servers import postgres_server
from tests.history_fixtures import serve_with_history


def exchange(session: str, user: str = "u", question: str = "Q?", answer: str = "A.") -> Exchange:
    return Exchange(session_id=session, user_id=user, question=question, answer=answer, finish_reason="stop",
                    trace_id=None, details={"status": "complete"})


def sid() -> str:
    return uuid.uuid4().hex


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_an_upgrade_from_the_previous_revision_keeps_the_data(kind, tmp_path, request):
    url = f"sqlite:///{tmp_path / 'h.db'}" if kind == "sqlite" else request.getfixturevalue("postgres").url
    suffix = "m" + uuid.uuid4().hex[:8]
    engine = sa.create_engine(url)
    migrate.upgrade(engine, suffix, "0001")  # as a server of the previous version left it
    assert migrate.current_revision(engine, suffix) == "0001"
    names = sa.inspect(engine).get_table_names()
    assert f"chat_trace_{suffix}" not in names and f"chat_session_{suffix}" in names
    with engine.begin() as c:
        c.execute(sa.text(f"INSERT INTO chat_session_{suffix} (id, user_id, title, created_at, updated_at) "
                          "VALUES ('s1', 'alice', 'Old chat', :t, :t)"), {"t": "2026-01-01 10:00:00"})
        c.execute(sa.text(f"INSERT INTO chat_history_{suffix} (session_id, role, content, created_at) VALUES "
                          "('s1', 'user', 'Hello from before', :t), ('s1', 'assistant', 'Hi!', :t)"),
                  {"t": "2026-01-01 10:00:00"})
    # a server of this version starts on it: the schema is upgraded at start-up
    service = HistoryService(HistoryConfig(service_name=suffix, history_max_age_days=0), url)
    service.start()
    try:
        assert migrate.current_revision(engine, suffix) == migrate.head_revision() == "0002"
        session = service.repo.get_session("s1", "alice")
        assert session["title"] == "Old chat" and session["pinned"] is False
        assert [m["content"] for m in session["messages"]] == ["Hello from before", "Hi!"]
        assert service.repo.recent_turns("s1", "alice", 10) == [("Hello from before", "Hi!")]
        service.repo.add_exchange(exchange("s1", "alice"))
        assert len(service.repo.get_session("s1", "alice")["messages"]) == 4
    finally:
        service.shutdown()
        engine.dispose()


def test_sqlite_runs_in_wal_mode_in_the_data_folder(tmp_path):
    config = HistoryConfig()
    url = config.database_url(str(tmp_path / "data"))
    assert url.endswith("data/chat_history.db")
    service = HistoryService(config, url)
    service.start()
    try:
        with service.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert (tmp_path / "data" / "chat_history.db").exists()
    finally:
        service.shutdown()


def test_two_services_share_one_database_through_their_table_suffixes(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    a, b = (HistoryService(HistoryConfig(service_name=n), url) for n in ("alpha", "beta"))
    for s in (a, b):
        s.start()
    try:
        a.repo.add_exchange(exchange("s" * 32))
        assert a.repo.list_sessions("u", 10)["sessions"] and not b.repo.list_sessions("u", 10)["sessions"]
        assert {"chat_session_alpha", "chat_session_beta", "alembic_version_alpha"} <= set(sa.inspect(a.engine).get_table_names())
    finally:
        a.shutdown()
        b.shutdown()


def test_retention_by_age_and_per_user_cap_spares_pinned_sessions(tmp_path):
    service = HistoryService(HistoryConfig(), f"sqlite:///{tmp_path / 'h.db'}")
    service.start()
    repo, t = service.repo, service.repo.t
    try:
        ids = [f"{i:02d}" + "x" * 30 for i in range(6)]
        for i, session in enumerate(ids):
            repo.add_exchange(exchange(session, "dana", question=f"question {i}"))
            time.sleep(0.002)
        repo.update_session(ids[0], "dana", None, True)  # the oldest, but pinned
        with service.engine.begin() as c:  # one session untouched for 400 days
            c.execute(t.sessions.update().where(t.sessions.c.id == ids[1])
                      .values(updated_at=sa.func.datetime("now", "-400 days")))
        removed = repo.prune(max_age_days=365, max_sessions_per_user=3)
        left = [s["id"] for s in repo.list_sessions("dana", 10)["sessions"]]
        # 1 too old; then 3 kept: the pinned one and the two newest
        assert removed == 3 and left == [ids[5], ids[4], ids[0]]
        with service.engine.connect() as c:  # their messages went with them
            assert c.execute(sa.select(sa.func.count()).select_from(t.messages)).scalar() == 2 * len(left)
    finally:
        service.shutdown()


def test_a_message_past_the_size_bound_is_stored_cut_and_marked(tmp_path):
    service = HistoryService(HistoryConfig(history_max_message_chars=100), f"sqlite:///{tmp_path / 'h.db'}")
    service.start()
    try:
        service.repo.add_exchange(exchange("b" * 32, question="q" * 500, answer="a" * 50))
        user, assistant = service.repo.get_session("b" * 32, "u")["messages"]
        assert user["content"] == "q" * 100 and user["truncated"] is True
        assert assistant["content"] == "a" * 50 and "truncated" not in assistant
    finally:
        service.shutdown()


def test_writes_in_flight_land_before_a_clean_shutdown(tmp_path):
    url = f"sqlite:///{tmp_path / 'h.db'}"
    service = HistoryService(HistoryConfig(history_threads=1), url)
    service.start()
    for i in range(50):
        service.record_later(exchange(f"{i:03d}" + "z" * 29), None)
    service.shutdown()  # returns once all 50 are written
    repo = HistoryRepository(sa.create_engine(url), "chatllm")
    assert len(repo.list_sessions("u", 100)["sessions"]) == 50


def test_a_database_outage_degrades_to_answers_without_history(engine, knowledge):
    with postgres_server() as pg:
        for live, history in serve_with_history(engine, knowledge, pg.url):
            session = "o" * 40
            with httpx.Client(base_url=live.url, timeout=120) as api:
                body = {"prompt": "Say hi.", "max_new_tokens": 4, "temperature": 0}
                assert api.post("/", json=body, headers={"X-Session-Id": session}).status_code == 200
                pg.stop()
                r = api.post("/", json=body, headers={"X-Session-Id": session})
                assert r.status_code == 200 and r.json()["response"]  # answered, without its history
                health = api.get("/health").json()
                assert health["status"] == "degraded" and health["history"]["status"] == "degraded"
                assert "OperationalError" in health["history"]["error"]
                listed = api.get("/api/sessions")
                assert listed.status_code == 503 and listed.json()["error"]["code"] == "history_unavailable"
                pg.start()
                assert api.post("/", json=body, headers={"X-Session-Id": session}).status_code == 200
                assert api.get("/health").json()["status"] == "ok"
                # the turns written before the outage and after it are there; the one during it is not
                assert len(api.get(f"/api/sessions/{session}").json()["messages"]) == 4


def _start_instance(port: int, url: str, data_dir) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "webui" / "webui_server.py"), "--api-only", "--port", str(port),
         "--history-db", url, "--data-dir", str(data_dir), "--log-level", "warning"],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_ready(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(process.stderr.read().decode()[-2000:])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("instance did not start")


def test_two_instances_on_one_postgresql_database_continue_each_others_conversations(postgres, tmp_path):
    """Two server processes start together on an empty database (one upgrades it, the other waits its turn);
    turn 1 goes to the first, turn 2 to the second, and the second answer is made with turn 1."""
    ports = [free_port(), free_port()]
    processes = [_start_instance(p, postgres.url.replace("/chatllm", "/chatllm"), tmp_path / f"d{i}")
                 for i, p in enumerate(ports)]
    try:
        for port, process in zip(ports, processes):
            _wait_ready(port, process)
        a, b = (f"http://127.0.0.1:{p}" for p in ports)
        session, greedy = "two-" + uuid.uuid4().hex, {"temperature": 0, "max_new_tokens": 12}
        first = httpx.post(a, json={"prompt": "My cat is called Miso.", **greedy},
                           headers={"X-Session-Id": session}, timeout=120).json()
        second = httpx.post(b, json={"prompt": "What is my cat called?", **greedy},
                            headers={"X-Session-Id": session}, timeout=120).json()
        explicit = httpx.post(b, json={"prompt": "What is my cat called?", **greedy,
                                       "history": [["My cat is called Miso.", first["response"]]]}, timeout=120).json()
        assert second["response"] == explicit["response"]
        assert second["usage"]["prompt_tokens"] == explicit["usage"]["prompt_tokens"]
        stored = httpx.get(f"{a}/api/sessions/{session}").json()["messages"]
        assert [m["content"] for m in stored if m["role"] == "user"] == ["My cat is called Miso.", "What is my cat called?"]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=60)


class _OtlpReceiver(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP trace receiver: decodes each protobuf ExportTraceServiceRequest it is sent."""

    received: list = []

    def do_POST(self) -> None:  # noqa: N802
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        type(self).received.append((self.path, self.headers.get("Content-Type"), request))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_traces_are_exported_over_otlp_with_genai_attributes(engine, knowledge, tmp_path):
    _OtlpReceiver.received = []
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OtlpReceiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{receiver.server_address[1]}/v1/traces"
    try:
        for live, history in serve_with_history(engine, knowledge, f"sqlite:///{tmp_path / 'h.db'}",
                                                otlp_endpoint=endpoint):
            r = httpx.post(live.url + "/run", json={"question": "Say yes.", "max_new_tokens": 5, "temperature": 0},
                           headers={"X-User-Id": "erin"}, timeout=120).json()
            history.exporter._provider.force_flush()
        spans = {}
        for path, content_type, request in _OtlpReceiver.received:
            assert path == "/v1/traces" and content_type == "application/x-protobuf"
            for resource_spans in request.resource_spans:
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        spans[span.name] = (span, {a.key: a.value for a in span.attributes})
        assert spans, "nothing reached the receiver"
        root, root_attrs = next(v for k, v in spans.items() if k.startswith("chat "))
        assert root.trace_id.hex() == r["trace_id"]
        assert root_attrs["gen_ai.operation.name"].string_value == "chat"
        assert root_attrs["session.id"].string_value == r["session_id"] and root_attrs["user.id"].string_value == "erin"
        generation, attrs = spans["generation"]
        assert generation.parent_span_id == root.span_id
        assert attrs["gen_ai.usage.output_tokens"].int_value == r["usage"]["completion_tokens"]
        assert attrs["gen_ai.request.max_tokens"].int_value == 5
        assert list(attrs["gen_ai.response.finish_reasons"].array_value.values)[0].string_value == r["finish_reason"]
        assert {"prompt", "generation"} <= set(spans)
    finally:
        receiver.shutdown()
