"""LogEvents admission: the producer credential (when configured) and a per-caller events/s token bucket.

The credential is checked from the call's metadata before the request is parsed: a caller without a valid
producer token gets UNAUTHENTICATED and costs no parsing. The rate cap needs the event count, so it runs on
the parsed request, before the servicer validates or stores anything. A caller is its producer name, else
(no credentials configured) its peer host, so one address cannot dodge the cap by opening connections.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import grpc

from server.auth import LOG_EVENTS, bearer_of, deny, producer_of

MAX_TRACKED_CALLERS = 10_000  # buckets kept (LRU); a caller evicted and back starts with a full burst


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class CallerBuckets:
    """A token bucket per caller: `rate` events/s refill, at most `burst` events banked."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic, max_callers: int = MAX_TRACKED_CALLERS):
        self.rate, self.burst, self.clock, self.max_callers = rate, burst, clock, max_callers
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, caller: str, n: int) -> float:
        """0.0 when `caller` may send n events now (they are taken), else the seconds until it could."""
        now = self.clock()
        b = self._buckets.pop(caller, None)
        if b is None:
            b = _Bucket(float(self.burst), now)
            if len(self._buckets) >= self.max_callers:
                self._buckets.popitem(last=False)
        b.tokens = min(float(self.burst), b.tokens + (now - b.at) * self.rate)
        b.at = now
        self._buckets[caller] = b
        if n <= b.tokens:
            b.tokens -= n
            return 0.0
        return (n - b.tokens) / self.rate

    def __len__(self) -> int:
        return len(self._buckets)


def peer_host(peer: str) -> str:
    """'ipv4:10.0.0.7:5123' -> 'ipv4:10.0.0.7', 'ipv6:[::1]:5123' -> 'ipv6:[::1]' (the port is per connection)."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return f"{kind}:{rest.rsplit(':', 1)[0]}"
    return peer


class IngestGuardInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, *, producer_tokens: dict[str, str] | None, tokens_hint: str, buckets: CallerBuckets | None):
        self.tokens, self.hint, self.buckets = producer_tokens, tokens_hint, buckets

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method != LOG_EVENTS or handler.unary_unary is None:
            return handler
        producer = None
        if self.tokens is not None:
            given = bearer_of(handler_call_details)
            producer = producer_of(self.tokens, given) if given else None
            if producer is None:
                problem = "missing 'authorization' metadata" if not given else "unknown producer token"
                return deny(handler, grpc.StatusCode.UNAUTHENTICATED,
                            f"{problem}: LogEvents needs 'authorization: Bearer <producer token>' "
                            f"(producer tokens: {self.hint})")
        if self.buckets is None:
            return handler
        inner, buckets = handler.unary_unary, self.buckets

        async def capped(request, context: grpc.aio.ServicerContext):
            caller = f"producer {producer}" if producer else f"peer {peer_host(context.peer())}"
            wait_s = buckets.take(caller, len(request.events))
            if wait_s > 0:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"{caller} is over its ingest limit of {buckets.rate:g} events/s (burst "
                                    f"{buckets.burst}, ingest_events_per_s / ingest_burst_events): "
                                    f"{len(request.events)} events could pass in {wait_s:.2f} s")
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(capped, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)
