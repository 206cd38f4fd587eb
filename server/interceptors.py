"""Cross-cutting concerns for every unary RPC: request id, request-size limit, logging, metrics."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc

from server.metrics import ServerMetrics

log = logging.getLogger("livetower.rpc")
REQUEST_ID_KEY = "x-request-id"
SHED_CODES = ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")  # expected under overload: counted, logged in summary
SHED_LOG_INTERVAL_S = 5.0


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
    def __init__(self, metrics: ServerMetrics, max_request_bytes: int) -> None:
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes
        self._shed_log = _ShedLog()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = handler_call_details.method.rsplit("/", 1)[-1]
        metadata = dict(handler_call_details.invocation_metadata or ())
        metrics, max_bytes, shed_log = self.metrics, self.max_request_bytes, self._shed_log

        async def observed(request, context: grpc.aio.ServicerContext):
            request_id = metadata.get(REQUEST_ID_KEY) or uuid.uuid4().hex[:16]
            context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
            t0 = time.perf_counter()
            code, version = "OK", ""
            try:
                size = request.ByteSize()
                if size > max_bytes:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"request is {size} bytes; the limit is {max_bytes} (max_request_bytes)")
                response = await inner(request, context)
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

        return grpc.unary_unary_rpc_method_handler(observed, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)
