"""Server settings; `webui/cli.py` turns these fields into command-line flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

TOKEN_ENV = "CHATLLM_TOKEN"


@dataclass
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0 for every interface)"})
    port: int = field(default=8000, metadata={"help": "port for the WebUI and every API"})
    token: Optional[str] = field(
        default_factory=lambda: os.environ.get(TOKEN_ENV) or None,
        metadata={
            "help": f"require this token (Authorization: <token> or Bearer <token>) on every API "
            f"route and the WebSocket; default: ${TOKEN_ENV}, else no authentication",
        },
    )
    max_request_bytes: int = field(
        default=1 << 20,
        metadata={"help": "largest chat request body or WebSocket frame accepted, in bytes"},
    )
    api_only: bool = field(default=False, metadata={"help": "serve only the APIs, not the WebUI page"})
    ui_concurrency: int = field(
        default=16,
        metadata={"help": "WebUI events (answers, uploads) served at once; the engine interleaves the answers"},
    )
    log_level: str = field(
        default="info",
        metadata={"help": "logging verbosity", "choices": ["debug", "info", "warning", "error"]},
    )
