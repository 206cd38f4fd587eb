"""The gRPC floor: what answering a Recommend costs on this machine with no engine behind it.

A `livetower.v1.Recommender` on the same stack as `livetower serve` (grpc.aio on uvloop, one process) whose
Recommend returns one prebuilt response of k items (the size of a real answer: ids and scores): no interceptors,
no validation, no batching, no model. `bench slo --configs grpc-floor,optimised` measures it beside the server in
one run, so the share of a request that is gRPC itself (and what is left to the server) is read off the same day,
whatever the day's speed.

    python -m benchmarks.grpc_floor --port 9000 [--k 100]   # prints "serving gRPC on ..." when ready
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import grpc

from proto import livetower_v1_pb2 as pb
from proto import livetower_v1_pb2_grpc as pb_grpc


class CannedRecommender(pb_grpc.RecommenderServicer):
    def __init__(self, k: int) -> None:
        self.response = pb.RecommendResponse(item_ids=[f"item-{i}" for i in range(k)], scores=[0.5] * k,
                                             engine_version=1, source="model", arm="stable")

    async def Recommend(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext) -> pb.RecommendResponse:
        return self.response


async def serve(port: int, k: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_RecommenderServicer_to_server(CannedRecommender(k), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"serving gRPC on 127.0.0.1:{bound} (canned {k}-item Recommend)", flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.grpc_floor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--k", type=int, default=100, help="items in the canned response (the load's k)")
    p.add_argument("--data-dir", type=Path, help="ignored: accepted so benchmarks start it as they start a server")
    args = p.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.port, args.k))


if __name__ == "__main__":
    main()
