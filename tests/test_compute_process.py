"""Engines' towers and searches in the server's compute host (server/engine/compute_process.py and compute_host.py,
`--compute-process`): a real child process loading real engines; the answers must be the ones the engine computes
in the server, one host must serve every engine, and a host that dies must cost no answer."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from benchmarks.server_cpu import compute_processes, thread_cpu_s
from contracts.registry import Registry
from server.batching import BatchingConfig, MicroBatcher
from server.engine.compute_process import (FRAME, PROCESS_NAME, REPLY, REQUEST, ComputeHost, ComputeProcess,
                                           ComputeProcessError, recv_frame)
from server.engine.engine import Engine, EngineRejected, RecommendQuery
from server.engine.loading import ComputeKeeper, load_from_registry, start_compute_process
from server.engine.manager import EngineManagerConfig
from tests.conftest import client_for, make_trainer, running_server, server_config, stream_events, wait_for
from tests.test_ann import hnsw_engine_dir  # noqa: F401 - a module fixture: an engine with an HNSW index
from tests.test_live_items import publish_feature_engine, record

# Nothing inline: every batch goes to the compute process (or, without one, the compute thread)
BATCHING = BatchingConfig(max_queue_delay_ms=3000, max_loop_lag_ms=0, inline_below_ms=0)
CONFIG = EngineManagerConfig()


@pytest.fixture
def host():
    h = ComputeHost(num_threads=1)
    yield h
    h.close()


def engine_threads(pid: int) -> set[str]:
    """The host's engine threads now, by name (lt-engine-VERSION): one per engine it holds."""
    names = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
        except OSError:
            continue  # ended meanwhile
        if name.startswith("lt-engine-"):
            names.add(name)
    return names


def queries_for(engine: Engine) -> list[RecommendQuery]:
    ids = list(engine.item_ids)
    qs = [RecommendQuery(ids[u:u + 2 + u % 7], k=[5, 20, 1000][u % 3], exclude_seen=u % 2 == 0, user_id=f"u{u}")
          for u in range(0, min(24, len(ids) - 9))]
    return [*qs, RecommendQuery(["never-seen-item"], k=10, exclude_seen=True)]  # no known item: popularity


async def through_batcher(engine: Engine, queries: list[RecommendQuery], sizes=(1, 3, 8)) -> list:
    """The queries through a MicroBatcher, a few at a time (batches of several when they queue together)."""
    batcher = MicroBatcher(BATCHING)
    batcher.start()
    try:
        out, i, s = [], 0, 0
        while i < len(queries):
            n = sizes[s % len(sizes)]
            out += await asyncio.gather(*(batcher.recommend(engine, q, None) for q in queries[i:i + n]))
            i, s = i + n, s + 1
        return out
    finally:
        await batcher.stop()


@pytest.mark.parametrize("K", [4, 20_000])  # the second larger than the reply buffer (64 KiB)
def test_a_reply_that_arrives_in_pieces_is_read_whole_on_uvloop(K):
    """The server's socket is non-blocking (uvloop makes any fd it watches so): a reply split across reads must be
    awaited, not fail with EAGAIN (a first version's blocking read did, under load)."""
    import uvloop

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    proc = ComputeProcess(sleeper, ours, 7, 0.0)
    u_BD, scores_BK = np.arange(6, dtype=np.float32).reshape(2, 3), -np.arange(2 * K, dtype=np.float32).reshape(2, K)
    idx_BK = np.arange(2 * K, dtype=np.int64).reshape(2, K)
    reply = b"".join((b"R", REPLY.pack(2, 3, K, 0.25, 0.5), u_BD.tobytes(), scores_BK.tobytes(), idx_BK.tobytes()))

    def child() -> None:
        rows = recv_frame(theirs)
        assert REQUEST.unpack_from(rows) == (2, 5, K)
        framed = FRAME.pack(len(reply)) + reply
        for piece in (framed[:3], framed[3:20], framed[20:]):
            theirs.sendall(piece)
            time.sleep(0.05)

    t = threading.Thread(target=child)
    t.start()
    try:
        got = asyncio.Runner(loop_factory=uvloop.new_event_loop).run(proc.compute(np.ones((2, 5), np.int64), K))
    finally:
        t.join(10)
        sleeper.kill()
        sleeper.wait()
    np.testing.assert_array_equal(got[0], u_BD)
    np.testing.assert_array_equal(got[1], scores_BK)
    np.testing.assert_array_equal(got[2], idx_BK)
    assert got[3:] == (0.25, 0.5) and proc.alive
    theirs.close()  # the child gone: the next batch says so, and the process counts as gone for good
    with pytest.raises(ComputeProcessError, match="engine 7: its compute process is gone"):
        asyncio.Runner(loop_factory=uvloop.new_event_loop).run(proc.compute(np.ones((1, 5), np.int64), 4))
    assert not proc.alive


def assert_same_answers(got: list, want: list) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.source == w.source and g.item_ids == w.item_ids
        np.testing.assert_allclose(g.scores, w.scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize("which", ["exact", "hnsw"])
def test_a_compute_process_answers_as_the_engine_does(which, trained_dir, hnsw_engine_dir, host):  # noqa: F811
    data_dir = trained_dir if which == "exact" else hnsw_engine_dir[0]
    engine = load_from_registry(Registry(data_dir / "registry"), 1, CONFIG)
    assert (engine.ann is not None) == (which == "hnsw")
    queries = queries_for(engine)
    want = [engine.recommend_batch([q])[0] for q in queries]
    engine.compute_process = start_compute_process(engine, CONFIG, host)
    proc = engine.compute_process
    assert proc.parity_max_abs_diff <= CONFIG.parity_tolerance
    assert psutil.Process(proc.proc.pid).name() == PROCESS_NAME and proc.proc is host.proc
    got = asyncio.run(through_batcher(engine, queries))
    assert_same_answers(got, want)
    assert proc.alive and engine.clock is None  # nothing else changed
    proc.close()  # the host drops the engine, and keeps running
    wait_for(lambda: not engine_threads(host.proc.pid), 10, "the host to drop engine 1")
    assert host.proc.poll() is None
    host.close()
    assert proc.proc.returncode == 0  # it exits on the closed control connection


def test_items_upserted_and_deleted_since_the_build_are_merged_with_the_process_answers(tmp_path, host):
    reg = Registry(tmp_path / "reg")
    manifest = reg.verify(publish_feature_engine(reg))
    engine = Engine.load(reg.engine_dir(manifest.version), manifest)
    engine.apply_catalog([*((f"item-{100 + i}", record(100 + i)) for i in range(6)), ("item-3", None)])
    queries = [RecommendQuery(["item-1", "item-5", "item-9"], k, exclude_seen=True) for k in (5, 60)]
    want = [engine.recommend_batch([q])[0] for q in queries]
    assert "item-100" in want[1].item_ids and "item-3" not in want[1].item_ids
    engine.compute_process = start_compute_process(engine, CONFIG, host)
    try:
        assert_same_answers(asyncio.run(through_batcher(engine, queries)), want)
    finally:
        engine.compute_process.close()


def test_the_batches_of_a_killed_compute_process_are_computed_in_the_server(trained_dir, host):
    engine = load_from_registry(Registry(trained_dir / "registry"), 1, CONFIG)
    queries = queries_for(engine)[:6]
    want = [engine.recommend_batch([q])[0] for q in queries]
    engine.compute_process = proc = start_compute_process(engine, CONFIG, host)

    async def scenario():
        batcher = MicroBatcher(BATCHING)
        batcher.start()
        try:
            assert_same_answers([await batcher.recommend(engine, queries[0], None)], want[:1])
            os.kill(proc.proc.pid, signal.SIGKILL)
            proc.proc.wait(10)
            # the batch it was sent to fails over to the compute thread; from then on computed in this process
            got = await asyncio.gather(*(batcher.recommend(engine, q, None) for q in queries))
            assert not proc.alive
            with pytest.raises(ComputeProcessError, match="engine 1: its compute process is gone"):
                await proc.compute(engine.history_rows(queries[0].history)[None, :], 10)
            return got
        finally:
            await batcher.stop()

    assert_same_answers(asyncio.run(scenario()), want)


def test_a_host_that_cannot_load_an_engine_says_why_the_engine_is_refused_and_the_host_serves_on(trained_dir,
                                                                                                  tmp_path, host):
    engine = load_from_registry(Registry(trained_dir / "registry"), 1, CONFIG)
    good = start_compute_process(engine, CONFIG, host)
    with pytest.raises(ComputeProcessError, match="could not load it: .*no such file"):
        host.open(tmp_path / "no-such-engine", engine.manifest.SerializeToString(), 1, graph_dir=None, use_ann=False)
    bad = load_from_registry(Registry(trained_dir / "registry"), 1, CONFIG)
    bad.engine_dir = tmp_path / "no-such-engine"
    with pytest.raises(EngineRejected, match="engine 1: .*could not load it"):
        start_compute_process(bad, CONFIG, host)
    queries = queries_for(engine)[:5]
    want = [engine.recommend_batch([q])[0] for q in queries]
    engine.compute_process = good
    assert_same_answers(asyncio.run(through_batcher(engine, queries)), want)  # the engine it had still answers
    assert engine_threads(host.proc.pid) == {"lt-engine-1"} and host.starts == 1


def test_one_host_serves_several_engines_at_once_and_frees_each_on_its_own(trained_dir, hnsw_engine_dir,  # noqa: F811
                                                                            host):
    exact = load_from_registry(Registry(trained_dir / "registry"), 1, CONFIG)
    hnsw = load_from_registry(Registry(hnsw_engine_dir[0] / "registry"), 1, CONFIG)
    hnsw.version = 2  # two engines of version 1 from two registries: told apart by the host's thread names
    qs = {e: queries_for(e) for e in (exact, hnsw)}
    want = {e: [e.recommend_batch([q])[0] for q in qs[e]] for e in (exact, hnsw)}
    for e in (exact, hnsw):
        e.compute_process = start_compute_process(e, CONFIG, host)
    assert exact.compute_process.proc is hnsw.compute_process.proc is host.proc and host.starts == 1
    assert engine_threads(host.proc.pid) == {"lt-engine-1", "lt-engine-2"}

    async def both():  # their batches in flight together, as a canary's and its stable's
        return await asyncio.gather(through_batcher(exact, qs[exact]), through_batcher(hnsw, qs[hnsw]))

    got_exact, got_hnsw = asyncio.run(both())
    assert_same_answers(got_exact, want[exact])
    assert_same_answers(got_hnsw, want[hnsw])
    exact.compute_process.close()
    wait_for(lambda: engine_threads(host.proc.pid) == {"lt-engine-2"}, 10, "the host to drop the exact engine")
    assert_same_answers(asyncio.run(through_batcher(hnsw, qs[hnsw])), want[hnsw])
    assert hnsw.compute_process.alive


def test_a_host_that_died_is_started_again_for_the_next_engine(trained_dir, host):
    first = load_from_registry(Registry(trained_dir / "registry"), 1, CONFIG)
    first.compute_process = start_compute_process(first, CONFIG, host)
    dead = host.proc.pid
    os.kill(dead, signal.SIGKILL)
    host.proc.wait(10)
    second = load_from_registry(Registry(trained_dir / "registry"), 1, CONFIG)
    second.compute_process = start_compute_process(second, CONFIG, host)
    assert host.proc.pid != dead and host.starts == 2
    queries = queries_for(second)[:6]
    want = [second.recommend_batch([q])[0] for q in queries]
    assert_same_answers(asyncio.run(through_batcher(second, queries)), want)
    assert_same_answers(asyncio.run(through_batcher(first, queries)), want)  # in the server: its host is gone
    assert not first.compute_process.alive and second.compute_process.alive


def test_a_server_serves_every_engine_in_one_host_and_counts_its_cpu(trained_dir):
    cfg = server_config(trained_dir, batching=BATCHING)
    cfg = dataclasses.replace(cfg, engines=dataclasses.replace(cfg.engines, compute_process=True))
    want = load_from_registry(Registry(trained_dir / "registry"), 1, CONFIG)
    with running_server(cfg) as (server, port):
        client = client_for(server, port)
        engine = wait_for(lambda: server.manager.current, 60, "engine 1 to load")
        assert engine.compute_process is not None and engine.compute_process.alive
        children = compute_processes(os.getpid())  # the test's process is the server's
        assert len(children) == 1
        before = thread_cpu_s(os.getpid())["compute"]
        for q in queries_for(want)[:10]:
            r = client.recommend(f"new-{q.user_id}", k=q.k, history=list(q.history), exclude_seen=q.exclude_seen)
            w = want.recommend_batch([q])[0]
            assert list(r.item_ids) == w.item_ids and r.source == w.source
            np.testing.assert_allclose(list(r.scores), w.scores, rtol=0, atol=1e-5)
        child_cpu = sum(t.user + t.system for t in [psutil.Process(children[0]).cpu_times()])
        assert thread_cpu_s(os.getpid())["compute"] > before and child_cpu > 0
        # The trainer publishes engine 2: the same host loads it (no process per engine), beside engine 1
        client.log_events(stream_events(seed=21))
        assert make_trainer(trained_dir).run_round().published_version == 2

        def engine_2():
            return next((e for e in server.manager.serving_engines() if e.version == 2), None)

        second = wait_for(engine_2, 60, "engine 2 to load")
        assert second.compute_process is not None and second.compute_process.alive
        assert second.compute_process.proc.pid == children[0] and compute_processes(os.getpid()) == children
        assert "lt-engine-2" in engine_threads(children[0])
    wait_for(lambda: not psutil.pid_exists(children[0]) or psutil.Process(children[0]).status() == "zombie",
             30, "the compute host to exit with its server")


def test_a_server_whose_compute_host_died_loads_its_engine_into_a_new_one(trained_dir):
    cfg = server_config(trained_dir, batching=BATCHING)
    cfg = dataclasses.replace(cfg, engines=dataclasses.replace(cfg.engines, compute_process=True,
                                                               compute_restart_backoff_s=60.0))
    want = load_from_registry(Registry(trained_dir / "registry"), 1, CONFIG)
    queries = queries_for(want)[:6]
    with running_server(cfg) as (server, port):
        client = client_for(server, port)
        engine = wait_for(lambda: server.manager.current, 60, "engine 1 to load")
        first = engine.compute_process
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(10)
        for q in queries:  # answered all the while: the lost batch in the server, then in the new host
            r = client.recommend(f"new-{q.user_id}", k=q.k, history=list(q.history), exclude_seen=q.exclude_seen)
            assert list(r.item_ids) == want.recommend_batch([q])[0].item_ids
        second = wait_for(lambda: engine.compute_process if engine.compute_process is not first else None, 60,
                          "the engine to be loaded into a new compute host")
        assert second.proc.pid != first.proc.pid and compute_processes(os.getpid()) == [second.proc.pid]
        os.kill(second.proc.pid, signal.SIGKILL)  # again: not before the backoff (60 s here)
        second.proc.wait(10)
        time.sleep(1.5)  # the watcher's interval is 0.05-0.1 s
        for q in queries:
            r = client.recommend(f"new-{q.user_id}", k=q.k, history=list(q.history), exclude_seen=q.exclude_seen)
            assert list(r.item_ids) == want.recommend_batch([q])[0].item_ids
        assert engine.compute_process is second and not second.alive and compute_processes(os.getpid()) == []


def test_an_engine_the_host_cannot_take_is_served_in_process_and_tried_again_after_the_backoff(trained_dir, tmp_path):
    keeper = ComputeKeeper(dataclasses.replace(CONFIG, compute_restart_backoff_s=0.5))
    try:
        engine = load_from_registry(Registry(trained_dir / "registry"), 1, CONFIG)
        queries = queries_for(engine)[:6]
        want = [engine.recommend_batch([q])[0] for q in queries]
        real_dir, engine.engine_dir = engine.engine_dir, tmp_path / "gone"  # the host cannot load it from there
        assert not keeper.attach(engine) and engine.compute_process is None  # not refused: served in-process
        assert_same_answers(asyncio.run(through_batcher(engine, queries)), want)
        assert keeper.lost([engine]) == [engine]  # due at once
        assert keeper.restore([engine]) == 0 and keeper.lost([engine]) == []  # failed again: the backoff runs
        engine.engine_dir = real_dir
        time.sleep(0.6)
        assert keeper.lost([engine]) == [engine] and keeper.restore([engine]) == 1
        assert engine.compute_process.poll() and keeper.lost([engine]) == []
        assert_same_answers(asyncio.run(through_batcher(engine, queries)), want)
    finally:
        keeper.close()
    assert keeper.host.proc.returncode == 0
