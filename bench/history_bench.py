"""What keeping conversations costs: chat turns/s with history on and off, and list/search latency
of the history API with 100k stored messages, on SQLite and PostgreSQL.

    .venv/bin/python bench/history_bench.py                    # both databases
    .venv/bin/python bench/history_bench.py --databases sqlite

Turns: 8 concurrent users, each a conversation of `--turns` greedy turns of
`--tokens` tokens through `POST /`. With history on, each user names its
session and sends only the new question (the server reads the stored turns
and writes the new exchange); with history off (`--no-history`) each user
sends its whole history itself, so both runs give the model the same prompts.
Listing: `--messages` messages stored straight through the repository
(10 per session; one heavy user holds a tenth of them, `--list-users` users
share the rest), then `GET /api/sessions` and
`GET /api/sessions?q=` for random users and for the heavy user, p50/p99
over 200 requests each.
PostgreSQL is a throwaway server started here (initdb/pg_ctl). Report:
bench/results/history_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.server_process import ROOT, running_server  # noqa: E402

QUESTIONS = ["Name a fruit.", "Name a colour.", "Name an animal.", "Name a country.", "Name a planet.",
             "Name a tool.", "Name a flower.", "Name a sport."]


async def _user(client: httpx.AsyncClient, url: str, turns: int, tokens: int, history_on: bool, offset: int) -> int:
    session, pairs = "bench-" + uuid.uuid4().hex, []
    for turn in range(turns):
        question = QUESTIONS[(offset + turn) % len(QUESTIONS)]
        body = {"prompt": question, "max_new_tokens": tokens, "temperature": 0}
        headers = {}
        if history_on:
            headers["X-Session-Id"] = session
        else:
            body["history"] = pairs
        reply = (await client.post(url, json=body, headers=headers)).json()
        pairs = pairs + [[question, reply["response"]]]
    return turns


async def turns_per_second(url: str, users: int, turns: int, tokens: int, history_on: bool) -> float:
    async with httpx.AsyncClient(timeout=600) as client:
        await _user(client, url, 1, tokens, history_on, 0)  # warm-up
        started = time.perf_counter()
        done = await asyncio.gather(*(_user(client, url, turns, tokens, history_on, i) for i in range(users)))
        return sum(done) / (time.perf_counter() - started)


def fill(url_db: str, messages: int, users: int) -> None:
    from history import HistoryConfig, HistoryService

    service = HistoryService(HistoryConfig(), url_db)
    service.start()
    repo, now = service.repo, None
    from history.repository import utcnow

    now = utcnow()
    sessions, rows = [], []
    per_session = 10
    count = messages // per_session
    for i in range(count):
        # one heavy user holds a tenth of everything; the rest is spread evenly
        user = "heavy" if i % 10 == 0 else f"user{i % users}"
        sid = f"s{i:08d}" + "x" * 24
        sessions.append(dict(id=sid, user_id=user, title=f"question about topic {i}", created_at=now, updated_at=now,
                             pinned=False))
        for j in range(per_session):
            rows.append(dict(session_id=sid, role="user" if j % 2 == 0 else "assistant", created_at=now,
                             content=f"message {j} of session {i} about topic {i % 997} " + "lorem ipsum " * 8,
                             trace_id=None, finish_reason=None, details=None))
    with repo.engine.begin() as c:
        for start in range(0, len(sessions), 5000):
            c.execute(repo.t.sessions.insert(), sessions[start:start + 5000])
        for start in range(0, len(rows), 5000):
            c.execute(repo.t.messages.insert(), rows[start:start + 5000])
    service.shutdown()


def latency(url: str, users: int, search: bool, n: int = 200, heavy: bool = False) -> dict:
    times = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(n):
            user = "heavy" if heavy else f"user{random.randrange(users)}"
            params = {"limit": 20, **({"q": f"topic {random.randrange(997)}"} if search else {})}
            started = time.perf_counter()
            r = client.get("/api/sessions", params=params, headers={"X-User-Id": user})
            times.append(time.perf_counter() - started)
            assert r.status_code == 200, r.text
    times.sort()
    return {"p50_ms": round(statistics.median(times) * 1000, 2), "p99_ms": round(times[int(len(times) * 0.99) - 1] * 1000, 2)}


@contextlib.contextmanager
def database(kind: str, folder: Path):
    if kind == "sqlite":
        yield f"sqlite:///{folder / f'bench-{uuid.uuid4().hex[:6]}.db'}"
        return
    from tests.db_servers import postgres_server

    with postgres_server() as pg:
        yield pg.url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--databases", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--list-users", type=int, default=500)
    args = parser.parse_args()
    folder = ROOT / "bench" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    report: dict = {"users": args.users, "turns": args.turns, "tokens": args.tokens, "messages": args.messages}
    with running_server(["--api-only", "--no-history"]) as url:
        report["history_off_turns_per_s"] = round(asyncio.run(
            turns_per_second(url, args.users, args.turns, args.tokens, False)), 3)
    print("history off", report["history_off_turns_per_s"], flush=True)
    for kind in args.databases:
        with database(kind, folder) as url_db:
            row: dict = {}
            with running_server(["--api-only", "--history-db", url_db, "--data-dir", str(folder)]) as url:
                row["turns_per_s"] = round(asyncio.run(turns_per_second(url, args.users, args.turns, args.tokens, True)), 3)
            row["cost_vs_off"] = f"{(1 - row['turns_per_s'] / report['history_off_turns_per_s']) * 100:.1f}%"
            fill(url_db, args.messages, args.list_users)
            with running_server(["--api-only", "--history-db", url_db, "--data-dir", str(folder)]) as url:
                row["list"] = latency(url, args.list_users, search=False)
                row["search"] = latency(url, args.list_users, search=True)
                row["heavy_user_list"] = latency(url, args.list_users, search=False, heavy=True)
                row["heavy_user_search"] = latency(url, args.list_users, search=True, heavy=True)
            print(kind, json.dumps(row), flush=True)
            report[kind] = row
    (folder / "history_bench.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
