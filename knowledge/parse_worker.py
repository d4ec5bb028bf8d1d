"""The upload parser process: files in over stdin, chunks out as JSON over stdout.

Started and fed by `knowledge.sandbox.ParserSandbox`. Parsing untrusted
.docx/.pdf files runs here, under an address-space limit, so a parser that
crashes, loops or swallows memory fails one file instead of the server.
Replies are JSON, never pickle: the server must not trust this process either.

Wire format (both directions, big-endian lengths):
  request:  u32 name length, name (UTF-8), u64 data length, data
  reply:    u64 length, JSON {"ok": true, "chunks": [[text, page, heading], ...]}
                          or {"ok": false, "reason": "..."}
"""

from __future__ import annotations

import json
import logging
import resource
import struct
import sys
from typing import BinaryIO, Optional

log = logging.getLogger("knowledge.parse_worker")


def _read_exact(stream: BinaryIO, size: int) -> Optional[bytes]:
    data = bytearray()
    while len(data) < size:
        piece = stream.read(size - len(data))
        if not piece:
            return None
        data += piece
    return bytes(data)


def _parse(name: str, data: bytes, limits, splitter, max_chunks: int) -> dict:
    from knowledge.loaders import LoaderError, load_file

    try:
        chunks = splitter.split(name, load_file(name, data, limits))
    except LoaderError as exc:
        return {"ok": False, "reason": str(exc)}
    except RecursionError:
        return {"ok": False, "reason": "the file is nested too deeply to parse"}
    except Exception as exc:  # a parser bug on odd input: this file fails, with a sentence, not internals
        log.warning("parser failed on %r: %r", name, exc)
        return {"ok": False, "reason": "the file could not be parsed (damaged or unusual structure)"}
    if not chunks:
        return {"ok": False, "reason": "the file has no text"}
    if len(chunks) > max_chunks:
        return {"ok": False, "reason": f"the file splits into {len(chunks)} chunks; the limit is {max_chunks} "
                                       "(--max-chunks-per-file)"}
    return {"ok": True, "chunks": [[c.text, c.page, c.heading] for c in chunks]}


def main(settings_json: str) -> int:
    settings = json.loads(settings_json)
    memory = int(settings.get("memory_bytes") or 0)
    if memory:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s parse-worker: %(message)s")
    from knowledge.loaders import ParseLimits
    from knowledge.splitting import DocumentSplitter, SplitterSettings

    limits = ParseLimits(**settings["limits"])
    splitter = DocumentSplitter(SplitterSettings(**settings["splitter"]))
    max_chunks = int(settings["max_chunks"])
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print from a library must not corrupt the replies
    while True:
        head = _read_exact(requests, 4)
        if head is None:
            return 0  # the server closed the pipe
        name = (_read_exact(requests, struct.unpack(">I", head)[0]) or b"").decode("utf-8", "replace")
        size = _read_exact(requests, 8)
        data = _read_exact(requests, struct.unpack(">Q", size)[0]) if size else None
        if data is None:
            return 0
        exhausted = False
        try:
            reply = _parse(name, data, limits, splitter, max_chunks)
        except MemoryError:
            reply = {"ok": False, "reason": "the file needs more memory to parse than allowed (--parser-memory-mb)"}
            exhausted = True
        del data
        body = json.dumps(reply, ensure_ascii=False).encode("utf-8")
        replies.write(struct.pack(">Q", len(body)) + body)
        replies.flush()
        if exhausted:
            return 3  # after a MemoryError the heap may be unusable: the server starts a fresh process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
