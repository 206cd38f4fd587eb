"""Cross-cutting concerns for every unary RPC: request id, request-size limit, server-side deadline, logging,
metrics, and (when tracing is on) the request's span.

The request span (SERVER kind, named "<package.Service>/<Method>") is the parent of the batcher's spans
(server/batching.py) and carries: rpc.system/service/method, livetower.request_id, rpc.grpc.status_code,
livetower.engine_version, livetower.canary, livetower.arm and rpc.serialize_ms (with tracing on, the response is
serialised here, not by grpc, so that its cost is timed). A W3C traceparent in the request metadata makes it a child of
the caller's span."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc
from google.protobuf.message import DecodeError

from contracts.tracing import TRACING_OFF, Tracing

from server.config import MethodDeadlines
from server.metrics import ServerMetrics

log = logging.getLogger("livetower.rpc")
REQUEST_ID_KEY = "x-request-id"
SHED_CODES = ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")  # expected under overload: counted, logged in summary
SHED_LOG_INTERVAL_S = 5.0
QUERY_METHODS = frozenset(("/livetower.v1.Recommender/Recommend", "/livetower.v1.Recommender/Score",
                           "/inference.GRPCInferenceService/ModelInfer"))


def deadline_for(method: str, deadlines: MethodDeadlines) -> tuple[float, str]:
    """(seconds, the field that sets them) for a full method name."""
    if method in QUERY_METHODS:
        return deadlines.query_s, "deadline_query_s"
    if method == "/livetower.v1.Recommender/LogEvents":
        return deadlines.ingest_s, "deadline_ingest_s"
    if method.startswith("/livetower.v1.EngineAdmin/"):
        return deadlines.admin_s, "deadline_admin_s"
    return deadlines.other_s, "deadline_other_s"


class _ShedLog:
    """One log line per interval for shed requests (a line each would cost the overloaded loop more). The first shed
    after a quiet interval is logged at once; those after it within the interval are logged together when it ends,
    also when no further shed comes to trigger the line (a timer on the event loop)."""

    def __init__(self, interval_s: float = SHED_LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.counts: dict[str, int] = {}
        self.next_at = 0.0
        self._flush: asyncio.TimerHandle | None = None

    def add(self, method: str, code: str) -> None:
        key = f"{method} {code}"
        self.counts[key] = self.counts.get(key, 0) + 1
        now = time.monotonic()
        if now >= self.next_at:
            self.flush()
        elif self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(self.next_at - now, self.flush)

    def flush(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self.counts:
            log.warning("shed in the last %g s: %s (livetower_shed_total has them by reason)",
                        self.interval_s, ", ".join(f"{k} x{n}" for k, n in self.counts.items()))
            self.counts, self.next_at = {}, time.monotonic() + self.interval_s


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: ServerMetrics, max_request_bytes: int,
                 deadlines: MethodDeadlines | None = None, tracing: Tracing = TRACING_OFF) -> None:
        self.metrics = metrics
        self.tracing = tracing
        self.max_request_bytes = max_request_bytes
        self.deadlines = deadlines or MethodDeadlines()
        self._shed_log = _ShedLog()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = handler_call_details.method.rsplit("/", 1)[-1]
        metadata = dict(handler_call_details.invocation_metadata or ())
        metrics, max_bytes, shed_log = self.metrics, self.max_request_bytes, self._shed_log
        limit_s, limit_field = deadline_for(handler_call_details.method, self.deadlines)
        # The request is parsed here, not by grpc: a body that is not a valid message then gets
        # INVALID_ARGUMENT (grpc's own parse failure answers UNKNOWN and logs a traceback per request),
        # and the size limit is checked on the wire bytes before parsing. A refusing handler
        # (server/auth.py, server/ingest_guard.py) has no deserializer and gets the raw bytes.
        deserialize = handler.request_deserializer
        tracing = self.tracing
        serialize = handler.response_serializer if tracing.tracer is not None else None

        async def observed(raw: bytes, context: grpc.aio.ServicerContext):
            request_id = metadata.get(REQUEST_ID_KEY) or uuid.uuid4().hex[:16]
            context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
            t0 = time.perf_counter()
            code, version = "OK", ""
            span = None
            if tracing.tracer is not None and tracing.sampled(metadata):
                span, token = _start_span(tracing, handler_call_details.method, metadata, request_id)
            try:
                if len(raw) > max_bytes:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"request is {len(raw)} bytes; the limit is {max_bytes} (max_request_bytes)")
                try:
                    request = deserialize(raw) if deserialize is not None else raw
                except DecodeError as e:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"request is not a valid {method} message: {e}")
                remaining = context.time_remaining()
                if remaining is not None and remaining <= limit_s:
                    response = await inner(request, context)  # the client's own deadline is the tighter one
                else:
                    try:
                        async with asyncio.timeout(limit_s):
                            response = await inner(request, context)
                    except TimeoutError:
                        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                            f"{method} ran past the server's deadline of {limit_s:g} s "
                                            f"({limit_field})")
                version = str(getattr(response, "engine_version", "") or "")
                if serialize is not None:  # tracing on: this handler serialises (grpc has no serializer for it)
                    return _serialize_traced(span, serialize, response)
                return response
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except grpc.aio.AbortError:
                status = context.code()
                code = status.name if status is not None else "UNKNOWN"
                raise
            except Exception:
                code = "INTERNAL"
                log.exception("request %s %s failed", request_id, method)
                raise
            finally:
                if span is not None:
                    _end_span(span, token, code, version, context)
                elapsed = time.perf_counter() - t0
                metrics.latency.labels(method, version).observe(elapsed)
                metrics.responses.labels(method, code).inc()
                if code in SHED_CODES:
                    shed_log.add(method, code)
                elif code not in ("OK", "INVALID_ARGUMENT"):
                    log.warning("request %s %s -> %s in %.1f ms", request_id, method, code, elapsed * 1e3)

        return grpc.unary_unary_rpc_method_handler(
            observed, request_deserializer=None,
            response_serializer=handler.response_serializer if serialize is None else None)


# The status codes that mark a server span as failed (OpenTelemetry's gRPC conventions): the server's fault,
# not the caller's (INVALID_ARGUMENT) nor load shedding's (RESOURCE_EXHAUSTED, answered by design).
_ERROR_CODES = frozenset(("UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"))


def _start_span(tracing: Tracing, full_method: str, metadata: dict, request_id: str):
    """The request's span, made current for this request's task; (span, the context token to detach)."""
    from opentelemetry import context as otel_context
    from opentelemetry.trace import SpanKind, set_span_in_context

    service, _, method = full_method.lstrip("/").partition("/")
    span = tracing.tracer.start_span(full_method.lstrip("/"), context=tracing.extract(metadata),
                                     kind=SpanKind.SERVER)
    if span.is_recording():
        span.set_attributes({"rpc.system": "grpc", "rpc.service": service, "rpc.method": method,
                             "livetower.request_id": request_id})
    return span, otel_context.attach(set_span_in_context(span))


def _serialize_traced(span, serialize, response):
    if isinstance(response, bytes):
        return response
    if span is None:  # this request is not traced
        return serialize(response)
    t0 = time.perf_counter()
    data = serialize(response)
    if span.is_recording():
        span.set_attribute("rpc.serialize_ms", (time.perf_counter() - t0) * 1e3)
        canary = getattr(response, "canary", None)
        if canary is not None:
            span.set_attribute("livetower.canary", bool(canary))
            span.set_attribute("livetower.arm", response.arm)
    return data


def _end_span(span, token, code: str, version: str, context) -> None:
    from opentelemetry import context as otel_context
    from opentelemetry.trace import Status, StatusCode

    otel_context.detach(token)
    if span.is_recording():
        status = grpc.StatusCode.__members__.get(code, grpc.StatusCode.UNKNOWN)
        span.set_attribute("rpc.grpc.status_code", status.value[0])
        if version:
            span.set_attribute("livetower.engine_version", version)
        if code in _ERROR_CODES:
            try:
                details = context.details()
            except (AttributeError, RuntimeError):
                details = None
            span.set_status(Status(StatusCode.ERROR, f"{code}: {details}" if details else code))
    span.end()
