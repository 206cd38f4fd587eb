"""The same engine behind Ray Serve's gRPC ingress: a widely used Python model server, as the peer that
`livetower bench peers` (and `bench slo --configs ray-serve`) loads against livetower in one run.

The deployment loads the newest engine of a registry with the server's own `Engine` class (the same
AOTInductor tower package, the same item index chosen at build), and answers `livetower.v1.Recommender/
Recommend` on Ray Serve's gRPC proxy, so the load generator sends the very same requests to both. Ray's
own request path (proxy -> router -> replica actor) is what is compared; one replica by default, as
livetower serves from one process. Only the request's own history is used (the peer keeps no user state).

    python -m benchmarks.ray_peer --data-dir DIR --port 9000     # prints "serving gRPC on ..." when ready
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from proto import livetower_v1_pb2 as pb

SERVICER = "proto.livetower_v1_pb2_grpc.add_RecommenderServicer_to_server"
APPLICATION = "livetower"  # clients send it as gRPC metadata ("application", APPLICATION)


def wait_routable(port: int, timeout_s: float = 120.0) -> None:
    """serve.run returns before the proxy routes to the new application: wait until a Recommend goes through."""
    import time

    import grpc

    from proto import livetower_v1_pb2_grpc as pb_grpc

    stub = pb_grpc.RecommenderStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            stub.Recommend(pb.RecommendRequest(user_id="ready", k=1), timeout=10,
                           metadata=(("application", APPLICATION),))
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def make_deployment(registry_dir: Path, *, threads: int, max_ongoing: int):
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=max_ongoing)
    class Recommender:
        def __init__(self, registry_dir: str, threads: int) -> None:
            import torch

            from contracts.registry import Registry
            from server.engine.engine import Engine

            torch.set_num_threads(threads)
            reg = Registry(Path(registry_dir))
            version = reg.latest()
            manifest = reg.verify(version)
            graph_dir = reg.engine_dir(manifest.graph_version) if manifest.graph_version else None
            self.engine = Engine.load(reg.engine_dir(version), manifest, num_threads=threads, graph_dir=graph_dir)
            self.engine.warm_up(20)

        def Recommend(self, request: pb.RecommendRequest) -> pb.RecommendResponse:
            if not 1 <= request.k <= 1000:
                raise ValueError(f"k must be in 1..1000, got {request.k}")
            r = self.engine.recommend(list(request.history), request.k, request.exclude_seen)
            return pb.RecommendResponse(item_ids=r.item_ids, scores=r.scores, engine_version=self.engine.version,
                                        source=r.source)

    return Recommender.bind(str(registry_dir), threads)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ray_peer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True, help="a livetower data dir (its registry/ is served)")
    p.add_argument("--port", type=int, default=9000, help="Ray Serve gRPC proxy port")
    p.add_argument("--threads", type=int, default=1, help="torch / FAISS threads of the replica (as livetower's)")
    p.add_argument("--max-ongoing", type=int, default=32, help="Ray Serve max_ongoing_requests of the replica")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs Ray may schedule on (the machine's cores)")
    args = p.parse_args(argv)

    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(grpc_options=gRPCOptions(port=args.port, grpc_servicer_functions=[SERVICER]),
                    http_options={"port": 0})
        serve.run(make_deployment(args.data_dir / "registry", threads=args.threads, max_ongoing=args.max_ongoing),
                  name=APPLICATION, route_prefix=f"/{APPLICATION}")
        wait_routable(args.port)
        print(f"serving gRPC on 127.0.0.1:{args.port} (Ray Serve {ray.__version__})", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
