"""Metrics read from the services when Prometheus scrapes: gauges of the engine's state, and the counters the
knowledge, history and remote-engine code keep for themselves."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from chat import ChatService
    from knowledge.service import KnowledgeService


class ServiceCollector(Collector):
    def __init__(self, chat: "ChatService", knowledge: Optional["KnowledgeService"], labels: dict[str, str]) -> None:
        self.chat = chat
        self.knowledge = knowledge
        self.labels = labels

    def collect(self) -> Iterator:
        yield from self._engine()
        if self.knowledge is not None:
            yield from self._ingestion(self.knowledge.counters.snapshot())
        if self.chat.history is not None:
            yield from self._history(self.chat.history.counters.snapshot())

    def _engine(self) -> Iterator:
        names, values = list(self.labels), list(self.labels.values())
        health = self.chat.engine.health()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            return family

        yield gauge("vllm:num_requests_running", "Requests in the running batch.", health.get("running", 0))
        if "waiting" in health:
            yield gauge("vllm:num_requests_waiting", "Requests waiting for a batch slot.", health["waiting"])
        if "kv_cache_usage" in health:
            yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage: 1 means full.", health["kv_cache_usage"])
        prefix = health.get("prefix_cache")
        if prefix:
            yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                          prefix.get("query_tokens", 0))
            yield counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                          prefix.get("hit_tokens", 0))
        if "engine_url" in health:  # an inference server of its own (--backend openai, vllm, llamacpp)
            yield from self._remote(health)

    @staticmethod
    def _remote(health: dict) -> Iterator:
        up = GaugeMetricFamily("chatllm_engine_up", "Whether the inference engine answered last time.",
                               labels=["engine_url"])
        up.add_metric([health["engine_url"]], 1.0 if health.get("ready") else 0.0)
        yield up
        errors = CounterMetricFamily("chatllm_engine_errors", "Remote-engine requests that failed, and retries "
                                     "before a first token.", labels=["engine_url", "kind"])
        errors.add_metric([health["engine_url"], "failed"], health.get("failed", 0))
        errors.add_metric([health["engine_url"], "retried"], health.get("retries", 0))
        yield errors
        ignored = CounterMetricFamily("chatllm_engine_ignored_params", "Requests that set a sampling field the "
                                      "engine cannot take.", labels=["engine_url"])
        ignored.add_metric([health["engine_url"]], health.get("ignored_params", 0))
        yield ignored
        if "process" in health:
            restarts = CounterMetricFamily("chatllm_engine_restarts", "Restarts of the supervised engine process.")
            restarts.add_metric([], health["process"]["restarts"])
            yield restarts

    @staticmethod
    def _ingestion(counts: dict) -> Iterator:
        files = CounterMetricFamily("chatllm_ingest_files", "Uploaded files by outcome.", labels=["status"])
        for status in ("added", "replaced", "unchanged", "failed", "cancelled"):
            files.add_metric([status], counts.get(f"files_{status}", 0))
        yield files
        yield CounterMetricFamily("chatllm_ingest_chunks", "Chunks embedded and stored.",
                                  value=counts.get("chunks", 0))
        yield CounterMetricFamily("chatllm_ingest_seconds", "Time spent in ingestion jobs.",
                                  value=counts.get("seconds", 0.0))
        jobs = CounterMetricFamily("chatllm_ingest_jobs", "Ingestion jobs by final state.", labels=["state"])
        for state in ("done", "failed", "cancelled"):
            jobs.add_metric([state], counts.get(f"jobs_{state}", 0))
        yield jobs

    @staticmethod
    def _history(counts: dict) -> Iterator:
        writes = CounterMetricFamily("chatllm_history_writes", "Conversation writes by outcome.", labels=["outcome"])
        writes.add_metric(["ok"], counts.get("writes", 0))
        writes.add_metric(["failed"], counts.get("write_failures", 0))
        yield writes
        yield CounterMetricFamily("chatllm_history_write_seconds", "Time spent writing exchanges.",
                                  value=counts.get("write_seconds", 0.0))
