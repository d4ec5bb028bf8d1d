"""Retrieval quality and speed on the rag-dev set, through the HTTP API.

    .venv/bin/python bench/rag_eval.py                 # starts its own server on a temp knowledge dir
    .venv/bin/python bench/rag_eval.py --set rag-dev-zh
    .venv/bin/python bench/rag_eval.py --embedding-model minilm
    .venv/bin/python bench/rag_eval.py --url http://127.0.0.1:8000 --token T

Uploads every file of ../shared/rag-dev/docs to a fresh knowledge base, then
asks each question of questions.jsonl through POST /api/knowledge/{kb}/search.
A hit is an `expect` substring (whitespace collapsed) inside a retrieved chunk.
Prints one JSON report: hit@1/3/5 (all answerable, English, Chinese), whether
the unanswerable questions were judged irrelevant, ingest chunks/s, and search
latency p50/p99. With its own server it also embeds the same chunks with the
same embedder in process, so ingestion speed can be read against the raw
embedder's (`ingest_vs_raw_embedder`).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.server_process import ROOT, running_server  # noqa: E402
from bench.stats import percentile  # noqa: E402

SETS = {"rag-dev": ROOT.parent / "shared" / "rag-dev", "rag-dev-zh": ROOT.parent / "shared" / "rag-dev-zh"}


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def evaluate(url: str, token: str, dataset: Path, kb: str, extra_rounds: int = 4) -> dict:
    headers = {"Authorization": token} if token else {}
    docs = sorted((dataset / "docs").iterdir())
    files = [("files", (p.name, p.read_bytes())) for p in docs]
    started = time.perf_counter()
    job = requests.post(f"{url}/api/knowledge/{kb}/files?wait=true", files=files, headers=headers, timeout=1800).json()
    ingest_s = time.perf_counter() - started
    if job.get("state") != "done":
        raise SystemExit(f"ingestion failed: {json.dumps(job)}")
    chunks = sum(f["chunks"] for f in job["files"])

    questions = [json.loads(line) for line in (dataset / "questions.jsonl").read_text().splitlines() if line.strip()]
    groups = {"all": [], "en": [], "zh": []}
    latencies, unanswerable = [], []
    for q in questions:
        for _ in range(1 + extra_rounds):  # repeat for stable latency figures
            t = time.perf_counter()
            reply = requests.post(f"{url}/api/knowledge/{kb}/search", json={"query": q["question"], "top_k": 5}, headers=headers, timeout=60).json()
            latencies.append((time.perf_counter() - t) * 1000)
        hits = reply["hits"]
        if not q["doc"]:
            unanswerable.append({"id": q["id"], "any_relevant": any(h["relevant"] for h in hits), "best_score": hits[0]["score"] if hits else None})
            continue
        first = next((i for i, h in enumerate(hits) if any(_norm(e) in _norm(h["text"]) for e in q["expect"])), None)
        lang = "zh" if re.search(r"[\u4e00-\u9fff]", q["question"]) else "en"
        for group in ("all", lang):
            groups[group].append(first)

    def rates(firsts: list) -> dict:
        n = len(firsts)
        return {f"hit@{k}": round(sum(1 for f in firsts if f is not None and f < k) / n, 3) for k in (1, 3, 5)} | {"questions": n}

    return {
        "kb": kb,
        "files": len(docs),
        "chunks": chunks,
        "ingest_seconds": round(ingest_s, 2),
        "ingest_chunks_per_s": round(chunks / ingest_s, 1),
        "retrieval": {g: rates(v) for g, v in groups.items() if v},
        "misses@3": [q["id"] for q, f in zip([q for q in questions if q["doc"]], groups["all"]) if f is None or f >= 3],
        "unanswerable": unanswerable,
        "search_latency_ms": {"p50": round(statistics.median(latencies), 1), "p99": round(percentile(latencies, 0.99), 1), "n": len(latencies)},
    }


def raw_embedder(dataset: Path, model: Optional[str], ingest_chunks_per_s: float) -> dict:
    """The same chunks through the same embedder, in this process, with the server idle."""
    from bench.rag_options import chunk_texts
    from knowledge.embeddings import build_embedder

    texts = chunk_texts(dataset)
    embedder = build_embedder(model)
    embedder.encode(texts[:4])  # warm up
    started = time.perf_counter()
    embedder.encode(texts)
    raw = len(texts) / (time.perf_counter() - started)
    return {"raw_embedder_chunks_per_s": round(raw, 1), "ingest_vs_raw_embedder": round(ingest_chunks_per_s / raw, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description="retrieval hit@k and speed on the rag-dev set")
    parser.add_argument("--url", help="a running server; default: start one on a temporary knowledge dir")
    parser.add_argument("--token", default="")
    parser.add_argument("--set", choices=sorted(SETS), default="rag-dev", help="which development set")
    parser.add_argument("--dataset", type=Path, help="another folder in the same format (docs/, questions.jsonl)")
    parser.add_argument("--embedding-model", help="passed to the server this script starts (default: its default)")
    parser.add_argument("--server-args", default="", help="extra flags for the server this script starts")
    args = parser.parse_args()
    dataset = args.dataset or SETS[args.set]
    kb = f"ragdev-{uuid.uuid4().hex[:6]}"
    if args.url:
        report = evaluate(args.url.rstrip("/"), args.token, dataset, kb)
    else:
        flags = ["--knowledge-dir"] + (["--embedding-model", args.embedding_model] if args.embedding_model else [])
        with tempfile.TemporaryDirectory() as tmp, running_server([flags[0], tmp, *flags[1:], *args.server_args.split()]) as url:
            report = evaluate(url, args.token, dataset, kb)
            report.update(raw_embedder(dataset, args.embedding_model, report["ingest_chunks_per_s"]))
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
