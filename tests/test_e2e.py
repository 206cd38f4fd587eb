"""End to end with real processes: `livetower serve` + `livetower train` on free ports, events streamed
through LogEvents, a second AOTInductor engine built, canaried and promoted automatically while
clients keep calling."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from contracts.client import Client
from contracts.eventlog import SqliteEventLog
from tests.conftest import SMALL_DATA, stream_events, wait_for
from trainer.data.synthetic import generate

pytestmark = pytest.mark.slow


def start(args: list[str], log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "livetower", *args], stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parent.parent)


def stop(proc: subprocess.Popen, timeout: float = 60) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout)


def test_serve_and_train_processes_swap_under_load(tmp_path):
    data = tmp_path / "data"
    log = SqliteEventLog(data / "events.sqlite")
    log.append(list(generate(SMALL_DATA)))
    log.close()
    server = start(["serve", "--data-dir", str(data), "--port", "0", "--admin-port", "0", "--metrics-port", "-1",
                    "--poll-interval-s", "0.2"], tmp_path / "serve.log")
    trainer = start(["train", "--data-dir", str(data), "--tiny", "--backend", "aoti", "--round-min-events", "300",
                     "--round-interval-s", "3600"], tmp_path / "train.log")
    procs = [server, trainer]
    try:
        listening = wait_for(lambda: re.search(r"serving gRPC on [\d.]+:(\d+) \(admin on [\d.]+:(\d+)",
                                               (tmp_path / "serve.log").read_text()), 60, "the server to listen")
        port, admin_port = int(listening.group(1)), int(listening.group(2))
        client = Client(f"127.0.0.1:{port}", timeout_s=10)

        def first_engine():
            try:
                return client.recommend("user-1", k=10).engine_version == 1
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                return False

        wait_for(first_engine, 240, "engine 1 to be built and served", interval_s=0.5)

        outcomes: Counter = Counter()
        versions: Counter = Counter()
        done = threading.Event()

        def load() -> None:  # a concurrent client: every request must succeed through the swap
            c = Client(f"127.0.0.1:{port}", timeout_s=10)
            i = 0
            while not done.is_set():
                try:
                    r = c.recommend(f"user-{i % 200}", k=20, history=[f"item-{i % 300}", f"item-{(i * 7) % 300}"])
                    versions[r.engine_version] += 1
                    outcomes["ok"] += 1
                except grpc.RpcError as e:
                    outcomes[e.code().name] += 1
                i += 1
            c.close()

        threads = [threading.Thread(target=load) for _ in range(2)]
        for t in threads:
            t.start()
        resp = client.log_events(stream_events(seed=21, n_users=60, events_per_user=8))
        assert resp.accepted == 480 and not resp.rejected
        wait_for(lambda: versions[2] > 0, 240, "engine 2 to serve its canary slice", interval_s=0.5)
        admin = Client(f"127.0.0.1:{port}", admin_target=f"127.0.0.1:{admin_port}", timeout_s=10,
                       admin_token=(data / "admin.token").read_text().strip())
        wait_for(lambda: admin.rollout().stable_version == 2, 90, "the canary to be promoted", interval_s=0.5)
        time.sleep(1.0)  # keep the load going after the promotion
        done.set()
        for t in threads:
            t.join(30)
        print(f"\nswap under load: {sum(outcomes.values())} requests, outcomes {dict(outcomes)}, "
              f"engine versions seen {dict(sorted(versions.items()))}")
        assert outcomes["ok"] == sum(outcomes.values()) and outcomes["ok"] > 50, outcomes
        assert set(versions) == {1, 2}
        engines = admin.list_engines()
        assert engines.serving_version == 2
        v2 = next(m for m in engines.engines if m.version == 2)
        assert v2.graph_version == 1 and not any(f.path == "user_tower.pt2" for f in v2.files)  # a refit
        history = [(e.action, e.version, e.actor) for e in admin.rollout().history]
        assert history[-2:] == [("canary", 2, "auto"), ("promote", 2, "auto")], history
        client.close()
        admin.close()
        assert stop(trainer) == 0
        assert stop(server) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        print("---- serve.log tail\n" + (tmp_path / "serve.log").read_text()[-3000:])
        print("---- train.log tail\n" + (tmp_path / "train.log").read_text()[-3000:])
