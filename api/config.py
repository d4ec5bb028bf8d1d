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
        metadata={"help": "largest request body (uploads excepted) or WebSocket frame accepted, in bytes; "
                          "checked before the body is read"},
    )
    max_json_depth: int = field(
        default=32, metadata={"help": "deepest nesting of arrays and objects accepted in a JSON body"},
    )
    allowed_origins: Optional[str] = field(
        default=None,
        metadata={"help": "comma-separated web origins (https://app.example.com) whose pages may call the APIs "
                          "from a browser and open the WebSocket; the server's own origin is always allowed"},
    )
    session_hours: float = field(
        default=12.0, metadata={"help": "how long a WebUI login lasts (with --token)"},
    )
    max_auth_failures: int = field(
        default=10,
        metadata={"help": "failed logins or wrong tokens from one address within a minute before it gets 429"},
    )
    max_connections: int = field(
        default=512, metadata={"help": "open connections and running requests at once; past it requests get 503"},
    )
    header_timeout: float = field(
        default=10.0, metadata={"help": "seconds a client has to send a request's headers before it is disconnected"},
    )
    body_timeout: float = field(
        default=60.0, metadata={"help": "seconds a client has to send a request body (uploads excepted) before it gets 408"},
    )
    keep_alive_timeout: float = field(
        default=5.0, metadata={"help": "seconds an idle keep-alive connection is kept open"},
    )
    ws_idle_timeout: float = field(
        default=600.0, metadata={"help": "seconds a WebSocket may stay silent (no frame, no answer running) before it is closed"},
    )
    ws_send_timeout: float = field(
        default=30.0, metadata={"help": "seconds a WebSocket client may leave an answer frame unread before it is closed"},
    )
    ws_max_pending: int = field(
        default=8, metadata={"help": "frames a WebSocket may have waiting for an answer; past it the server stops reading"},
    )
    data_dir: str = field(
        default="data",
        metadata={"help": "folder (relative to the working directory) for the service's data: chat_history.db and, "
                          "unless --knowledge-dir says otherwise, the knowledge bases"},
    )
    api_only: bool = field(default=False, metadata={"help": "serve only the APIs, not the WebUI page"})
    metrics_public: bool = field(
        default=False,
        metadata={"help": "serve /metrics without the token (for a Prometheus inside a trusted network); "
                          "/health/live and /health/ready are always open"},
    )
    ui_concurrency: int = field(
        default=16,
        metadata={"help": "WebUI events (answers, uploads) served at once; the engine interleaves the answers"},
    )
    log_level: str = field(
        default="info",
        metadata={"help": "logging verbosity", "choices": ["debug", "info", "warning", "error"]},
    )

    def origins(self) -> frozenset[str]:
        return frozenset(o.strip().rstrip("/").lower() for o in (self.allowed_origins or "").split(",") if o.strip())
