"""The Ray Serve peer (benchmarks/ray_peer.py) serves the same engine over gRPC: same answers as the engine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from benchmarks.processes import PEER_METADATA, free_port
from contracts.registry import Registry
from proto import livetower_v1_pb2 as pb
from proto import livetower_v1_pb2_grpc as pb_grpc
from server.engine.engine import Engine

pytest.importorskip("ray.serve", reason="the Ray Serve peer needs ray[serve] (pip install -e '.[test]')")


@pytest.mark.slow
def test_ray_serve_peer_answers_like_the_engine(trained_dir, tmp_path):
    port = free_port()
    log = tmp_path / "ray.log"
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.ray_peer", "--data-dir", str(trained_dir),
                             "--port", str(port)], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "serving gRPC on" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        stub = pb_grpc.RecommenderStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        reg = Registry(trained_dir / "registry")
        engine = Engine.load(reg.engine_dir(1), reg.verify(1))
        for hist in (["item-1", "item-2"], ["item-5"], ["item-9", "item-3", "item-7"]):
            got = stub.Recommend(pb.RecommendRequest(user_id="u", history=hist, k=10, exclude_seen=True), timeout=30,
                                 metadata=PEER_METADATA["ray"])
            want = engine.recommend(hist, 10, True)
            assert list(got.item_ids) == want.item_ids and got.engine_version == 1
            assert list(got.scores) == pytest.approx(want.scores, abs=1e-5)
        with pytest.raises(grpc.RpcError):
            stub.Recommend(pb.RecommendRequest(user_id="u", history=["item-1"], k=0), timeout=30,
                           metadata=PEER_METADATA["ray"])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
