"""How fast this machine is today, measured beside a benchmark's figures (its speed varies from day to day):
the gRPC loopback round trip (a Health.Check against the server under test, one call in flight), the user
tower alone (the engine's own compiled file, batch 1, one thread), and a plain Python loop."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from contracts.engine_format.backends import load_runner
from contracts.registry import USER_TOWER_FILE, WEIGHTS_FILE, Registry
from contracts.tls import ClientTls
from contracts.tls import channel as open_channel


def grpc_roundtrip_ms(target: str, calls: int = 300, tls: ClientTls | None = None) -> float:
    """Median ms of a Health.Check round trip on a fresh channel (after 20 warm-up calls); tls: None: plaintext."""
    with open_channel(target, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        times = []
        for i in range(calls + 20):
            t0 = time.perf_counter()
            stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            if i >= 20:
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def tower_ms(registry_dir: Path, calls: int = 300) -> float:
    """Median ms of one batch-1 call of the newest engine's user tower (its refit weights, if any)."""
    reg = Registry(registry_dir)
    version = reg.latest()
    manifest = reg.verify(version)
    graph = reg.engine_dir(manifest.graph_version or version) / USER_TOWER_FILE[manifest.backend]
    weights = reg.engine_dir(version) / WEIGHTS_FILE if manifest.graph_version else None
    runner = load_runner(manifest.backend, graph, num_threads=1, weights=weights)
    rng = np.random.default_rng(0)
    rows = rng.integers(1, manifest.item_count + 1, size=(calls + 20, 1, manifest.max_history))
    times = []
    for i, r in enumerate(rows):
        t0 = time.perf_counter()
        runner(r)
        if i >= 20:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def python_loop_s(steps: int = 10_000_000) -> float:
    t0 = time.perf_counter()
    x = 0
    for i in range(steps):
        x += i
    return time.perf_counter() - t0
