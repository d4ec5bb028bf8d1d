"""Retrieval options side by side, in process: embedder x Chinese segmentation for BM25, on both dev sets.

    .venv/bin/python bench/rag_options.py                      # every option
    .venv/bin/python bench/rag_options.py --embedders e5 --segmenters jieba

Chunks come from the server's own loaders and splitter, ranking from the
server's own BM25 and fusion (knowledge/lexical.py); only the pieces being
compared are swapped. For each option and set it reports hit@1/3/5, embedding
chunks/s, search p50 (query embedding + BM25 + fusion), and the scores that
calibrate the relevance threshold: the highest cosine any unanswerable
question reaches, and the lowest top-hit cosine of an answerable one.
`bench/rag_eval.py` measures the configured server end to end over HTTP.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.server_process import ROOT  # noqa: E402
from knowledge import lexical  # noqa: E402
from knowledge.embeddings import build_embedder  # noqa: E402
from knowledge.loaders import load_file  # noqa: E402
from knowledge.splitting import DocumentSplitter, SplitterSettings  # noqa: E402

SETS = {"rag-dev-zh": ROOT.parent / "shared" / "rag-dev-zh", "rag-dev": ROOT.parent / "shared" / "rag-dev"}
_CJK_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")


def bigram_tokenize(text: str) -> list[str]:
    """The previous segmentation: CJK runs as overlapping character pairs."""
    lowered = text.lower()
    tokens = [w for w in lexical._WORD.findall(lowered) if w not in lexical._STOP]
    for run in _CJK_RUN.findall(lowered):
        tokens.extend(run[i : i + 2] for i in range(max(1, len(run) - 1)))
    return tokens


SEGMENTERS = {"jieba": lexical.tokenize, "bigram": bigram_tokenize}


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def chunk_texts(dataset: Path) -> list[str]:
    splitter = DocumentSplitter(SplitterSettings())
    texts = []
    for path in sorted((dataset / "docs").iterdir()):
        texts += [c.text for c in splitter.split(path.name, load_file(path.name, path.read_bytes()))]
    return texts


def evaluate(embedder, tokenizer, dataset: Path) -> dict:
    texts = chunk_texts(dataset)
    started = time.perf_counter()
    vectors = embedder.encode(texts)
    embed_s = time.perf_counter() - started
    bm25 = lexical.BM25Index(texts, tokenizer=tokenizer)
    questions = [json.loads(line) for line in (dataset / "questions.jsonl").read_text().splitlines() if line.strip()]
    firsts, latencies, unanswerable, answer_top = [], [], [], []
    for q in questions:
        started = time.perf_counter()
        cosine = vectors @ embedder.query_vector(q["question"])
        depth = min(len(texts), 50)
        best = lexical.fuse(np.argsort(-cosine)[:depth], bm25.scores(q["question"]), depth, 5)
        latencies.append((time.perf_counter() - started) * 1000)
        if not q["doc"]:
            unanswerable.append(float(cosine[best].max()))
            continue
        answer_top.append(float(cosine[best[:3]].max()))
        firsts.append(next((i for i, p in enumerate(best) if any(_norm(e) in _norm(texts[p]) for e in q["expect"])), None))
    return {
        "chunks": len(texts),
        **{f"hit@{k}": round(sum(1 for f in firsts if f is not None and f < k) / len(firsts), 3) for k in (1, 3, 5)},
        "embed_chunks_per_s": round(len(texts) / embed_s, 1),
        "search_p50_ms": round(statistics.median(latencies), 1),
        "unanswerable_max_cosine": round(max(unanswerable), 3) if unanswerable else None,
        "answerable_min_top3_cosine": round(min(answer_top), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="compare retrieval options on the dev sets")
    parser.add_argument("--embedders", default="e5,minilm", help="comma list of --embedding-model values")
    parser.add_argument("--segmenters", default="jieba,bigram", help=f"comma list of {sorted(SEGMENTERS)}")
    parser.add_argument("--sets", default="rag-dev-zh,rag-dev")
    args = parser.parse_args()
    rows = []
    for name in args.embedders.split(","):
        embedder = build_embedder(name)
        for segmenter in args.segmenters.split(","):
            for set_name in args.sets.split(","):
                row = {"embedder": name, "segmenter": segmenter, "set": set_name,
                       **evaluate(embedder, SEGMENTERS[segmenter], SETS[set_name])}
                print(json.dumps(row, ensure_ascii=False), flush=True)
                rows.append(row)
    out = ROOT / "bench" / "results" / "rag_options.json"
    out.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
