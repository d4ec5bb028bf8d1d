"""What happened while answering one request: named, timed steps with their attributes.

A Trace is filled by the chat service as it works (history load, retrieval,
prompt building, generation), stored with the conversation, returned by
`POST /run`, and, with `--otlp-endpoint`, exported through the OpenTelemetry
SDK using the GenAI semantic conventions.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

log = logging.getLogger(__name__)


@dataclass
class Span:
    name: str
    start: float  # epoch seconds
    duration_ms: float = 0.0
    attributes: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"name": self.name, "start": round(self.start, 6), "duration_ms": round(self.duration_ms, 3),
                "attributes": self.attributes}


@dataclass
class Trace:
    name: str = "chat"
    id: str = field(default_factory=lambda: secrets.token_hex(16))  # 128 bits, an OpenTelemetry trace id
    start: float = field(default_factory=time.time)
    spans: list[Span] = field(default_factory=list)

    @contextlib.contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[Span]:
        started, clock = time.time(), time.perf_counter()
        span = Span(name, started, attributes=dict(attributes))
        try:
            yield span
        except BaseException as exc:
            span.attributes["error"] = type(exc).__name__
            raise
        finally:
            span.duration_ms = (time.perf_counter() - clock) * 1000
            self.spans.append(span)

    def as_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "start": round(self.start, 6), "spans": [s.as_dict() for s in self.spans]}


# our span names -> the GenAI conventions' operation names
_OPERATIONS = {"generation": "chat", "retrieval": "retrieval", "history.load": "history", "prompt": "prompt"}


class OtlpExporter:
    """Sends finished traces over OTLP/HTTP; one root span per trace, a child per step."""

    def __init__(self, endpoint: str, service_name: str, model: str) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self._provider = TracerProvider(resource=Resource.create({"service.name": f"chatllm-webui-{service_name}"}))
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, timeout=5)))
        self._tracer = self._provider.get_tracer("chatllm-webui")
        self.model = model

    def export(self, trace: Trace, session_id: Optional[str], user_id: Optional[str]) -> None:
        from opentelemetry import trace as otel
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

        parent = NonRecordingSpan(SpanContext(trace_id=int(trace.id, 16), span_id=int(secrets.token_hex(8), 16),
                                              is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)))
        end = max((s.start + s.duration_ms / 1000 for s in trace.spans), default=trace.start)
        root_attrs = {"gen_ai.operation.name": "chat", "gen_ai.request.model": self.model,
                      "gen_ai.system": "chatllm-webui"}
        if session_id:
            root_attrs["session.id"] = root_attrs["gen_ai.conversation.id"] = session_id
        if user_id:
            root_attrs["user.id"] = user_id
        root = self._tracer.start_span(f"chat {self.model}", context=otel.set_span_in_context(parent),
                                       start_time=_ns(trace.start), attributes=root_attrs)
        context = otel.set_span_in_context(root)
        for step in trace.spans:
            attributes = {"gen_ai.operation.name": _OPERATIONS.get(step.name, step.name)}
            attributes.update({k: _otel_value(v) for k, v in _genai(step).items()})
            child = self._tracer.start_span(step.name, context=context, start_time=_ns(step.start), attributes=attributes)
            child.end(end_time=_ns(step.start + step.duration_ms / 1000))
        root.end(end_time=_ns(end))

    def shutdown(self) -> None:
        self._provider.shutdown()


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _genai(span: Span) -> dict[str, Any]:
    """Our attribute names with the GenAI conventions' names alongside."""
    a = dict(span.attributes)
    mapping = {"temperature": "gen_ai.request.temperature", "top_p": "gen_ai.request.top_p",
               "top_k": "gen_ai.request.top_k", "max_new_tokens": "gen_ai.request.max_tokens",
               "prompt_tokens": "gen_ai.usage.input_tokens", "completion_tokens": "gen_ai.usage.output_tokens",
               "seed": "gen_ai.request.seed"}
    out = {mapping.get(k, f"chatllm.{k}"): v for k, v in a.items() if v is not None}
    if a.get("finish_reason"):
        out["gen_ai.response.finish_reasons"] = [a["finish_reason"]]
    return out


def _otel_value(value: Any) -> Any:
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, bool, int, float)) for v in value):
        return list(value)
    import json

    return json.dumps(value, ensure_ascii=False, default=str)[:4096]
