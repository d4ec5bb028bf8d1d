"""Where knowledge bases live: folders of FAISS versions (the default), or Milvus.

The service asks its catalog which bases exist now (another instance may have
made or deleted one), opens them, and removes them; everything else goes
through the base object, which is the same interface for both stores.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from knowledge.folder_lock import LOCK_FILE, folder_lock
from knowledge.persistence import current_version

if TYPE_CHECKING:
    from knowledge.embeddings import Embedder
    from knowledge.splitting import SplitterSettings
    from knowledge.store import KnowledgeBase


class FolderCatalog:
    """One folder per base under `root`, shareable by instances on one machine or a network file system."""

    def __init__(self, root: Path, embedder: "Embedder", settings: "SplitterSettings") -> None:
        self.root = root
        self.embedder = embedder
        self.settings = settings
        root.mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return str(self.root)

    def names(self) -> set[str]:
        return {p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")}

    def saved(self, name: str) -> bool:
        return current_version(self.root / name) is not None

    def open(self, name: str) -> "KnowledgeBase":
        from knowledge.store import KnowledgeBase

        return KnowledgeBase(name, self.root / name, self.embedder, self.settings)

    def remove(self, base: "KnowledgeBase") -> None:
        with folder_lock(base.folder):  # not while another instance saves into it
            for item in base.folder.iterdir():
                if item.name == LOCK_FILE:
                    continue  # the lock holder still has it open
                if item.is_dir() and not item.is_symlink():
                    shutil.rmtree(item, ignore_errors=True)
                else:
                    item.unlink(missing_ok=True)
        shutil.rmtree(base.folder, ignore_errors=True)

    def close(self) -> None:
        pass
