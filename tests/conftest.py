"""Shared fixtures: a small trained data dir (events + one published engine) and an in-process server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from contracts.eventlog import SqliteEventLog
from contracts.registry import Registry
from contracts.rollout import CanaryPolicy
from server.app import create_server
from server.batching import BatchingConfig
from server.config import ServerConfig
from server.engine.manager import EngineManagerConfig
from trainer.config import TrainConfig
from trainer.data.synthetic import SyntheticConfig, generate
from trainer.loop import Trainer

# Fuzzing budgets (tests/test_fuzz_*.py): "ci" is the default, bounded run; the longer one is a command:
#   .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_fuzz_*.py --hypothesis-profile=long
settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("long", max_examples=20_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile("ci")

SMALL_DATA = SyntheticConfig(n_users=200, n_items=300, n_clusters=10, events_per_user=20, seed=3)


def stream_events(seed: int, n_users: int = 60, events_per_user: int = 8) -> list:
    """More events from SMALL_DATA's world (same item clusters), by new users "s<seed>-<n>"."""
    import dataclasses

    cfg = dataclasses.replace(SMALL_DATA, seed=seed, n_users=n_users, events_per_user=events_per_user,
                              user_prefix=f"s{seed}-")
    return list(generate(cfg))


def make_trainer(data_dir: Path, **overrides) -> Trainer:
    cfg = TrainConfig.tiny_debug(**overrides)
    return Trainer(cfg, SqliteEventLog(data_dir / "events.sqlite"), Registry(data_dir / "registry"),
                   data_dir / "trainer")


@pytest.fixture(scope="session")
def trained_dir_template(tmp_path_factory) -> Path:
    """Events from SMALL_DATA and engine v1 (torch backend) trained on them. Copy before mutating."""
    d = tmp_path_factory.mktemp("trained")
    log = SqliteEventLog(d / "events.sqlite")
    log.append(list(generate(SMALL_DATA)))
    log.close()
    result = make_trainer(d).run_round()
    assert result is not None and result.published_version == 1, result
    return d


@pytest.fixture
def trained_dir(trained_dir_template, tmp_path) -> Path:
    d = tmp_path / "data"
    shutil.copytree(trained_dir_template, d)
    return d


ADMIN_TOKEN = "test-admin-token-0123456789"
# Decides a canary within about a second on a test server with little or no traffic.
# Latency is not judged here (max_p99_ratio 1000): with min_requests 20 each arm's live P99 is its slowest of ~20
# requests, in a pytest process whose GIL and GC the test's clients (and in some tests a trainer) share, so one
# stalled request rolls a good engine back (CI: 7.44 against 4.63 ms, and 440 against 6.9 ms at a ratio limit of 4).
# The slow-engine test sets its own limit (LATENCY_POLICY); tests/test_canary.py's unit tests cover the verdicts.
FAST_POLICY = CanaryPolicy(min_duration_s=0.2, max_duration_s=1.0, min_requests=20, shadow_samples=10,
                           shadow_qps=200.0, max_p99_ratio=1000.0)
LATENCY_POLICY = dataclasses.replace(FAST_POLICY, max_p99_ratio=4.0)  # a slow engine reads far above 4 (20 ms of
                                                                       # CPU per call against ~1 ms)


# The test server shares its process (and GIL) with the test's client threads, and in some tests with an
# in-process trainer whose torch.export holds the GIL for long stretches (the compute thread's batches then
# take that long, and the predicted wait follows), so it lags far more than a server's own process would:
# loop-lag shedding is off and the queue-delay bound loose here (500 ms still shed 1-10 requests of a canary
# test on a slow day); tests/test_batching.py covers both.
TEST_BATCHING = BatchingConfig(max_queue_delay_ms=3000, max_loop_lag_ms=0)
# gc_freeze=False: freezing is for a server's own process, not for pytest's (it would keep every test's
# garbage from then on).


def server_config(data_dir: Path, *, policy: CanaryPolicy = FAST_POLICY, **overrides) -> ServerConfig:
    base = dict(data_dir=data_dir, port=0, admin_port=0, metrics_port=0, batching=TEST_BATCHING, gc_freeze=False,
                # compute_process off: the host costs each test server ~3 s of CPU (its start, and the tiny torch
                # engines' loads there) on CI's 2 cores; tests/test_compute_process.py runs servers with it, as do
                # the tests that start `livetower serve` processes (the default)
                engines=EngineManagerConfig(poll_interval_s=0.1, analysis_interval_s=0.05, warmup_calls=2,
                                            default_policy=policy, compute_process=False), grace_s=1.0)
    base.update(overrides)
    return ServerConfig(**base)


@contextlib.contextmanager
def running_server(config: ServerConfig, *, admin_token: str | None = ADMIN_TOKEN):
    """Start the real gRPC server on its own event loop thread; yield (server, port); stop it.

    The admin listener is on server.admin_port, with admin_token (None: the data dir's token file)."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box = {}

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def start():
            server, port = create_server(config, admin_token=admin_token)
            await server.start()
            box["server"], box["port"] = server, port
            ready.set()

        loop.run_until_complete(start())
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(30), "server did not start"
    try:
        yield box["server"], box["port"]
    finally:
        asyncio.run_coroutine_threadsafe(box["server"].stop(0.5), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)


def client_for(server, port: int, **kw):
    """A Client for a running_server: data calls on port, admin calls on server.admin_port (with ADMIN_TOKEN)."""
    from contracts.client import Client

    kw.setdefault("admin_token", ADMIN_TOKEN)
    return Client(f"127.0.0.1:{port}", admin_target=f"127.0.0.1:{server.admin_port}", **kw)


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
