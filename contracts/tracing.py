"""OpenTelemetry traces for the server and the trainer: the config, and the tracer built from it.

Off by default. Off, `start_tracing` returns TRACING_OFF (tracer None) without importing the OpenTelemetry SDK
or an exporter, and the code that traces checks `tracer is None` once per request. On, the decision to trace a
new trace is made before any span work (`Tracing.sampled`: one random draw against sample_ratio), so that an
unsampled request costs no span, context or id generation; a request whose W3C `traceparent` says "sampled" is
recorded whatever the ratio, one that says "not sampled" is not (the provider's sampler is
ParentBased(ALWAYS_ON)). Spans are buffered by a BatchSpanProcessor (a full queue drops spans, it never blocks
a request) and exported over OTLP/gRPC from its own thread. The provider is the
process's own, not the global one: two servers in one process (tests) each keep theirs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer


@dataclass(kw_only=True, frozen=True, slots=True)
class TracingConfig:
    enabled: bool = False                  # export OpenTelemetry spans over OTLP/gRPC
    otlp_endpoint: str = "localhost:4317"  # OTLP/gRPC collector, HOST:PORT
    sample_ratio: float = 1.0              # fraction of new traces recorded (0..1); a request carrying a W3C
                                           # traceparent follows its caller's sampling decision instead
    service_name: str = ""                 # OTel service.name; "": livetower-server or livetower-trainer
    tls: bool = False                      # TLS to the collector (system roots, or ca_file); off: plaintext
    ca_file: Path | None = None            # PEM CA bundle that signed the collector's certificate (with tls)
    export_interval_ms: float = 100.0      # how often buffered spans are sent
    max_queue_spans: int = 8192            # spans buffered for export; beyond: new spans dropped, never waited for
    export_batch_spans: int = 64           # spans per export call (at most): a small batch keeps each export's Python
                                           # encoding, which holds the GIL, short (512 at 1 s read P99 17 ms at 500 QPS)
    export_timeout_s: float = 10.0         # one export call's deadline
    exporter: Any = field(default=None, repr=False, compare=False, metadata={
        "doc": "a SpanExporter used instead of OTLP (tests, embedding); not a flag"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ValueError(f"tracing sample_ratio must be in [0, 1], got {self.sample_ratio}")
        if not self.otlp_endpoint.strip():
            raise ValueError("tracing otlp_endpoint must be HOST:PORT, got an empty string")
        if self.ca_file is not None:
            if not self.tls:
                raise ValueError("tracing ca_file is set but tls is off: pass tls (--tracing-tls) too")
            if not Path(self.ca_file).is_file():
                raise ValueError(f"tracing ca_file {self.ca_file} is not a readable file")
        if not self.export_interval_ms > 0:
            raise ValueError(f"tracing export_interval_ms must be > 0, got {self.export_interval_ms}")
        if self.export_batch_spans < 1:
            raise ValueError(f"tracing export_batch_spans must be >= 1, got {self.export_batch_spans}")
        if self.max_queue_spans < 1:
            raise ValueError(f"tracing max_queue_spans must be >= 1, got {self.max_queue_spans}")
        if not self.export_timeout_s > 0:
            raise ValueError(f"tracing export_timeout_s must be > 0, got {self.export_timeout_s}")


class Tracing:
    """A process's tracer (None: tracing is off) and its provider's flush and shutdown."""

    def __init__(self, tracer: "Tracer | None" = None, provider: Any = None, sample_ratio: float = 1.0) -> None:
        self.tracer = tracer
        self.sample_ratio = sample_ratio
        self._provider = provider
        if tracer is not None:
            from opentelemetry.trace import get_current_span
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

            self._propagator = TraceContextTextMapPropagator()
            self.current_span = get_current_span  # the span current in this task or thread (per request: no import)

    def sampled(self, metadata: Mapping[str, str]) -> bool:
        """Whether to start a span for a unit of work (a request, a round): always when the caller sent a
        traceparent (its own flag then decides, through the ParentBased sampler), else with sample_ratio."""
        return "traceparent" in metadata or random.random() < self.sample_ratio

    def extract(self, metadata: Mapping[str, str]) -> "Context | None":
        """The caller's trace context from W3C `traceparent`/`tracestate` metadata; None when it sent none."""
        if "traceparent" not in metadata:
            return None
        return self._propagator.extract(metadata)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Export every span ended so far; False when that did not finish within timeout_s."""
        return self._provider.force_flush(int(timeout_s * 1000)) if self._provider is not None else True

    def shutdown(self) -> None:
        """Flush and stop the exporter thread (idempotent)."""
        if self._provider is not None:
            provider, self._provider = self._provider, None
            provider.shutdown()


TRACING_OFF = Tracing()


def start_tracing(config: TracingConfig | None, default_service: str) -> Tracing:
    """The tracer for config: TRACING_OFF when config is None or disabled (nothing of the SDK is imported)."""
    if config is None or not config.enabled:
        return TRACING_OFF
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

    exporter = config.exporter if config.exporter is not None else _otlp_exporter(config)
    provider = TracerProvider(resource=Resource.create({"service.name": config.service_name or default_service}),
                              sampler=ParentBased(ALWAYS_ON))  # new traces: Tracing.sampled
    provider.add_span_processor(BatchSpanProcessor(
        exporter, max_queue_size=config.max_queue_spans, max_export_batch_size=min(config.export_batch_spans, config.max_queue_spans),
        schedule_delay_millis=config.export_interval_ms, export_timeout_millis=config.export_timeout_s * 1000))
    return Tracing(provider.get_tracer("livetower"), provider, config.sample_ratio)


def _otlp_exporter(config: TracingConfig):
    import grpc
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    credentials = None
    if config.tls:
        ca = Path(config.ca_file).read_bytes() if config.ca_file else None
        credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    return OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=not config.tls, credentials=credentials,
                            timeout=config.export_timeout_s)


def child_span(tracer: "Tracer", parent: "Span", name: str, start_ns: int, end_ns: int,
               attributes: Mapping[str, Any] | None = None) -> None:
    """Record a finished child of parent from start_ns to end_ns (epoch ns): for work timed elsewhere (the
    compute thread), recorded after the fact so that no span is open while it runs."""
    from opentelemetry.trace import set_span_in_context

    span = tracer.start_span(name, context=set_span_in_context(parent), start_time=start_ns, attributes=attributes)
    span.end(end_time=end_ns)
