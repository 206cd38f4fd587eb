"""The open-loop load generator (benchmarks/loadgen.py) against a tiny in-process fake Recommender."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time

import grpc
import numpy as np
import pytest

from benchmarks import report
from benchmarks.loadgen import LoadConfig, main, run_load
from benchmarks.workload import (KINDS, KindPicker, make_workload, parse_mix, parse_range, schedule,
                                 user_history, zipf_cdf)
from contracts.events import event_problem
from proto import livetower_v1_pb2 as pb
from proto import livetower_v1_pb2_grpc as pb_grpc


class FakeRecommender(pb_grpc.RecommenderServicer):
    """Sleeps ``sleep_s`` per call (one call at a time when ``serialize``); aborts RESOURCE_EXHAUSTED for
    users whose number is a multiple of ``fail_every`` (0: never)."""

    def __init__(self, sleep_s: float = 0.0, serialize: bool = False, fail_every: int = 0):
        self.sleep_s, self.serialize, self.fail_every = sleep_s, serialize, fail_every
        self.lock: asyncio.Lock | None = None
        self.calls = {"Recommend": 0, "Score": 0}
        self.aborted = 0

    async def _work(self, method: str, user_id: str, context) -> None:
        self.calls[method] += 1
        if self.fail_every and int(user_id.split("-")[1]) % self.fail_every == 0:
            self.aborted += 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "fake: busy")
        if self.serialize:
            self.lock = self.lock or asyncio.Lock()
            async with self.lock:
                await asyncio.sleep(self.sleep_s)
        elif self.sleep_s:
            await asyncio.sleep(self.sleep_s)

    async def Recommend(self, request, context):
        await self._work("Recommend", request.user_id, context)
        assert len(request.history) > 0 and request.k > 0
        return pb.RecommendResponse(item_ids=list(request.history[:request.k]), source="model")

    async def Score(self, request, context):
        await self._work("Score", request.user_id, context)
        return pb.ScoreResponse(scores=[0.0] * len(request.candidate_ids), source="model")


@contextlib.contextmanager
def fake_server(**kw):
    servicer = FakeRecommender(**kw)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box = {}

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def start():
            server = grpc.aio.server()
            pb_grpc.add_RecommenderServicer_to_server(servicer, server)
            box["port"] = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            box["server"] = server
            ready.set()

        loop.run_until_complete(start())
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(10), "fake server did not start"
    try:
        yield f"127.0.0.1:{box['port']}", servicer
    finally:
        asyncio.run_coroutine_threadsafe(box["server"].stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)


def cfg(target: str, **kw) -> LoadConfig:
    base = dict(target=target, rate=200.0, duration_s=2.0, warmup_s=0.5, procs=1, users=1000, items=500,
                history_len=10, score_candidates=(5, 20), progress=False)
    base.update(kw)
    return LoadConfig(**base)


# ---------------------------------------------------------------- end to end against the fake server

def test_open_loop_run_counts_latency_errors_and_writes_outputs(tmp_path):
    with fake_server(sleep_s=0.005, fail_every=7) as (target, servicer):
        r = run_load(cfg(target, out=tmp_path, label="fake"))
    # warm-up excluded: exactly rate x duration scheduled in the measured window (fixed arrivals)
    assert r["requests"]["scheduled"] == 400
    assert r["offered_qps"] == pytest.approx(200.0)
    # every request sent, warm-up ones included, reached the server
    assert sum(servicer.calls.values()) == r["requests"]["sent_total_incl_warmup"] == 500
    # errors counted by code; OK + errors = scheduled
    errs = r["errors"]["by_code"]
    assert set(errs) == {"RESOURCE_EXHAUSTED"} and 0 < errs["RESOURCE_EXHAUSTED"] <= servicer.aborted
    assert r["requests"]["completed_ok"] + r["errors"]["total"] == 400
    assert r["errors"]["rate"] == pytest.approx(errs["RESOURCE_EXHAUSTED"] / 400)
    # achieved ~ offered (minus the failed share)
    ok_share = 1 - r["errors"]["rate"]
    assert r["achieved_qps"] == pytest.approx(200 * ok_share, rel=0.1)
    lat = r["latency_ms"]
    assert lat["count"] == r["requests"]["completed_ok"]
    assert lat["p50"] >= 5.0 * 0.99  # never below the servicer's sleep
    assert lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    # An idle fake server: no queueing for the typical request. Not the P99: CI once read 792 ms there, a stall of the
    # pytest process (which runs the fake server) holding back a run of the 400 requests alike.
    assert lat["p50"] < 50, lat
    kinds = r["kinds"]
    assert set(kinds) == {"recommend", "score"}
    assert sum(k["count"] for k in kinds.values()) == 400
    assert kinds["recommend"]["count"] > kinds["score"]["count"] > 0
    assert kinds["score"]["latency_ms"]["p50"] >= 5.0 * 0.99
    measured = [t for t in r["timeseries"] if t["phase"] == "measured"]
    assert len(measured) == 2 and all(t["p99_ms"] is not None for t in measured)
    assert any(t["phase"] == "warmup" for t in r["timeseries"])
    assert r["slo"] == {"p99_ms": None, "error_budget": None, "violations": [], "passed": True}
    # the workers' own CPU (spawned processes: none of the in-process fake server's), per request sent
    cpu = r["client_cpu"]
    assert cpu["seconds"] > 0 and cpu["ms_per_request"] == pytest.approx(cpu["seconds"] / 500 * 1e3)
    assert cpu["seconds"] < 2.5 * 3  # at most ~the run's wall time (2.5 s) on each of a few threads

    data = json.loads((tmp_path / "results.json").read_text())
    for key in ("label", "started_at", "config", "window", "workers", "requests", "offered_qps", "achieved_qps",
                "latency_ms", "latency_ms_incl_errors", "client_lag_ms", "client_cpu", "errors", "kinds",
                "percentile_curve", "timeseries", "slo"):
        assert key in data, key
    assert data["label"] == "fake" and data["config"]["rate"] == 200.0
    assert data["percentile_curve"][-1]["latency_ms"] == pytest.approx(lat["max"])
    png = (tmp_path / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_serialising_server_shows_queueing_no_coordinated_omission():
    # capacity 100/s (10 ms, one at a time) offered 200/s: the queue grows ~1 s per 2 s; a closed-loop client
    # would report ~10 ms, the open-loop one must report the wait from the scheduled send time.
    with fake_server(sleep_s=0.010, serialize=True) as (target, _):
        r = run_load(cfg(target, duration_s=1.5, warmup_s=0.0, deadline_ms=10_000, mix=(("recommend", 1.0),)))
    assert r["errors"]["total"] == 0
    assert r["latency_ms"]["p99"] > 300, r["latency_ms"]
    assert r["latency_ms"]["p50"] > 50
    assert 40 < r["achieved_qps"] < 125  # about the server's capacity (100/s), not the offered 200
    ts = [t for t in r["timeseries"] if t["p50_ms"] is not None]
    assert len(ts) >= 3  # the queue drains after the schedule ends
    # Grows over time: ~5 ms a request at 100/s served of 200/s offered, so the last second's requests waited
    # ~1 s longer than the first second's. A difference, not a ratio: a slow start (CI: the first second's P50
    # read 812 ms once) shifts every latency alike; a closed-loop client would show none.
    assert ts[-1]["p50_ms"] - ts[0]["p50_ms"] > 500, ts
    assert ts[-1]["p99_ms"] - ts[0]["p99_ms"] > 300, ts
    assert r["client_lag_ms"]["p99"] < 50  # the client itself kept to the schedule


def test_client_overload_counted_separately():
    with fake_server(sleep_s=0.2) as (target, _):
        r = run_load(cfg(target, duration_s=1.0, warmup_s=0.0, max_inflight=5, mix=(("recommend", 1.0),)))
    errs = r["errors"]["by_code"]
    assert errs.get("CLIENT_OVERLOAD", 0) > 100
    assert r["requests"]["completed_ok"] + errs["CLIENT_OVERLOAD"] == 200
    assert r["latency_ms"]["p50"] >= 200 * 0.99


def test_slo_exit_codes(tmp_path, capsys):
    with fake_server(sleep_s=0.005) as (target, _):
        base = ["--target", target, "--rate", "100", "--duration-s", "1", "--warmup-s", "0", "--users", "100",
                "--items", "100", "--history-len", "5", "--score-candidates", "5:10", "--quiet"]
        assert main(base + ["--out", str(tmp_path / "a"), "--slo-p99-ms", "1000"]) == 0
        assert "SLO passed" in capsys.readouterr().out
        assert main(base + ["--out", str(tmp_path / "b"), "--slo-p99-ms", "1", "--label", "tight"]) == 1
        assert "SLO FAILED: P99" in capsys.readouterr().err
    data = json.loads((tmp_path / "b" / "results.json").read_text())
    assert data["label"] == "tight" and data["slo"]["passed"] is False and data["slo"]["error_budget"] == 0.001


def test_slo_violations_logic():
    r = {"latency_ms": {"p99": 12.0}, "errors": {"rate": 0.002, "by_code": {"UNAVAILABLE": 2}}}
    assert report.slo_violations(r, p99_ms=None, error_budget=None) == []
    assert report.slo_violations(r, p99_ms=20, error_budget=0.01) == []
    v = report.slo_violations(r, p99_ms=10, error_budget=0.001)
    assert len(v) == 2 and v[0].startswith("P99") and v[1].startswith("error rate")
    assert report.slo_violations({"latency_ms": {"p99": None}, "errors": {"rate": 1.0}}, p99_ms=5,
                                 error_budget=None)[0].startswith("P99 undefined")


# ---------------------------------------------------------------- config, schedule, workload (no server)

@pytest.mark.parametrize("field,value", [("rate", 0), ("duration_s", -1), ("arrival", "burst"), ("procs", 0),
                                         ("k", 5000), ("mix", (("nope", 1.0),)), ("score_candidates", (10, 5)),
                                         ("target", "nohost"), ("error_budget", 2.0), ("warmup_s", float("nan"))])
def test_config_rejects_bad_field_by_name(field, value):
    with pytest.raises(ValueError, match=rf"LoadConfig\.{field}\b"):
        LoadConfig(**{field: value})


def test_config_is_frozen_and_kw_only():
    c = LoadConfig()
    with pytest.raises(Exception):
        c.rate = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        LoadConfig("localhost:1")  # type: ignore[misc]
    assert c.effective_error_budget() is None
    assert LoadConfig(slo_p99_ms=10).effective_error_budget() == 0.001


def test_schedule_fixed_and_poisson_means():
    fixed = list(schedule(100.0, 10.0, "fixed", np.random.default_rng(0)))
    assert len(fixed) == 1000 and fixed[0] == 0.0
    assert np.allclose(np.diff(fixed), 0.01)
    shifted = list(schedule(100.0, 1.0, "fixed", np.random.default_rng(0), phase_s=0.005))
    assert shifted[0] == 0.005 and len(shifted) == 100
    poisson = np.array(list(schedule(1000.0, 20.0, "poisson", np.random.default_rng(1))))
    assert len(poisson) == pytest.approx(20_000, rel=0.03)
    gaps = np.diff(poisson)
    assert gaps.mean() == pytest.approx(0.001, rel=0.03)
    assert gaps.std() == pytest.approx(0.001, rel=0.05)  # exponential: std == mean
    assert np.all(gaps > 0) and poisson[-1] < 20.0
    again = np.array(list(schedule(1000.0, 20.0, "poisson", np.random.default_rng(1))))
    assert np.array_equal(poisson, again)
    with pytest.raises(ValueError):
        next(schedule(0.0, 1.0, "fixed", np.random.default_rng(0)))


def test_zipf_workload_is_deterministic_and_skewed():
    wl = make_workload(users=1000, zipf_s=1.1, items=500, history_len=50, seed=7)
    a = [wl.sample_user(np.random.default_rng(3)) for _ in range(1)]
    draws = lambda seed: [wl.sample_user(rng) for rng in [np.random.default_rng(seed)] for _ in range(5000)]  # noqa: E731
    d1, d2 = draws(3), draws(3)
    assert d1 == d2 and a[0] == d1[0]
    counts = np.bincount(d1, minlength=1000)
    assert counts[0] > counts[1] > counts[10] and counts[0] > 5000 * 0.1  # user-0 hottest, heavy head
    p = np.diff(np.concatenate([[0.0], zipf_cdf(1000, 1.1)]))
    assert counts[0] / 5000 == pytest.approx(p[0], rel=0.15)
    assert np.allclose(np.diff(zipf_cdf(10, 0.0)), 0.1)
    h = wl.history_ids(42)
    assert h == make_workload(users=10, zipf_s=0.5, items=500, history_len=50, seed=7).history_ids(42)
    assert len(h) == 50 and all(x.startswith("item-") and 0 <= int(x[5:]) < 500 for x in h)
    assert h != wl.history_ids(43)
    assert not np.array_equal(user_history(42, items=500, history_len=50, seed=8),
                              user_history(42, items=500, history_len=50, seed=7))


def test_request_kinds_and_mix():
    wl = make_workload(users=100, zipf_s=1.0, items=50, item_prefix="it-", history_len=7, k=9,
                       score_candidates=(3, 6), seed=1)
    rng = np.random.default_rng(0)
    rec = KINDS["recommend"].make(rng, wl)
    assert isinstance(rec, pb.RecommendRequest) and rec.k == 9 and len(rec.history) == 7
    assert rec.user_id.startswith("user-") and rec.history[0].startswith("it-")
    sizes = {len(KINDS["score"].make(rng, wl).candidate_ids) for _ in range(200)}
    assert sizes == {3, 4, 5, 6}
    logs = [KINDS["log"].make(rng, wl) for _ in range(300)]
    assert all(isinstance(r, pb.LogEventsRequest) and len(r.events) == 1 for r in logs)
    ev = [r.events[0] for r in logs]
    assert len({e.event_id for e in ev}) == 300 and all(e.item_id.startswith("it-") and e.timestamp_ms > 0 for e in ev)
    user = int(ev[0].user_id.removeprefix("user-"))  # an item near the end of that user's own history
    assert ev[0].item_id in wl.history_ids(user)[-5:]
    assert not any(event_problem(e, int(time.time() * 1000)) for e in ev)  # the server accepts them
    assert parse_mix("recommend=0.9, score=0.1") == (("recommend", 0.9), ("score", 0.1))
    assert parse_range("100:1000") == (100, 1000) and parse_range("7") == (7, 7)
    picker = KindPicker((("recommend", 3.0), ("score", 1.0)))
    picks = [picker(rng) for _ in range(4000)]
    assert picks.count("score") / 4000 == pytest.approx(0.25, abs=0.03)


def test_unreachable_target_fails_fast():
    with pytest.raises(RuntimeError, match="no connection"):
        run_load(cfg("127.0.0.1:1", connect_timeout_s=0.5))


def test_a_server_of_several_processes_gets_its_load_over_several_connections():
    """SO_REUSEPORT spreads connections: `bench slo`'s `--workers N` configurations send over at least 4 N of them
    (over the one connection of the common load, one process got every request); the others keep the common load,
    but for a one-process control of a several-process configuration, which sends as that one does."""
    from benchmarks.slo import CONFIGS, load_for, server_processes

    base = LoadConfig()
    multi = 0
    for name, spec in CONFIGS.items():
        workers = server_processes(spec["flags"])
        load = load_for(spec, base)
        if workers > 1:
            multi += 1
            assert load.channels >= 4 * workers, name
        elif "control_for" in spec:
            assert load == load_for(CONFIGS[spec["control_for"]], base), name
        else:
            assert load == base, name
    assert multi >= 1


def test_paired_differences_say_when_the_rounds_show_a_difference_and_when_not():
    clear = report.paired_differences([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    assert clear["median"] == 4.5 and clear["lower"] == 0 and clear["higher"] == 8 and clear["n"] == 8
    assert 1.0 <= clear["ci95"][0] <= clear["median"] <= clear["ci95"][1] <= 8.0 and clear["ci95"][0] > 0
    assert clear["sign_test_p"] == pytest.approx(2 / 256)  # all 8 one way: 2 * (1/2)^8

    noise = report.paired_differences([-13.0, 20.0, -3.5, 9.0, -1.0, 2.0])  # a day like 2026-12-06's
    assert noise["ci95"][0] < 0 < noise["ci95"][1] and noise["sign_test_p"] == 1.0

    ties = report.paired_differences([0.0, 0.0, 1.0])  # ties count neither way
    assert (ties["lower"], ties["higher"], ties["sign_test_p"]) == (0, 1, 1.0)
    assert report.paired_differences([3.0, -1.0, 2.0]) == report.paired_differences([3.0, -1.0, 2.0])  # seeded
    with pytest.raises(ValueError):
        report.paired_differences([])


def test_the_headline_takes_medians_over_the_cpu_components_every_run_has():
    """One run computed a few requests on the compute thread (compute_unstaged), the others all inline
    (event_loop_unstaged): the headline's medians skip what not every run has, instead of failing the benchmark
    after its runs (a 2026-12-07 `bench slo` died so)."""
    from benchmarks.slo import headline

    def run(p99, unstaged_key):
        return {"p99_ms": p99, "p50_ms": 1.0, "error_rate": 0.0,
                "cpu_ms_per_request": {"total": p99 / 4, "event_loop": 1.3, unstaged_key: 0.1}}

    h = headline([run(6.6, "compute_unstaged"), run(5.0, "event_loop_unstaged"), run(4.8, "event_loop_unstaged")],
                 500)
    assert h["median_p99_ms"] == 5.0
    assert h["median_cpu_ms_per_request"] == {"total": 1.25, "event_loop": 1.3}


def test_slo_refuses_an_unknown_configuration_and_a_trainer_setting_without_the_trainer(tmp_path, capsys):
    from benchmarks.slo import main

    for configs, message in (("optimised,nope", "unknown configuration 'nope'"),
                             ("optimised,trainer-spins", "trainer-spins sets the trainer's flags: it needs --with-trainer")):
        with pytest.raises(SystemExit) as e:
            main(["--catalog", str(tmp_path), "--configs", configs, "--out", str(tmp_path / "out")])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything ran
