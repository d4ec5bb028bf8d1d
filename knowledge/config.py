"""Knowledge-base settings; `webui/cli.py` turns these fields into command-line flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from knowledge.splitting import DEFAULT_CHUNK_OVERLAP, DEFAULT_CHUNK_SIZE


@dataclass
class KnowledgeConfig:
    knowledge_dir: str = field(
        default="knowledge_data",
        metadata={"help": "folder holding the knowledge bases (one sub-folder each)"},
    )
    embedding_model: Optional[str] = field(
        default=None,
        metadata={
            "help": "sentence-transformers model directory or hub id (BGE v1.5, bge-m3, MiniLM...); "
            "default: the embedded all-MiniLM-L6-v2",
        },
    )
    chunk_size: int = field(
        default=DEFAULT_CHUNK_SIZE,
        metadata={"help": "characters per chunk (chosen by measurement on the rag-dev set; see bench/README.md)"},
    )
    chunk_overlap: int = field(default=DEFAULT_CHUNK_OVERLAP, metadata={"help": "characters shared by neighbouring chunks"})
    score_threshold: float = field(
        default=0.35,
        metadata={"help": "a chunk counts as relevant from this cosine similarity (or a strong keyword match)"},
    )
    keyword_threshold: float = field(
        default=0.6,
        metadata={"help": "share of the question's terms a chunk must contain to count as relevant by keywords"},
    )
    rag_prompt_file: Optional[str] = field(
        default=None,
        metadata={"help": "a text file with the grounded-answer prompt; must contain {context} and {question}"},
    )
    max_upload_mb: float = field(default=20.0, metadata={"help": "largest file accepted for the knowledge base, in MB"})
    max_upload_files: int = field(default=20, metadata={"help": "most files accepted in one upload"})
