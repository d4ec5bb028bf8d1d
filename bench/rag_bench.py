"""Knowledge-base speed at scale: ingest chunks/s and search latency at 1k and 10k chunks, over HTTP.

    .venv/bin/python bench/rag_bench.py                   # starts its own server on a temp knowledge dir
    .venv/bin/python bench/rag_bench.py --sizes 1000      # only the first step
    .venv/bin/python bench/rag_bench.py --url http://127.0.0.1:8000 --token T

Builds a deterministic synthetic corpus (Markdown files of generated sections,
~`--chunk-chars` characters a section so the server's splitter yields about one
chunk per section), uploads it through POST /api/knowledge/{kb}/files in
batches until the base holds each size in turn, and at each size runs
`--queries` searches through POST /api/knowledge/{kb}/search. Queries are
sentences taken from the corpus, so each has a known source section; the
report says how often that section is in the top 5 (a check that the fast
path still finds things). Prints one JSON report and writes it to
bench/results/rag_bench.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.server_process import running_server  # noqa: E402
from bench.stats import percentile  # noqa: E402

WORDS = (
    "river harbor engine signal market orchard lantern glacier copper meadow canal tower archive quartz ferry "
    "falcon spindle beacon cellar prairie voltage mirror compass tunnel anchor saddle granite violet ember "
    "cobalt thistle walnut pigeon marble circuit bakery furnace harvest orbit paddle shingle vessel zephyr "
    "budget ledger cipher turbine mosaic pepper quarry ribbon summit tapestry uplink vintage willow yarrow"
).split()
FILES_PER_UPLOAD = 20


class Corpus:
    """Sections of generated prose; section i has a unique code word so searches can be checked."""

    def __init__(self, chunk_chars: int, seed: int = 7) -> None:
        self.chunk_chars = chunk_chars
        self.rng = random.Random(seed)
        self.sentences: list[tuple[str, str]] = []  # (sentence, code of its section)

    def section(self, index: int) -> str:
        code = f"K{index:05d}"
        lines = [f"## Section {code}"]
        size = 0
        while size < self.chunk_chars * 0.8:
            words = self.rng.choices(WORDS, k=self.rng.randint(8, 16))
            sentence = f"The {code} " + " ".join(words) + "."
            lines.append(sentence)
            self.sentences.append((sentence, code))
            size += len(sentence) + 1
        return "\n".join(lines)

    def file(self, first: int, sections: int) -> str:
        return "\n\n".join(self.section(i) for i in range(first, first + sections))


def _upload(url: str, kb: str, headers: dict, files: list[tuple[str, str]]) -> dict:
    payload = [("files", (name, text.encode())) for name, text in files]
    job = requests.post(f"{url}/api/knowledge/{kb}/files?wait=true", files=payload, headers=headers, timeout=3600).json()
    if job.get("state") != "done":
        raise SystemExit(f"ingestion failed: {json.dumps(job)[:500]}")
    return job


def run(url: str, token: str, sizes: list[int], queries: int, chunk_chars: int, sections_per_file: int) -> dict:
    headers = {"Authorization": token} if token else {}
    kb = f"bench-{uuid.uuid4().hex[:6]}"
    corpus = Corpus(chunk_chars)
    rng = random.Random(11)
    steps, chunks, sections = [], 0, 0
    for size in sizes:
        ingest_s, added = 0.0, 0
        while chunks < size:
            batch = []
            while len(batch) < FILES_PER_UPLOAD and chunks + len(batch) * sections_per_file < size:
                batch.append((f"doc-{sections // sections_per_file:05d}.md", corpus.file(sections, sections_per_file)))
                sections += sections_per_file
            started = time.perf_counter()
            job = _upload(url, kb, headers, batch)
            ingest_s += time.perf_counter() - started
            got = sum(f["chunks"] for f in job["files"])
            chunks, added = chunks + got, added + got
            print(f"  {chunks} chunks ({added / ingest_s:.1f} chunks/s so far)", file=sys.stderr, flush=True)
        latencies, found = [], 0
        for sentence, code in rng.sample(corpus.sentences, min(queries, len(corpus.sentences))):
            query = " ".join(sentence.split()[2:])  # without the code word: a plain content query
            started = time.perf_counter()
            reply = requests.post(f"{url}/api/knowledge/{kb}/search", json={"query": query, "top_k": 5}, headers=headers, timeout=60)
            latencies.append((time.perf_counter() - started) * 1000)
            found += any(code in hit["text"] for hit in reply.json()["hits"])
        steps.append({
            "chunks": chunks,
            "added_chunks": added,
            "ingest_seconds": round(ingest_s, 2),
            "ingest_chunks_per_s": round(added / ingest_s, 1),
            "search_latency_ms": {"p50": round(statistics.median(latencies), 1), "p99": round(percentile(latencies, 0.99), 1),
                                  "mean": round(statistics.fmean(latencies), 1), "n": len(latencies)},
            "source_in_top5": round(found / len(latencies), 3),
        })
        print(json.dumps(steps[-1]), file=sys.stderr, flush=True)
    requests.delete(f"{url}/api/knowledge/{kb}", headers=headers, timeout=600)
    return {"kb": kb, "chunk_chars": chunk_chars, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server; default: start one on a temporary knowledge dir")
    parser.add_argument("--token", default="")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="base sizes (chunks) to measure at, ascending")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--chunk-chars", type=int, default=700, help="section length; keep it under the server's --chunk-size")
    parser.add_argument("--sections-per-file", type=int, default=50)
    parser.add_argument("--server-args", default="", help="extra flags for the server this script starts")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    if args.url:
        report = run(args.url.rstrip("/"), args.token, args.sizes, args.queries, args.chunk_chars, args.sections_per_file)
    else:
        with tempfile.TemporaryDirectory() as tmp, running_server(["--knowledge-dir", tmp, "--api-only", *args.server_args.split()]) as url:
            report = run(url, args.token, args.sizes, args.queries, args.chunk_chars, args.sections_per_file)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rag_bench.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
