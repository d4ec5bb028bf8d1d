"""Knowledge-base settings; `webui/cli.py` turns these fields into command-line flags."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from knowledge.loaders import ParseLimits
from knowledge.splitting import DEFAULT_CHUNK_OVERLAP, DEFAULT_CHUNK_SIZE

#: where versions before --data-dir kept the knowledge bases; still used when it holds them
LEGACY_KNOWLEDGE_DIR = "knowledge_data"


@dataclass
class KnowledgeConfig:
    knowledge_dir: Optional[str] = field(
        default=None,
        metadata={"help": "folder holding the knowledge bases (one sub-folder each); default: knowledge/ in --data-dir "
                          "(or ./knowledge_data where an earlier version left its bases)"},
    )
    vector_store: str = field(
        default="faiss",
        metadata={"help": "where chunks and vectors live: faiss = versioned folders under --knowledge-dir (instances "
                          "on one machine or a shared file system can share them); milvus = Milvus at --milvus-uri",
                  "choices": ["faiss", "milvus"]},
    )
    milvus_uri: Optional[str] = field(
        default=None,
        metadata={"help": "--vector-store milvus: a *.db file runs Milvus Lite in this process (one process per file); "
                          "http://host:19530 a Milvus server or cluster, shared by every instance; default: "
                          "milvus.db in --knowledge-dir"},
    )
    milvus_token: Optional[str] = field(
        default=None, metadata={"help": "Milvus credentials (user:password or an API key)"},
    )
    milvus_collection_prefix: str = field(
        default="chatllm",
        metadata={"help": "prefix of this service's Milvus collections (<prefix>_catalog, <prefix>_kb_<hash>)"},
    )
    embedding_model: Optional[str] = field(
        default=None,
        metadata={
            "help": "embedding model: multilingual-e5-small (the default, bundled, 100 languages), "
            "all-MiniLM-L6-v2 (bundled, English only, ~10x faster to ingest), or a sentence-transformers "
            "model directory or hub id (BGE v1.5, bge-m3...)",
        },
    )
    chunk_size: int = field(
        default=DEFAULT_CHUNK_SIZE,
        metadata={"help": "characters per chunk (chosen by measurement on the rag-dev set; see bench/README.md)"},
    )
    chunk_overlap: int = field(default=DEFAULT_CHUNK_OVERLAP, metadata={"help": "characters shared by neighbouring chunks"})
    score_threshold: Optional[float] = field(
        default=None,
        metadata={"help": "a chunk counts as relevant from this cosine similarity (or a strong keyword match); "
                          "default: the embedding model's calibrated value (0.85 for E5, 0.35 otherwise)"},
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
    max_pages_per_file: int = field(default=1000, metadata={"help": "a PDF with more pages is refused"})
    max_chunks_per_file: int = field(default=4000, metadata={"help": "a file that splits into more chunks is refused"})
    max_uncompressed_mb: float = field(
        default=200.0, metadata={"help": "a .docx whose parts unpack to more than this is refused (zip bombs)"},
    )
    max_compression_ratio: float = field(
        default=100.0, metadata={"help": "a .docx unpacking to more than this many times its size is refused"},
    )
    parser_memory_mb: int = field(
        default=2048,
        metadata={"help": "address-space limit of the process that parses uploads; a file that needs more fails alone"},
    )
    ingest_timeout: float = field(
        default=900.0, metadata={"help": "seconds an upload job may take (parsing, embedding, saving) before it is failed"},
    )
    max_ingest_jobs: int = field(
        default=8, metadata={"help": "upload jobs queued or running at once; past it uploads get 503 with Retry-After"},
    )

    def parse_limits(self) -> ParseLimits:
        return ParseLimits(
            max_pages=self.max_pages_per_file,
            max_uncompressed_bytes=int(self.max_uncompressed_mb * 2**20),
            max_compression_ratio=self.max_compression_ratio,
        )

    def with_data_dir(self, data_dir: str) -> "KnowledgeConfig":
        """The knowledge folder made explicit: the flag, else an existing ./knowledge_data, else <data_dir>/knowledge."""
        if self.knowledge_dir is not None:
            return self
        legacy, fresh = Path(LEGACY_KNOWLEDGE_DIR), Path(data_dir) / "knowledge"
        if legacy.is_dir() and any(legacy.iterdir()) and not fresh.exists():
            return replace(self, knowledge_dir=str(legacy))
        return replace(self, knowledge_dir=str(fresh))
