"""Cross-cutting concerns for every unary RPC: request id, request-size limit, server-side deadline, logging,
metrics."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc
from google.protobuf.message import DecodeError

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
    """One log line per interval for shed requests (a line each would cost the overloaded loop more)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.next_at = 0.0

    def add(self, method: str, code: str) -> None:
        key = f"{method} {code}"
        self.counts[key] = self.counts.get(key, 0) + 1
        now = time.monotonic()
        if now >= self.next_at:
            log.warning("shed in the last %.0f s: %s (livetower_responses_total has every code)",
                        SHED_LOG_INTERVAL_S, ", ".join(f"{k} x{n}" for k, n in self.counts.items()))
            self.counts, self.next_at = {}, now + SHED_LOG_INTERVAL_S


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: ServerMetrics, max_request_bytes: int,
                 deadlines: MethodDeadlines | None = None) -> None:
        self.metrics = metrics
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

        async def observed(raw: bytes, context: grpc.aio.ServicerContext):
            request_id = metadata.get(REQUEST_ID_KEY) or uuid.uuid4().hex[:16]
            context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
            t0 = time.perf_counter()
            code, version = "OK", ""
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
                elapsed = time.perf_counter() - t0
                metrics.latency.labels(method, version).observe(elapsed)
                metrics.responses.labels(method, code).inc()
                if code in SHED_CODES:
                    shed_log.add(method, code)
                elif code not in ("OK", "INVALID_ARGUMENT"):
                    log.warning("request %s %s -> %s in %.1f ms", request_id, method, code, elapsed * 1e3)

        return grpc.unary_unary_rpc_method_handler(observed, request_deserializer=None,
                                                   response_serializer=handler.response_serializer)
