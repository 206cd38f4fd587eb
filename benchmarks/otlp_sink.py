"""A minimal OTLP/gRPC trace receiver that keeps and counts what it is sent: the endpoint for tracing tests and
for measuring tracing overhead on one machine without a collector.

    python -m benchmarks.otlp_sink --port 4317          # prints spans received per second, then a total
    livetower serve --tracing --tracing-otlp-endpoint 127.0.0.1:4317 --tracing-sample-ratio 0.01

It implements opentelemetry.proto.collector.trace.v1.TraceService/Export and nothing else (no metrics or
logs service): not a collector.
"""

from __future__ import annotations

import argparse
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as pb_grpc


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str         # hex
    span_id: str          # hex
    parent_span_id: str   # hex; "" for a root span
    attributes: dict = field(default_factory=dict)


def _value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind in ("string_value", "bool_value", "int_value", "double_value") else str(v)


class OtlpSink(pb_grpc.TraceServiceServicer):
    """Listens on host:port (0: a free one; see .port). keep=False counts spans without keeping them."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, keep: bool = True) -> None:
        self.keep = keep
        self.count = 0
        self.exports = 0
        self.spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"could not bind the OTLP sink on {host}:{port}")

    def Export(self, request: pb.ExportTraceServiceRequest, context) -> pb.ExportTraceServiceResponse:
        received = []
        n = 0
        for rs in request.resource_spans:
            service = next((_value(a.value) for a in rs.resource.attributes if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                n += len(ss.spans)
                if self.keep:
                    received += [ReceivedSpan(service, s.name, s.trace_id.hex(), s.span_id.hex(),
                                              s.parent_span_id.hex(), {a.key: _value(a.value) for a in s.attributes})
                                 for s in ss.spans]
        with self._lock:
            self.count += n
            self.exports += 1
            self.spans += received
        return pb.ExportTraceServiceResponse()

    def start(self) -> "OtlpSink":
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(0.5).wait()

    def __enter__(self) -> "OtlpSink":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.otlp_sink", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4317)
    p.add_argument("--interval-s", type=float, default=5.0, help="how often the rate is printed")
    args = p.parse_args(argv)
    sink = OtlpSink(args.host, args.port, keep=False).start()
    print(f"OTLP/gRPC trace sink on {args.host}:{sink.port}; Ctrl-C to stop", flush=True)
    last, t_last = 0, time.monotonic()
    try:
        while True:
            time.sleep(args.interval_s)
            now, count = time.monotonic(), sink.count
            print(f"{count} spans in {sink.exports} exports ({(count - last) / (now - t_last):.0f}/s)", flush=True)
            last, t_last = count, now
    except KeyboardInterrupt:
        pass
    finally:
        sink.stop()
    print(f"total: {sink.count} spans in {sink.exports} exports")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
