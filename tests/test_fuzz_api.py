"""Property-based fuzzing of every route in /openapi.json (schemathesis): no 5xx, every error is JSON.

Valid and invalid requests are generated from the published schemas; the
server runs the real model with a small context and a short default answer
(generated answers were most of the test's time), its own knowledge folder
(so generated deletes touch nothing else) and its own conversation database.
`bench/fuzz.py` runs the same check with many more examples.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

from chat import ChatLimits, ChatService
from engine.config import EngineConfig
from history import HistoryConfig, HistoryService
from engine.factory import build_engine
from knowledge.config import KnowledgeConfig
from knowledge.service import KnowledgeService
from tests.conftest import LiveServer, serve

EXAMPLES = int(os.environ.get("CHATLLM_FUZZ_EXAMPLES", "8"))


@pytest.fixture(scope="module")
def fuzz_server(embedder, tmp_path_factory) -> Iterator[LiveServer]:
    engine = build_engine(EngineConfig(max_model_len=64))
    knowledge = KnowledgeService(KnowledgeConfig(knowledge_dir=str(tmp_path_factory.mktemp("fuzz-kb"))), embedder)
    # conversations kept, so the history routes are fuzzed against a real database, not their 404
    history = HistoryService(HistoryConfig(), f"sqlite:///{tmp_path_factory.mktemp('fuzz-history') / 'h.db'}")
    history.start()
    chat = ChatService(engine, knowledge, history=history, limits=ChatLimits(default_max_new_tokens=16))
    yield from serve(chat, None, knowledge=knowledge)
    chat.shutdown()
    history.shutdown()
    knowledge.shutdown()
    engine.shutdown()


def fuzz_routes(url: str, examples: int, derandomize: bool = True) -> list[str]:
    """Problems found (empty when none): 5xx answers, and errors that are not the JSON error shape.

    The suite explores the same examples every run (a failure there is
    reproducible); bench/fuzz.py draws new ones each time.
    """
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    problems: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14, [op.label for op in operations]
    for operation in operations:
        for mode in schemathesis.GenerationMode:
            @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck), derandomize=derandomize)
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case) -> None:
                response = case.call(base_url=url, timeout=120)
                where = f"{operation.label} ({mode.value}): {case.body!r}"[:300]
                if response.status_code >= 500:
                    problems.append(f"{response.status_code} from {where}: {response.text[:200]}")
                elif response.status_code >= 400:
                    try:
                        error = json.loads(response.content)["error"]
                        assert isinstance(error["message"], str) and error["message"]
                    except (ValueError, KeyError, TypeError, AssertionError):
                        problems.append(f"non-JSON {response.status_code} error from {where}: {response.text[:200]}")

            try:
                check()
            except Unsatisfiable:
                pass  # no invalid request exists for a route without inputs (GET /health)
    return problems


def test_fuzzing_every_route_finds_no_server_error(fuzz_server):
    assert fuzz_routes(fuzz_server.url, EXAMPLES) == []
