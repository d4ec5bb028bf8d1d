"""Start ChatLLM-WebUI: the WebUI and every API on one port, over one model.

    python webui/webui_server.py --port=8000 --model-path=Qwen/Qwen2-7B-Instruct

Runs from a checkout without installing: the repository root is put on the path.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from api.config import TOKEN_ENV, ServerConfig  # noqa: E402
from chat.limits import ChatLimits  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from history.config import HistoryConfig  # noqa: E402
from knowledge.config import KnowledgeConfig  # noqa: E402
from webui.cli import add_flags, from_args, non_defaults  # noqa: E402

log = logging.getLogger("chatllm")


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[ServerConfig, ChatLimits, EngineConfig, KnowledgeConfig,
                                                              HistoryConfig]:
    parser = argparse.ArgumentParser(
        prog="webui_server.py",
        description="ChatLLM-WebUI: a Gradio WebUI, the EAS ChatLLM HTTP/WebSocket API and an "
        "OpenAI-compatible API on one port, over one shared model runner.",
        epilog=f"The token can also come from the environment variable {TOKEN_ENV}.",
    )
    add_flags(parser, ServerConfig, "server")
    add_flags(parser, ChatLimits, "requests")
    add_flags(parser, EngineConfig, "model")
    add_flags(parser, KnowledgeConfig, "knowledge base")
    add_flags(parser, HistoryConfig, "conversations and traces")
    args = parser.parse_args(argv)
    try:
        history_config = from_args(HistoryConfig, args)
    except ValueError as exc:
        parser.error(str(exc))
    return (from_args(ServerConfig, args), from_args(ChatLimits, args), from_args(EngineConfig, args),
            from_args(KnowledgeConfig, args), history_config)


def main(argv: Optional[Sequence[str]] = None) -> int:
    server_config, chat_limits, engine_config, knowledge_config, history_config = parse_args(argv)
    knowledge_config = knowledge_config.with_data_dir(server_config.data_dir)
    logging.basicConfig(
        level=server_config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per engine request would drown the log
    changed = {**non_defaults(server_config), **non_defaults(chat_limits), **non_defaults(engine_config, ("engine_api_key",)),
               **non_defaults(knowledge_config, ("milvus_token",)), **non_defaults(history_config, ("token", "history_db"))}
    log.info("settings: %s", changed or "all defaults")

    from chat import ChatService
    from engine import ModelLoadError
    from engine.factory import build_engine
    from knowledge.embeddings import EmbeddingLoadError, build_embedder
    from knowledge.service import KnowledgeService
    from knowledge.store import KnowledgeBaseError

    history = None
    if history_config.history:
        from history import HistoryService

        # the database before the model: a wrong URL fails in seconds, not after the model has loaded
        history = HistoryService(history_config, history_config.database_url(server_config.data_dir))
        try:
            history.start()  # schema upgrades before the first request
        except Exception as exc:
            print(f"error: the conversation database {history.health()['database']} could not be opened or upgraded: "
                  f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
            return 2
        log.info("conversations stored in %s", history.health()["database"])
    try:
        # the knowledge base first: its settings are checked in a second, the model takes longer
        knowledge = KnowledgeService(knowledge_config, build_embedder(knowledge_config.embedding_model))
        engine = build_engine(engine_config)
    except (ModelLoadError, EmbeddingLoadError, KnowledgeBaseError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import uvicorn

    from api.app import build_app
    from api.serving import uvicorn_config

    if history is not None:
        history.model_name = engine.model_name
    from metrics.registry import Metrics

    metrics = Metrics(engine.model_name)
    chat = ChatService(engine, knowledge, chat_limits, history, observer=metrics)
    ui = None
    if not server_config.api_only:
        from webui.ui import mount_ui

        ui = mount_ui(chat, knowledge, server_config.ui_concurrency, knowledge_config.max_upload_mb)
    app = build_app(server_config, chat, knowledge=knowledge, ui=ui, metrics=metrics)
    if not server_config.token:
        log.warning("no --token set: the API is open to anyone who can reach %s:%d", server_config.host, server_config.port)
    print(f"ChatLLM-WebUI serving {engine.model_name} at http://{server_config.host}:{server_config.port}", flush=True)
    # what start-up built lives as long as the server: out of the collector's sight, a full collection
    # no longer walks it (~50 ms, every thread waiting, a visible gap in every stream) (bench/README.md)
    gc.collect()
    gc.freeze()
    uvicorn.Server(uvicorn_config(app, server_config)).run()
    chat.shutdown()
    if history is not None:
        history.shutdown()  # the writes in flight land first
    engine.shutdown()
    knowledge.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
