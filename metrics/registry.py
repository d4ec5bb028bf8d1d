"""The instruments, one registry per service (no process-wide state: tests run several apps in one process).

Engine metrics carry vLLM's names, labels and buckets, so vLLM's Grafana
dashboard reads our in-process runner unchanged; what vLLM does not measure
(HTTP routes, retrieval, ingestion, history, a remote engine's failures) is
named `chatllm_...`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from chat.observer import ChatObserver, RequestTimings
from metrics.collector import ServiceCollector

if TYPE_CHECKING:
    from chat import ChatService
    from knowledge.service import KnowledgeService

# vLLM's own bucket boundaries, so its dashboard's quantiles mean the same here
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
RETRIEVAL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
ENGINE_LABELS = ("model_name", "engine")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics(ChatObserver):
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self._attached = False
        self._labels = {"model_name": model_name, "engine": "0"}
        r, L = self.registry, ENGINE_LABELS
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", L, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generation tokens processed.", L, registry=r)
        self.request_success = Counter("vllm:request_success", "Finished requests.", (*L, "finished_reason"),
                                       registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", L,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Inter-token latency.", L,
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.", L,
                             buckets=REQUEST_BUCKETS, registry=r)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Time spent waiting for a batch slot.", L,
                               buckets=REQUEST_BUCKETS, registry=r)
        self.request_prompt = Histogram("vllm:request_prompt_tokens", "Prompt tokens per request.", L,
                                        buckets=TOKEN_BUCKETS, registry=r)
        self.request_generation = Histogram("vllm:request_generation_tokens", "Generated tokens per request.", L,
                                            buckets=TOKEN_BUCKETS, registry=r)
        self.generation_errors = Counter("chatllm_generation_errors", "Generations that failed in the engine.",
                                         ("model_name",), registry=r)
        self.http_requests = Counter("chatllm_http_requests", "HTTP requests by route and status.",
                                     ("method", "route", "status"), registry=r)
        self.http_seconds = Histogram("chatllm_http_request_duration_seconds", "HTTP request time, to the last byte.",
                                      ("method", "route"), buckets=HTTP_BUCKETS, registry=r)
        self.retrieval_seconds = Histogram("chatllm_retrieval_duration_seconds", "Knowledge-base search time.",
                                           buckets=RETRIEVAL_BUCKETS, registry=r)
        self.retrievals = Counter("chatllm_retrievals", "Knowledge-base searches, by whether a relevant passage "
                                  "was found.", ("matched",), registry=r)
        self.retrieval_hits = Counter("chatllm_retrieval_hits", "Relevant passages returned by searches.",
                                      registry=r)

    def attach(self, chat: "ChatService", knowledge: Optional["KnowledgeService"]) -> None:
        """Read engine, knowledge and history state at scrape time."""
        if not self._attached:  # several apps may share one service (and its metrics)
            self.registry.register(ServiceCollector(chat, knowledge, self._labels))
            self._attached = True

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # ---- ChatObserver ------------------------------------------------------------------------

    def generation_finished(self, timings: RequestTimings, ended: float) -> None:
        labels = self._labels
        if timings.finish_reason == "error":
            self.generation_errors.labels(labels["model_name"]).inc()
            return
        self.request_success.labels(**labels, finished_reason=timings.finish_reason).inc()
        self.e2e.labels(**labels).observe(ended - timings.started)
        if timings.first_token is not None:
            self.ttft.labels(**labels).observe(timings.first_token - timings.started)
        itl = self.itl.labels(**labels)
        for gap in timings.inter_token_latencies():
            itl.observe(gap)
        if timings.queue_s is not None:
            self.queue.labels(**labels).observe(timings.queue_s)
        if timings.prompt_tokens or timings.generation_tokens:
            self.prompt_tokens.labels(**labels).inc(timings.prompt_tokens)
            self.generation_tokens.labels(**labels).inc(timings.generation_tokens)
            self.request_prompt.labels(**labels).observe(timings.prompt_tokens)
            self.request_generation.labels(**labels).observe(timings.generation_tokens)

    def retrieval_finished(self, seconds: float, hits: int, matched: bool) -> None:
        self.retrieval_seconds.observe(seconds)
        self.retrievals.labels("true" if matched else "false").inc()
        self.retrieval_hits.inc(hits)

    # ---- HTTP ------------------------------------------------------------------------------------

    def http_finished(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_seconds.labels(method, route).observe(seconds)
