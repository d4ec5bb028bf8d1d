"""Serving benchmark: N concurrent streaming clients against an OpenAI-compatible or EAS endpoint.

    .venv/bin/python bench/serve_bench.py --url http://127.0.0.1:8000 --api openai-chat
    .venv/bin/python bench/serve_bench.py --url http://127.0.0.1:8000 --api eas --concurrency 1 8
    .venv/bin/python bench/serve_bench.py --start-server      # starts webui_server.py itself

For each concurrency level, that many clients send streaming requests from a
fixed prompt set (fixed output length: max_tokens with ignore_eos where the
server supports it) until `rounds` x N requests are done. Metrics follow
vLLM's benchmark definitions: TTFT (request sent -> first token), TPOT
((E2E - TTFT) / (output tokens - 1)), ITL (gaps between streamed chunks),
E2E latency, requests/s and output tokens/s over the level's wall time.
TTFT and ITL are also split by what the server was doing when a request
was sent: "idle" (none of our other requests in flight), "burst" (another
request sent within 20 ms, as the first wave of a level without stagger),
"during_decode" (others were streaming). Clients are closed loops: each
sends its next request when its answer ends; `--stagger auto` starts client
i at i x (one answer's time alone / N), so arrivals spread over the answer
instead of coming in waves. `--long-prompt-tokens` adds one client sending
a long prompt into the running level, and reports the longest stall it
caused in the other streams. The prompt set repeats, so a server with a
prefix cache sees most prompts again; `--unique-prompts` makes every prompt
new. Writes a JSON report and a PNG plot (throughput and TTFT vs concurrency).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.stats import percentile  # noqa: E402

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe the water cycle to a child.",
    "What are the benefits of regular exercise?",
    "Write a poem about autumn leaves.",
    "Explain the rules of chess briefly.",
    "Describe a busy market in the morning.",
    "Why is the sky blue?",
]


FILLER = ("the river runs past the old stone mill and the green field where children play after school "
          "while their parents talk about the weather the market and the price of bread").split()


@dataclass
class Result:
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: Optional[str] = None
    first_wave: bool = False  # one of the level's first N requests
    sent_at: float = 0.0
    arrival: str = "idle"  # idle | burst | during_decode: what the server was doing when it was sent
    itl_at: list[float] = field(default_factory=list)  # when each ITL gap ended


def _summary(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 4) if values else None,
            **{f"p{int(q * 100)}": round(percentile(values, q), 4) for q in (0.5, 0.9, 0.99)}}


IGNORE_EOS = {"ignore_eos": True}  # emptied by --no-ignore-eos, for servers that refuse the field


async def _stream_openai(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, token: str) -> Result:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0.8, "top_p": 0.95, **IGNORE_EOS}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    res, start, last, chunks = Result(), time.perf_counter(), None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            return Result(error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                res.output_tokens = data["usage"]["completion_tokens"]
            choices = data.get("choices") or []
            if choices and choices[0].get("delta", {}).get("content"):
                now = time.perf_counter()
                if last is None:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                    res.itl_at.append(now)
                last, chunks = now, chunks + 1
    res.e2e = time.perf_counter() - start
    res.output_tokens = res.output_tokens or chunks
    return res


async def _stream_eas(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, token: str) -> Result:
    body = {"prompt": prompt, "max_new_tokens": max_tokens, "use_stream_chat": True, "temperature": 0.8, "top_p": 0.95}
    headers = {"Authorization": token} if token else {}
    res, start, last, buffer = Result(), time.perf_counter(), None, b""
    async with client.stream("POST", url + "/", json=body, headers=headers) as r:
        if r.status_code != 200:
            return Result(error=f"HTTP {r.status_code}")
        async for chunk in r.aiter_bytes():
            buffer += chunk
            while b"\0" in buffer:
                frame, buffer = buffer.split(b"\0", 1)
                data = json.loads(frame)
                now = time.perf_counter()
                if last is None:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                    res.itl_at.append(now)
                last = now
                if "usage" in data:
                    res.output_tokens = data["usage"]["completion_tokens"]
    res.e2e = time.perf_counter() - start
    return res


class _Arrivals:
    """Classifies each request at send time by what our other requests were doing."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.last_sent = float("-inf")

    def classify(self, now: float) -> str:
        kind = "burst" if now - self.last_sent < 0.02 else ("during_decode" if self.in_flight else "idle")
        self.last_sent = now
        return kind


async def run_level(url: str, api: str, model: str, concurrency: int, rounds: int, max_tokens: int, token: str,
                    unique: bool = False, stagger: float = 0.0, long_prompt_tokens: int = 0) -> dict:
    send = _stream_openai if api == "openai-chat" else _stream_eas
    results: list[Result] = []
    arrivals = _Arrivals()
    limits = httpx.Limits(max_connections=concurrency + 6, max_keepalive_connections=concurrency + 6)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        async def one(i: int, prompt: str, tokens: int) -> Result:
            now = time.perf_counter()
            kind = arrivals.classify(now)
            arrivals.in_flight += 1
            try:
                result = await send(client, url, model, prompt, tokens, token)
            except httpx.HTTPError as exc:
                result = Result(error=repr(exc))
            finally:
                arrivals.in_flight -= 1
            result.sent_at, result.arrival, result.first_wave = now, kind, i < concurrency
            return result

        async def closed_loop(client_no: int) -> None:
            await asyncio.sleep(client_no * stagger)
            for r in range(rounds):
                i = r * concurrency + client_no
                prompt = PROMPTS[i % len(PROMPTS)]
                if unique:  # only the system prompt is shared: no prompt is ever seen twice
                    prompt = f"(Request {concurrency}-{i}.) {prompt}"
                results.append(await one(i, prompt, max_tokens))

        long_result: list[Result] = []

        async def long_one() -> None:
            # arrives once every client is streaming; these words are about one token each
            await asyncio.sleep(concurrency * stagger + 1.0)
            words = " ".join(FILLER[k % len(FILLER)] for k in range(long_prompt_tokens))
            sent_at = time.perf_counter()
            result = await send(client, url, model, f"Summarise this list: {words}", 8, token)
            result.sent_at = sent_at
            long_result.append(result)

        started = time.perf_counter()
        await asyncio.gather(*(closed_loop(c) for c in range(concurrency)), *([long_one()] if long_prompt_tokens else []))
        duration = time.perf_counter() - started
    ok = [r for r in results if r.error is None]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    report = {
        "concurrency": concurrency,
        "stagger_s": round(stagger, 3),
        "requests": len(results),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:3],
        "duration_s": round(duration, 2),
        "request_throughput": round(len(ok) / duration, 3),
        "output_token_throughput": round(sum(r.output_tokens for r in ok) / duration, 2),
        "mean_output_tokens": round(statistics.fmean(r.output_tokens for r in ok), 1) if ok else 0,
        "ttft_s": _summary([r.ttft for r in ok]),
        "ttft_first_wave_s": _summary([r.ttft for r in ok if r.first_wave]),
        "ttft_later_s": _summary([r.ttft for r in ok if not r.first_wave]),
        "tpot_s": _summary(tpot),
        "itl_s": _summary([x for r in ok for x in r.itl]),
        "e2e_s": _summary([r.e2e for r in ok]),
        "by_arrival": {
            kind: {"requests": len(group), "ttft_s": _summary([r.ttft for r in group]),
                   "itl_s": _summary([x for r in group for x in r.itl])}
            for kind in ("idle", "during_decode", "burst")
            if (group := [r for r in ok if r.arrival == kind])
        },
    }
    if long_result:
        lr = long_result[0]
        start, end = lr.sent_at, lr.sent_at + lr.e2e
        gaps = [gap for r in ok for gap, at in zip(r.itl, r.itl_at) if start <= at <= end + 0.5]
        report["long_prompt"] = {"filler_words": long_prompt_tokens, "ttft_s": round(lr.ttft, 3), "error": lr.error,
                                 "others_longest_gap_s": round(max(gaps), 3) if gaps else None,
                                 "others_itl_while_running": _summary(gaps)}
    return report


async def disconnect_check(url: str, token: str) -> dict:
    """Start a long stream, leave after a few chunks, and count what the engine generates afterwards."""
    headers = {"Authorization": token} if token else {}
    async with httpx.AsyncClient(timeout=60) as client:
        async def engine() -> dict:
            return (await client.get(url + "/health", headers=headers)).json()["engine"]

        body = {"messages": [{"role": "user", "content": "Write a very long essay about the sea."}], "max_tokens": 1000,
                "stream": True, "ignore_eos": True}
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= 8:
                    break
        left_at = time.perf_counter()
        at_disconnect = (await engine())["tokens_generated"]
        stopped_after = None
        while time.perf_counter() - left_at < 3:
            state = await engine()
            if state["running"] == 0 and stopped_after is None:
                stopped_after = time.perf_counter() - left_at
            await asyncio.sleep(0.02)
        final = (await engine())["tokens_generated"]
    return {"tokens_generated_after_disconnect": final - at_disconnect, "slot_freed_after_s": round(stopped_after, 3) if stopped_after is not None else None}


def plot(levels: list[dict], path: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [lv["concurrency"] for lv in levels]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(x, [lv["output_token_throughput"] for lv in levels], "o-", label=label)
    a.set_xlabel("concurrent streams"); a.set_ylabel("output tokens/s"); a.set_title("Throughput"); a.grid(alpha=0.3)
    b.plot(x, [lv["ttft_s"]["p50"] for lv in levels], "o-", label=label)
    b.set_xlabel("concurrent streams"); b.set_ylabel("TTFT p50 (s)"); b.set_title("Time to first token"); b.grid(alpha=0.3)
    for ax in (a, b):
        ax.set_xscale("log", base=2); ax.set_xticks(x); ax.set_xticklabels(x); ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api", choices=["openai-chat", "eas"], default="openai-chat")
    parser.add_argument("--model", default=None, help="model name for OpenAI requests; default: the first of /v1/models")
    parser.add_argument("--token", default="")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client at each level")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--label", default="chatllm-webui")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--start-server", action="store_true", help="start webui_server.py (temporary knowledge dir)")
    parser.add_argument("--server-args", default="", help="extra flags for the server --start-server starts")
    parser.add_argument("--disconnect-check", action="store_true", help="also measure compute spent after a client leaves")
    parser.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos (answers may end early)")
    parser.add_argument("--stagger", default="0", help="seconds between client starts, or 'auto' (one answer alone / N)")
    parser.add_argument("--long-prompt-tokens", type=int, default=0, help="one extra request with a prompt about this long")
    parser.add_argument("--unique-prompts", action="store_true",
                        help="make every prompt unique, so a server's prefix cache can only reuse the system prompt")
    args = parser.parse_args()
    if args.no_ignore_eos:
        IGNORE_EOS.clear()

    async def go(url: str) -> dict:
        model = args.model
        if model is None and args.api == "openai-chat":
            headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
            model = httpx.get(url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
        await run_level(url, args.api, model, 1, 1, 8, args.token)  # warm-up
        levels = []
        alone_e2e = None
        for n in args.concurrency:
            stagger = float(args.stagger) if args.stagger != "auto" else (alone_e2e or 0.0) / n
            level = await run_level(url, args.api, model, n, args.rounds, args.max_tokens, args.token, args.unique_prompts,
                                    stagger, args.long_prompt_tokens if n > 1 else 0)
            if n == 1:
                alone_e2e = level["e2e_s"]["p50"]
            print(json.dumps({k: level[k] for k in ("concurrency", "output_token_throughput", "request_throughput", "failed")}
                             | {"ttft_p50": level["ttft_s"]["p50"], "itl_p50": level["itl_s"]["p50"], "itl_p99": level["itl_s"]["p99"],
                                "by_arrival_ttft_p50": {k: v["ttft_s"]["p50"] for k, v in level["by_arrival"].items()}}
                             | ({"long_prompt": level["long_prompt"]} if "long_prompt" in level else {})), flush=True)
            levels.append(level)
        report = {"label": args.label, "url": url, "api": args.api, "model": model, "max_tokens": args.max_tokens,
                  "unique_prompts": args.unique_prompts, "stagger": args.stagger, "levels": levels}
        if args.disconnect_check:
            report["disconnect"] = await disconnect_check(url, args.token)
        return report

    if args.start_server:
        import tempfile

        from bench.server_process import running_server

        with tempfile.TemporaryDirectory() as kb, running_server(["--knowledge-dir", kb, "--api-only", *args.server_args.split()]) as url:
            report = asyncio.run(go(url))
    else:
        report = asyncio.run(go(args.url.rstrip("/")))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"serve_{args.label}_{args.api}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    plot(report["levels"], stem.with_suffix(".png"), args.label)
    by = {lv["concurrency"]: lv for lv in report["levels"]}
    if 1 in by and by[1]["output_token_throughput"]:
        summary = {f"tok/s@{n}": by[n]["output_token_throughput"] for n in by}
        if 32 in by:
            summary["scaling_32_vs_1"] = round(by[32]["output_token_throughput"] / by[1]["output_token_throughput"], 2)
        for n in (8, 32):
            if n in by:
                summary[f"ttft_p50_{n}_vs_1"] = round(by[n]["ttft_s"]["p50"] / by[1]["ttft_s"]["p50"], 2)
                summary[f"itl_p99_{n}_vs_itl_p50_1"] = round(by[n]["itl_s"]["p99"] / by[1]["itl_s"]["p50"], 2)
        report["summary"] = summary
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
        print(json.dumps(summary | ({"disconnect": report["disconnect"]} if "disconnect" in report else {}), indent=2))
    print(f"report: {stem.with_suffix('.json')}  plot: {stem.with_suffix('.png')}")


if __name__ == "__main__":
    main()
