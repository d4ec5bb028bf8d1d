"""Conversations kept on the server (SQLite, PostgreSQL, MariaDB): sessions and users on every surface, the
application-flow API, the history API and traces, with real clients."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest
import requests
import websockets.sync.client
from openai import OpenAI

from tests.history_fixtures import database_url, serve_with_history

# the same suite on every supported database, each a real server started here
DATABASES = ["sqlite", "postgresql", "mysql"]

GREEDY = {"temperature": 0, "do_sample": False, "max_new_tokens": 12}


@pytest.fixture(scope="module", params=DATABASES)
def hist(request, engine, knowledge, tmp_path_factory):
    # each database gets its own tables (suffix), so runs never see each other's rows
    url = database_url(request, request.param, tmp_path_factory)
    yield from serve_with_history(engine, knowledge, url, service_name=f"t{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def hist_sqlite(engine, knowledge, tmp_path_factory):
    """For what does not depend on the database (wire formats, clients): SQLite only.

    Answers without max_new_tokens (the seed scripts send none) stop at 48 tokens here, not 512."""
    from chat import ChatLimits

    yield from serve_with_history(engine, knowledge, database_url(None, "sqlite", tmp_path_factory),
                                  limits=ChatLimits(default_max_new_tokens=48))


@pytest.fixture
def api(hist):
    live, _ = hist
    with httpx.Client(base_url=live.url, timeout=120) as c:
        yield c


@pytest.fixture
def api_sqlite(hist_sqlite):
    live, _ = hist_sqlite
    with httpx.Client(base_url=live.url, timeout=120) as c:
        yield c


def sid() -> str:
    return "t-" + uuid.uuid4().hex


def ask(api, prompt, session=None, user=None, **fields):
    headers = {}
    if session:
        headers["X-Session-Id"] = session
    if user:
        headers["X-User-Id"] = user
    return api.post("/", json={"prompt": prompt, **GREEDY, **fields}, headers=headers)


def test_a_session_is_made_and_named_in_the_response_header(api):
    r = ask(api, "Say hello.")
    assert r.status_code == 200
    made = r.headers["X-Session-Id"]
    assert len(made) >= 32 and r.json()["session_id"] == made
    assert r.json()["trace_id"] and r.json()["answer"] == r.json()["response"]
    stored = api.get(f"/api/sessions/{made}").json()
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"]
    assert stored["messages"][1]["content"] == r.json()["answer"]
    assert stored["title"] == "Say hello."


@pytest.mark.parametrize("bad", ["short", "x" * 256, "a" * 31, "has space " + "a" * 30, "ünïcode" + "a" * 30])
def test_a_malformed_session_id_is_a_400_naming_the_header(api_sqlite, bad):
    r = api_sqlite.post("/", json={"prompt": "hi"}, headers={"X-Session-Id": bad.encode("utf-8")})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "X-Session-Id" and "32-255" in r.json()["error"]["message"]


def test_the_stored_turns_are_the_history_of_the_next_turn(api):
    session = sid()
    first = ask(api, "My favourite colour is green. Remember it.", session).json()["answer"]
    second = ask(api, "What is my favourite colour?", session).json()
    # the same question with the first turn sent explicitly, no session: greedy, so the same prompt gives the same answer
    explicit = ask(api, "What is my favourite colour?",
                   history=[["My favourite colour is green. Remember it.", first]]).json()
    alone = ask(api, "What is my favourite colour?", history=[]).json()
    assert second["answer"] == explicit["answer"]
    assert second["usage"]["prompt_tokens"] == explicit["usage"]["prompt_tokens"] > alone["usage"]["prompt_tokens"]
    trace = api.get(f"/api/traces/{second['trace_id']}").json()
    load = next(s for s in trace["spans"] if s["name"] == "history.load")
    assert load["attributes"]["turns"] == 1


def test_an_explicit_history_wins_and_is_not_merged(api):
    session = sid()
    ask(api, "Remember the number 42.", session)
    with_empty = ask(api, "Which number?", session, history=[]).json()
    alone = ask(api, "Which number?", history=[]).json()
    assert with_empty["usage"]["prompt_tokens"] == alone["usage"]["prompt_tokens"]


def test_another_user_gets_404_for_a_session_on_every_route(api, hist):
    live, _ = hist
    session = sid()
    assert ask(api, "Hello, I am Alice.", session, user="alice").status_code == 200
    bob = {"X-User-Id": "bob", "X-Session-Id": session}
    assert api.post("/", json={"prompt": "hi"}, headers=bob).status_code == 404
    assert api.post("/run", json={"question": "hi"}, headers=bob).status_code == 404
    assert api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                    headers=bob).status_code == 404
    for method, path in [("GET", f"/api/sessions/{session}"), ("PATCH", f"/api/sessions/{session}"),
                         ("DELETE", f"/api/sessions/{session}"), ("GET", f"/api/sessions/{session}/export"),
                         ("GET", f"/api/sessions/{session}/traces")]:
        r = api.request(method, path, headers={"X-User-Id": "bob"}, json={"title": "x"} if method == "PATCH" else None)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "session_not_found"
    assert session not in json.dumps(api.get("/api/sessions", headers={"X-User-Id": "bob"}).json())
    with pytest.raises(websockets.exceptions.ConnectionClosed):
        with websockets.sync.client.connect(live.ws_url, additional_headers=bob) as ws:
            ws.send(json.dumps({"prompt": "hi", "max_new_tokens": 4}))
            frames = [ws.recv(timeout=60) for _ in range(2)]
            assert "session_not_found" in frames[0]
            raise websockets.exceptions.ConnectionClosedOK(None, None)
    # alice still has it, untouched
    assert len(api.get(f"/api/sessions/{session}", headers={"X-User-Id": "alice"}).json()["messages"]) == 2


def test_application_flow_json_with_the_seed_script(hist_sqlite):
    """The documentation's requests script, as written (endpoint and token substituted)."""
    live, _ = hist_sqlite
    url, token = live.url, "unused-token"
    data = {"question": "who are u?"}
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    response = requests.post(url, json=data, headers=headers)
    assert response.status_code == 200
    body = json.loads(response.text)
    assert body["answer"] and body["session_id"] == response.headers["X-Session-Id"] and body["trace_id"]


def test_application_flow_sse_with_the_seed_script(hist_sqlite):
    live, _ = hist_sqlite
    url, token = live.url, "unused-token"
    data = {"question": "who are u?"}
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream", "Content-Type": "application/json"}
    lines = []
    with requests.post(url, json=data, headers=headers, stream=True) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines(chunk_size=1024):
            lines.append(line)
    events = [json.loads(line[len(b"data: "):]) for line in lines if line.startswith(b"data: ")]
    assert len(events) >= 3 and all(set(e) == {"answer"} for e in events[:-1])
    done = events[-1]
    assert done["done"] is True and done["finish_reason"] in ("stop", "length")
    assert done["session_id"] == r.headers["X-Session-Id"] and done["trace_id"]
    assert done["usage"]["completion_tokens"] >= len(events) - 1
    answer = "".join(e["answer"] for e in events[:-1])
    stored = requests.get(f"{url}/api/sessions/{done['session_id']}").json()
    assert stored["messages"][1]["content"] == answer


def test_run_returns_the_trace_with_every_step(api_sqlite):
    session = sid()
    ask(api_sqlite, "Name a fruit.", session)
    r = api_sqlite.post("/run", json={"question": "Name another fruit.", **GREEDY}, headers={"X-Session-Id": session})
    body = r.json()
    assert r.status_code == 200 and body["answer"] and body["session_id"] == session
    trace = body["trace"]
    assert trace["id"] == body["trace_id"]
    names = [s["name"] for s in trace["spans"]]
    assert names == ["history.load", "prompt", "generation"]
    for span in trace["spans"]:
        assert set(span) == {"name", "start", "duration_ms", "attributes"} and span["duration_ms"] >= 0
    generation = trace["spans"][2]["attributes"]
    assert generation["temperature"] == 0 and generation["max_new_tokens"] == 12
    assert generation["completion_tokens"] == body["usage"]["completion_tokens"] and generation["ttft_ms"] > 0
    assert trace["spans"][1]["attributes"]["prompt_tokens"] == body["usage"]["prompt_tokens"]
    # the same trace is stored and listed with the session
    assert api_sqlite.get(f"/api/traces/{trace['id']}").json() == trace
    assert trace in api_sqlite.get(f"/api/sessions/{session}/traces").json()["traces"]


def test_run_streams_sse_with_the_trace_last(api_sqlite):
    with api_sqlite.stream("POST", "/run", json={"question": "Count to three.", **GREEDY},
                    headers={"Accept": "text/event-stream"}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1]["done"] and [s["name"] for s in events[-1]["trace"]["spans"]] == ["prompt", "generation"]


def test_eas_stream_and_plain_text_bodies_keep_the_session(api_sqlite):
    session = sid()
    r = api_sqlite.post("/", content="Hello there", headers={"X-Session-Id": session, "Content-Type": "text/plain"})
    assert r.status_code == 200 and r.headers["X-Session-Id"] == session
    with api_sqlite.stream("POST", "/", json={"prompt": "And again.", "use_stream_chat": True, **GREEDY},
                    headers={"X-Session-Id": session}) as s:
        frames = [json.loads(f) for f in s.read().split(b"\0") if f]
    assert frames[-1]["session_id"] == session and frames[-1]["trace_id"]
    assert len(api_sqlite.get(f"/api/sessions/{session}").json()["messages"]) == 4


def test_a_stopped_answer_is_stored_as_stopped_and_an_error_stores_nothing(api):
    session = sid()
    with api.stream("POST", "/", json={"prompt": "Write a long story about the sea.", "use_stream_chat": True,
                                       "max_new_tokens": 400, "temperature": 0}, headers={"X-Session-Id": session}) as s:
        for chunk in s.iter_bytes():
            if b"\0" in chunk:
                break  # the client leaves mid-answer
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # a stopped answer is written after its client has gone
        r = api.get(f"/api/sessions/{session}")
        if r.status_code == 200 and len(r.json()["messages"]) >= 2:
            break
        time.sleep(0.2)
    assert r.status_code == 200 and len(r.json()["messages"]) == 2, (r.status_code, r.text[:2000])
    answer = r.json()["messages"][1]
    assert answer["status"] == "stopped", (answer["usage"], answer["timings"], answer["finish_reason"])
    assert answer["finish_reason"] == "stopped" and answer["content"]
    assert answer["usage"]["completion_tokens"] < 400

    failed = sid()
    r = ask(api, "word " * 9000, failed)  # longer than the context: 400 before any answer
    assert r.status_code == 400
    assert api.get(f"/api/sessions/{failed}").status_code == 404


def test_openai_sessions_and_store_false(hist_sqlite):
    live, _ = hist_sqlite
    session = sid()
    client = OpenAI(base_url=live.url + "/v1", api_key="unused", default_headers={"X-Session-Id": session})
    msg = [{"role": "user", "content": "My dog is called Rex."}]
    raw = client.chat.completions.with_raw_response.create(model="", messages=msg, max_tokens=10, temperature=0)
    assert raw.headers["X-Session-Id"] == session
    first = raw.parse().choices[0].message.content
    second = client.chat.completions.create(model="", messages=[{"role": "user", "content": "What is my dog called?"}],
                                            max_tokens=10, temperature=0)
    explicit = client.chat.completions.create(model="", max_tokens=10, temperature=0, messages=[
        *msg, {"role": "assistant", "content": first}, {"role": "user", "content": "What is my dog called?"}])
    assert second.choices[0].message.content == explicit.choices[0].message.content
    assert second.usage.prompt_tokens == explicit.usage.prompt_tokens
    # explicit messages are not merged with the stored turns, and store: false keeps nothing
    stored_before = len(httpx.get(f"{live.url}/api/sessions/{session}").json()["messages"])
    stream = client.chat.completions.create(model="", messages=[{"role": "user", "content": "Bye."}], max_tokens=4,
                                            stream=True, store=False)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert len(httpx.get(f"{live.url}/api/sessions/{session}").json()["messages"]) == stored_before == 6


def test_websocket_session_in_the_upgrade_and_the_first_reply(hist_sqlite):
    live, _ = hist_sqlite
    with websockets.sync.client.connect(live.ws_url) as ws:
        made = ws.response.headers["X-Session-Id"]
        ws.send(json.dumps({"prompt": "I live in Lisbon.", **GREEDY}))
        frames = []
        while (frame := ws.recv(timeout=60)) != "<EOS>":
            frames.append(frame)
        assert json.loads(frames[-1]) == {"session_id": made}
    # a new connection naming the session continues it
    with websockets.sync.client.connect(live.ws_url, additional_headers={"X-Session-Id": made}) as ws:
        assert ws.response.headers["X-Session-Id"] == made
        ws.send(json.dumps({"prompt": "Where do I live?", **GREEDY}))
        while ws.recv(timeout=60) != "<EOS>":
            pass
    messages = httpx.get(f"{live.url}/api/sessions/{made}").json()["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["I live in Lisbon.", "Where do I live?"]
    trace = httpx.get(f"{live.url}/api/traces/{messages[-1]['trace_id']}").json()
    prompt = next(s for s in trace["spans"] if s["name"] == "prompt")
    assert prompt["attributes"]["turns_given"] == 3  # the stored turn came along


def test_history_api_list_search_rename_pin_export_delete(api):
    user = {"X-User-Id": "carol-" + uuid.uuid4().hex[:8]}
    ids = []
    for question in ["Tell me about volcanoes.", "How do bees make honey?", "What is a quasar?"]:
        r = api.post("/", json={"prompt": question, **GREEDY}, headers=user)
        ids.append(r.headers["X-Session-Id"])
    listed = api.get("/api/sessions", headers=user).json()
    assert [s["id"] for s in listed["sessions"]] == ids[::-1] and listed["next_cursor"] is None
    assert listed["sessions"][0]["title"] == "What is a quasar?"
    page1 = api.get("/api/sessions", params={"limit": 2}, headers=user).json()
    page2 = api.get("/api/sessions", params={"limit": 2, "cursor": page1["next_cursor"]}, headers=user).json()
    assert [s["id"] for s in page1["sessions"] + page2["sessions"]] == ids[::-1] and page2["next_cursor"] is None
    assert api.get("/api/sessions", params={"cursor": "garbage"}, headers=user).status_code == 400
    # q searches titles and message text, case-insensitively
    assert [s["id"] for s in api.get("/api/sessions", params={"q": "HONEY"}, headers=user).json()["sessions"]] == [ids[1]]
    answer_word = api.get(f"/api/sessions/{ids[0]}", headers=user).json()["messages"][1]["content"].split()[0]
    assert ids[0] in [s["id"] for s in api.get("/api/sessions", params={"q": answer_word}, headers=user).json()["sessions"]]
    assert api.get("/api/sessions", params={"q": "100%_"}, headers=user).json()["sessions"] == []

    r = api.patch(f"/api/sessions/{ids[0]}", json={"title": "Volcanoes", "pinned": True}, headers=user)
    assert r.json()["title"] == "Volcanoes" and r.json()["pinned"] is True
    assert api.patch(f"/api/sessions/{ids[0]}", json={}, headers=user).status_code == 400
    assert api.patch(f"/api/sessions/{ids[0]}", json={"title": ""}, headers=user).status_code == 400

    md = api.get(f"/api/sessions/{ids[0]}/export", params={"format": "markdown"}, headers=user)
    assert md.headers["content-type"].startswith("text/markdown") and md.text.startswith("# Volcanoes")
    assert "Tell me about volcanoes." in md.text
    js = api.get(f"/api/sessions/{ids[0]}/export", params={"format": "json"}, headers=user).json()
    assert js["id"] == ids[0] and len(js["messages"]) == 2
    assert api.get(f"/api/sessions/{ids[0]}/export", params={"format": "pdf"}, headers=user).status_code == 400
    everything = api.get("/api/sessions/export", headers=user).json()["sessions"]
    assert sorted(s["id"] for s in everything) == sorted(ids)

    assert api.delete(f"/api/sessions/{ids[1]}", headers=user).status_code == 200
    assert api.get(f"/api/sessions/{ids[1]}", headers=user).status_code == 404
    assert api.delete("/api/sessions", headers=user).json() == {"deleted": 2}
    assert api.get("/api/sessions", headers=user).json()["sessions"] == []


def test_every_history_route_is_in_openapi(api_sqlite):
    paths = api_sqlite.get("/openapi.json").json()["paths"]
    for path in ["/api/sessions", "/api/sessions/{session_id}", "/api/sessions/{session_id}/export",
                 "/api/sessions/export", "/api/sessions/{session_id}/traces", "/api/traces/{trace_id}", "/run"]:
        assert path in paths, path
    assert {"get", "patch", "delete"} <= set(paths["/api/sessions/{session_id}"])
    assert {"get", "delete"} <= set(paths["/api/sessions"])


def test_health_reports_the_store(api_sqlite):
    health = api_sqlite.get("/health").json()
    assert health["status"] == "ok"


def test_webui_user_is_the_login_name_or_one_id_per_browser():
    from types import SimpleNamespace

    from api.sessions import COOKIE, SessionSigner
    from webui.ui.conversations import WebUsers, login_user_id

    signer = SessionSigner("tok", 3600)
    users = WebUsers(signer)
    logged_in = SimpleNamespace(cookies={COOKIE: signer.issue(user="dana")})
    assert users.identify(logged_in, {})[0] == "dana"
    assert users.identify(SimpleNamespace(cookies={COOKIE: signer.issue(user="Zoë K")}), {})[0] == login_user_id("Zoë K")
    assert login_user_id("Zoë K").startswith("login-") and login_user_id("Zoë K") != login_user_id("Zoe K")
    # a forged or expired cookie is no login
    forged = SimpleNamespace(cookies={COOKIE: SessionSigner("other", 3600).issue(user="dana")})
    user, browser = users.identify(forged, {})
    assert user.startswith("browser-") and browser["user"] == user
    # the browser keeps its id across calls (it lives in its localStorage)
    assert users.identify(None, browser)[0] == user
    assert users.identify(None, {})[0] != user


def test_text_any_database_refuses_is_stored_cleaned(api):
    """NUL characters (PostgreSQL refuses them) and lone surrogates (no driver encodes them) in a question."""
    session = sid()
    r = api.post("/", content='{"prompt": "Say hi \\u0000 and \\ud800 bye.", "max_new_tokens": 4}',
                 headers={"X-Session-Id": session, "Content-Type": "application/json"})
    assert r.status_code == 200
    stored = api.get(f"/api/sessions/{session}").json()["messages"][0]["content"]
    assert stored.startswith("Say hi \ufffd and ") and stored.endswith(" bye.") and "\x00" not in stored
    assert api.get("/api/sessions", params={"q": "hi \x00"}).status_code in (200, 400)
    assert api.get("/health").json()["status"] == "ok"


def test_with_no_history_there_are_no_sessions(client):
    """The shared test server runs as with --no-history."""
    r = client.post("/", json={"prompt": "Hi", "max_new_tokens": 2}, headers={"X-Session-Id": "x" * 40})
    assert r.status_code == 200 and "X-Session-Id" not in r.headers
    listed = client.get("/api/sessions")
    assert listed.status_code == 404 and listed.json()["error"]["code"] == "history_disabled"


@pytest.mark.parametrize("path", ["/", "/run"])
def test_the_seed_curl_command_works(hist_sqlite, path):
    """The documentation's cURL call, endpoint and token substituted."""
    import subprocess

    live, _ = hist_sqlite
    out = subprocess.run(["curl", "-s", "-X", "POST", "-H", "Authorization: Bearer <your_token>", "-H",
                          "Content-Type: application/json", "-d", '{"question":"who are u?"}', live.url + path],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    body = json.loads(out)
    assert body["answer"] and body["session_id"] and body["trace_id"]
    assert ("trace" in body) == (path == "/run")


def test_a_grounded_answer_traces_its_retrieval(api):
    kb = "hist" + uuid.uuid4().hex[:6]
    text = b"# Lighthouses\n\nThe Tower of Hercules in Galicia is the oldest lighthouse still in use, built in the 1st century."
    job = api.post(f"/api/knowledge/{kb}/files?wait=true", files=[("files", ("lighthouses.md", text))], timeout=600).json()
    assert job["state"] == "done", job
    body = api.post("/run", json={"question": "Which is the oldest lighthouse still in use?", "langchain": True,
                                  "kb": kb, "top_k_docs": 2, **GREEDY}).json()
    retrieval = next(s for s in body["trace"]["spans"] if s["name"] == "retrieval")
    assert retrieval["attributes"]["kb"] == kb and retrieval["attributes"]["matched"] is True
    hit = retrieval["attributes"]["hits"][0]
    assert hit["file"] == "lighthouses.md" and hit["score"] == body["sources"][0]["score"]
    stored = api.get(f"/api/sessions/{body['session_id']}").json()["messages"][1]
    assert stored["sources"][0]["file"] == "lighthouses.md"
    api.delete(f"/api/knowledge/{kb}")
