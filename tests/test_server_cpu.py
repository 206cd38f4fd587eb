"""CPU accounting of a serving process (benchmarks/server_cpu.py) against a real server: the compute thread is
found by its OS name, the stage clock counts what the engine did, responses are counted by the server."""

from __future__ import annotations

import dataclasses
import os

import grpc
import pytest

from benchmarks.server_cpu import CpuSample, per_request_ms, thread_cpu_s
from contracts.client import Client
from proto import livetower_v1_pb2 as pb
from proto import livetower_v1_pb2_grpc as pb_grpc
from tests.conftest import TEST_BATCHING, running_server, server_config, wait_for


def test_cpu_per_request_by_component(trained_dir):
    # Every batch on the compute thread (no inline path): once the batcher's first 100 ms load window closes,
    # requests would otherwise be computed on the event loop and the thread would have nothing to account for
    # (a fresh-clone CI run failed so on 2026-12-07).
    thread_only = dataclasses.replace(TEST_BATCHING, inline_below_ms=0)
    with running_server(server_config(trained_dir, batching=thread_only)) as (server, port):
        wait_for(lambda: server.manager.current is not None, 30, "engine 1 to load")
        client = Client(f"127.0.0.1:{port}")
        client.recommend("user-1", k=10, history=["item-1"])  # the compute thread exists from the first batch
        before = CpuSample(os.getpid(), server.metrics_port)
        for i in range(200):
            client.recommend(f"user-{i}", k=20, history=[f"item-{j}" for j in range(i % 7 + 1)])
        after = wait_for(lambda: (s := CpuSample(os.getpid(), server.metrics_port)).counters["responses"]
                         - before.counters["responses"] >= 200 and s, 5, "200 responses counted")
        client.close()
    got = per_request_ms(before, after)
    assert got["requests"] == 200
    assert got["tower"] > 0 and got["retrieval"] > 0 and got["rows"] > 0 and got["assemble"] > 0
    assert got["compute"] > 0  # the thread named lt-compute was found and ran the batches (10 ms CPU ticks)
    assert 1 <= got["mean_batch"] <= 2
    assert abs(got["total"] - sum(got[g] for g in ("event_loop", "compute", "grpc_threads", "other"))) < 1e-9
    assert set(thread_cpu_s(os.getpid())) == {"event_loop", "compute", "grpc_threads", "other"}


def test_grpc_core_threads_are_told_from_the_rest():
    from benchmarks.server_cpu import _group

    pid = 100
    assert _group(pid, pid, "python") == "event_loop"
    assert _group(pid, 101, "lt-compute") == "compute"
    assert _group(pid, 102, "event_engine") == "grpc_threads"  # grpc >= 1.6x: EventEngine threads
    assert _group(pid, 103, "grpc_global_tim") == "grpc_threads"
    assert _group(pid, 104, "python") == "other"  # Python threads (gRPC aio's poller, the impression writer)


def test_a_server_of_several_processes_is_sampled_as_the_sum_of_its_workers(trained_dir, tmp_path):
    """`serve --workers 2` for real (SO_REUSEPORT): both processes serve, each on its own metrics port, and the
    sample adds both up: every response of the load is counted once, whichever process answered it."""
    from benchmarks.processes import free_port_block, start_server, stop_server
    from benchmarks.server_cpu import wait_for_workers

    mport = free_port_block(2)
    proc, port = start_server(trained_dir, ["--workers", "2"], tmp_path / "server.log", metrics_port=mport)
    try:
        pids, ports = wait_for_workers(proc.pid, 2, mport, timeout_s=60)
        assert len(set(pids)) == 2 and proc.pid not in pids and ports == [mport, mport + 1]
        before = CpuSample(pids, ports)
        # 16 connections (own subchannel pools: no two share one); the kernel gives each to one process, so both
        # get some but with odds of 2 in 65,536
        channels = [grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(16)]
        for i in range(160):
            pb_grpc.RecommenderStub(channels[i % 16]).Recommend(
                pb.RecommendRequest(user_id=f"user-{i}", k=10, history=["item-1", "item-2"]), timeout=10)
        for ch in channels:
            ch.close()
        alone = [CpuSample(p, q) for p, q in zip(pids, ports)]
        after = wait_for(lambda: (s := CpuSample(pids, ports)).counters["responses"]
                         - before.counters["responses"] >= 160 and s, 5, "160 responses counted")
    finally:
        stop_server(proc, grace_s=20)
    got = per_request_ms(before, after)
    assert got["requests"] == 160
    assert all(s.counters["responses"] > 0 for s in alone), "SO_REUSEPORT gave every connection to one process"
    assert sum(s.threads["event_loop"] for s in alone) <= after.threads["event_loop"]
    assert got["tower"] > 0 and got["retrieval"] > 0
    with pytest.raises(ValueError, match="pids"):
        CpuSample([1, 2], [3])
