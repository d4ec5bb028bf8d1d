"""Soak test: many mixed clients, a few hostile ones, for minutes; errors by kind, latency, memory and files.

    .venv/bin/python bench/soak.py                       # starts webui_server.py itself, 32 clients, 10 minutes
    .venv/bin/python bench/soak.py --duration 60 --clients 8

Clients (spread over the kinds below, round robin) loop until the time is up:
EAS `POST /` (plain and streamed), the EAS WebSocket (two turns per
connection), the `openai` SDK (chat, streamed and not), `/v1/completions`,
knowledge search, knowledge uploads (small text files, a re-upload, a file
delete), and hostile requests (oversized, malformed, out-of-range, cross-site,
1000-pair histories, zip bombs, bad WebSocket frames) that must get their
documented 4xx. Every outcome is one of: ok, expected (a hostile request
refused as documented), or unexpected (a 5xx, a wrong status, a non-JSON
error, a dropped connection). The server's RSS and open file descriptors
(with its parser child) are sampled every few seconds.

Writes bench/results/soak.json and bench/results/soak.png.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import sys
import tempfile
import time
import zipfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Awaitable, Callable

import httpx
import psutil
import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.server_process import server_process  # noqa: E402
from bench.stats import percentile  # noqa: E402

RAG_DOCS = ROOT.parent / "shared" / "rag-dev" / "docs"
QUESTIONS = ["What is the capital of France?", "Name three fruits.", "How do I install DeepSpeed?",
             "Explain what a knowledge base is.", "Write one sentence about the sea.", "What is 12 times 7?"]


class Unexpected(Exception):
    """An outcome the service documents as impossible for this request."""


def _json_error(response: httpx.Response, *statuses: int) -> None:
    if response.status_code not in statuses:
        raise Unexpected(f"status {response.status_code} (wanted {statuses}): {response.text[:120]}")
    try:
        assert response.json()["error"]["message"]
    except Exception:
        raise Unexpected(f"non-JSON error {response.status_code}: {response.text[:120]}") from None


def _ok(response: httpx.Response) -> None:
    if response.status_code != 200:
        raise Unexpected(f"status {response.status_code}: {response.text[:160]}")


def _zip_bomb() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as package:
        with package.open("word/document.xml", "w") as entry:
            for _ in range(300):
                entry.write(b"\0" * 2**20)
    return out.getvalue()


class Soak:
    def __init__(self, url: str, tokens: int) -> None:
        self.url = url
        self.ws_url = url.replace("http://", "ws://") + "/"
        self.tokens = tokens
        self.http = httpx.AsyncClient(base_url=url, timeout=300)
        self.bomb = _zip_bomb()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.outcomes: Counter = Counter()
        self.unexpected: dict[str, list[str]] = defaultdict(list)

    async def record(self, kind: str, call: Callable[[], Awaitable[str]]) -> None:
        started = time.monotonic()
        try:
            outcome = await call()
        except Unexpected as exc:
            outcome = "unexpected"
            self.unexpected[kind].append(str(exc)[:240])
        except Exception as exc:  # a dropped connection, a timeout: never expected
            outcome = "unexpected"
            self.unexpected[kind].append(f"{type(exc).__name__}: {exc}"[:240])
        self.outcomes[(kind, outcome)] += 1
        self.latency[kind].append(time.monotonic() - started)

    # ---- polite clients ------------------------------------------------------------------

    async def eas_http(self) -> str:
        r = await self.http.post("/", json={"prompt": random.choice(QUESTIONS), "max_new_tokens": self.tokens})
        _ok(r)
        assert r.json()["history"][-1][1] == r.json()["response"]
        return "ok"

    async def eas_stream(self) -> str:
        frames = []
        async with self.http.stream("POST", "/", json={"prompt": random.choice(QUESTIONS), "max_new_tokens": self.tokens,
                                                        "use_stream_chat": True}) as r:
            _ok(r)
            buffer = b""
            async for piece in r.aiter_bytes():
                buffer += piece
                *done, buffer = buffer.split(b"\0")
                frames += [json.loads(f) for f in done if f]
        if not frames or "finish_reason" not in frames[-1]:
            raise Unexpected("stream ended without its last frame")
        return "ok"

    async def websocket(self) -> str:
        async with websockets.connect(self.ws_url, max_size=None) as ws:
            for prompt in random.sample(QUESTIONS, 2):
                await ws.send(json.dumps({"prompt": prompt, "max_new_tokens": self.tokens}))
                while (message := await asyncio.wait_for(ws.recv(), 300)) != "<EOS>":
                    if message.startswith('{"error"'):
                        raise Unexpected(message[:160])
        return "ok"

    async def openai_sdk(self) -> str:
        from openai import AsyncOpenAI

        client = AsyncOpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)
        messages = [{"role": "user", "content": random.choice(QUESTIONS)}]
        if random.random() < 0.5:
            reply = await client.chat.completions.create(model=(await client.models.list()).data[0].id,
                                                         messages=messages, max_tokens=self.tokens)
            assert reply.choices[0].finish_reason in ("stop", "length")
        else:
            stream = await client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages,
                                                          max_tokens=self.tokens, stream=True)
            async for _ in stream:
                pass
        await client.close()
        return "ok"

    async def completions(self) -> str:
        _ok(await self.http.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": self.tokens}))
        return "ok"

    async def search(self) -> str:
        r = await self.http.post("/api/knowledge/soak/search", json={"query": random.choice(QUESTIONS), "top_k": 3})
        _ok(r)
        assert len(r.json()["hits"]) == 3
        return "ok"

    async def upload(self) -> str:
        name = f"note-{random.randrange(20)}.md"
        body = f"# Note\nThis note was written at {time.time():.0f} about {random.choice(QUESTIONS)}".encode()
        r = await self.http.post("/api/knowledge/soak-uploads/files?wait=true", files=[("files", (name, body))])
        if r.status_code == 503:  # the documented answer when the upload queue is full
            _json_error(r, 503)
            return "expected"
        _ok(r)
        if r.json()["state"] != "done":
            raise Unexpected(f"upload job {r.json()['state']}: {r.json()['error']}")
        if random.random() < 0.3:
            _ok(await self.http.delete(f"/api/knowledge/soak-uploads/files/{name}"))
        return "ok"

    # ---- hostile clients -------------------------------------------------------------------

    async def hostile(self) -> str:
        attack = random.choice([
            self._bad_json, self._huge_top_k, self._long_history, self._oversized, self._cross_site,
            self._deep_json, self._many_stops, self._bad_frame, self._bomb_upload, self._bad_kb_name,
        ])
        return await attack()

    async def _bad_json(self) -> str:
        _json_error(await self.http.post("/v1/chat/completions", content=b'{"messages": [', headers={"Content-Type": "application/json"}), 400)
        return "expected"

    async def _huge_top_k(self) -> str:
        _json_error(await self.http.post("/", json={"prompt": "hi", "top_k": 10**20}), 400)
        return "expected"

    async def _long_history(self) -> str:
        _json_error(await self.http.post("/", json={"prompt": "hi", "history": [["q", "a"]] * 1000}), 400)
        return "expected"

    async def _oversized(self) -> str:
        _json_error(await self.http.post("/v1/completions", content=b"x" * (2 * 2**20), headers={"Content-Type": "application/json"}), 413)
        return "expected"

    async def _cross_site(self) -> str:
        _json_error(await self.http.post("/", content=b"Hello", headers={"Origin": "http://evil.example", "Content-Type": "text/plain"}), 403)
        return "expected"

    async def _deep_json(self) -> str:
        _json_error(await self.http.post("/", content=("[" * 5000 + "]" * 5000).encode(), headers={"Content-Type": "application/json"}), 400)
        return "expected"

    async def _many_stops(self) -> str:
        _json_error(await self.http.post("/", json={"prompt": "hi", "stop": ["x"] * 10_000}), 400)
        return "expected"

    async def _bad_frame(self) -> str:
        async with websockets.connect(self.ws_url) as ws:
            await ws.send('{"prompt": "hi", "temperature": -1}')
            error = json.loads(await ws.recv())
            if "error" not in error or await ws.recv() != "<EOS>":
                raise Unexpected(f"bad frame answered with {error}")
        return "expected"

    async def _bomb_upload(self) -> str:
        r = await self.http.post("/api/knowledge/soak-hostile/files?wait=true", files=[("files", ("bomb.docx", self.bomb))])
        if r.status_code == 503:
            _json_error(r, 503)
            return "expected"
        _ok(r)
        result = r.json()["files"][0]
        if result["status"] != "failed" or "unpacks to" not in (result["reason"] or ""):
            raise Unexpected(f"zip bomb ingested as {result}")
        return "expected"

    async def _bad_kb_name(self) -> str:
        _json_error(await self.http.post("/api/knowledge/..%2Fetc/search", json={"query": "x"}), 400, 404)
        return "expected"


def _sample(process: psutil.Process) -> dict:
    procs = [process, *process.children(recursive=True)]
    rss = fds = 0
    for p in procs:
        try:
            rss += p.memory_info().rss
            fds += p.num_fds()
        except psutil.Error:
            pass
    return {"rss_mb": round(rss / 2**20, 1), "fds": fds, "server_rss_mb": round(process.memory_info().rss / 2**20, 1)}


async def _run(url: str, pid: int, duration: float, clients: int, tokens: int, think: float) -> dict:
    soak = Soak(url, tokens)
    for doc in sorted(RAG_DOCS.glob("*"))[:3]:
        r = await soak.http.post("/api/knowledge/soak/files?wait=true", files=[("files", (doc.name, doc.read_bytes()))])
        r.raise_for_status()
    kinds = {"eas_http": soak.eas_http, "eas_stream": soak.eas_stream, "websocket": soak.websocket,
             "openai_sdk": soak.openai_sdk, "completions": soak.completions, "search": soak.search,
             "hostile": soak.hostile, "upload": soak.upload}
    names = list(kinds)
    server = psutil.Process(pid)
    samples = []
    started = time.monotonic()
    deadline = started + duration

    async def client(kind: str) -> None:
        # people, not a load generator: a pause between requests, as when reading an answer
        await asyncio.sleep(random.uniform(0, think))
        while time.monotonic() < deadline:
            await soak.record(kind, kinds[kind])
            await asyncio.sleep(random.uniform(0.5 * think, 1.5 * think))

    async def watch() -> None:
        while time.monotonic() < deadline + 1:
            samples.append({"t": round(time.monotonic() - started, 1), **_sample(server)})
            await asyncio.sleep(5)

    await asyncio.gather(watch(), *(client(names[i % len(names)]) for i in range(clients)))
    await soak.http.aclose()
    first, last = samples[1] if len(samples) > 1 else samples[0], samples[-1]
    return {
        "duration_s": duration,
        "clients": clients,
        "think_s": think,
        "max_new_tokens": tokens,
        "outcomes": {f"{k}/{o}": n for (k, o), n in sorted(soak.outcomes.items())},
        "unexpected": sum(len(v) for v in soak.unexpected.values()),
        "unexpected_examples": {kind: examples[:5] for kind, examples in soak.unexpected.items()},
        "latency_s": {k: {"n": len(v), "p50": round(percentile(v, 0.5), 3), "p99": round(percentile(v, 0.99), 3)}
                      for k, v in sorted(soak.latency.items())},
        "memory": {"rss_mb_after_warmup": first["rss_mb"], "rss_mb_end": last["rss_mb"],
                   "rss_mb_max": max(s["rss_mb"] for s in samples), "fds_start": first["fds"], "fds_end": last["fds"],
                   "fds_max": max(s["fds"] for s in samples)},
        "samples": samples,
    }


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in report["samples"]]
    fig, (mem, fds) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    mem.plot(t, [s["rss_mb"] for s in report["samples"]], label="server + parser RSS")
    mem.plot(t, [s["server_rss_mb"] for s in report["samples"]], label="server RSS")
    mem.set_ylabel("MiB")
    mem.legend()
    mem.set_title(f"soak: {report['clients']} clients, {report['duration_s']:.0f} s, {report['unexpected']} unexpected errors")
    fds.plot(t, [s["fds"] for s in report["samples"]], color="tab:red")
    fds.set_ylabel("open file descriptors")
    fds.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--think", type=float, default=2.0, help="mean seconds a client waits between requests")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as knowledge_dir:
        with server_process(["--knowledge-dir", knowledge_dir]) as (url, proc):
            report = asyncio.run(_run(url, proc.pid, args.duration, args.clients, args.max_new_tokens, args.think))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    _plot(report, out.with_suffix(".png"))
    summary = {k: v for k, v in report.items() if k != "samples"}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
