"""`python -m benchmarks.fleet_bench`: the fleet's closing measurements (issue 21), on three replicas in three
network namespaces (benchmarks/fleet.py), each phase under open-loop round-robin load over all replicas:

  rollout    publish -> auto canary -> auto promote: when each replica serves the canary, then the promoted version
  kill       kill -9 of a replica (not the lease holder) mid-canary: the decision still comes, one fleet-wide; the
             restarted replica's first answer already has the current stable and canary
  holder     kill -9 of the lease holder mid-canary: who takes over and when; the decision made once, by whom
  cut        one replica's link down for --cut-s while a version is promoted: it keeps serving (queried inside its
             namespace), then converges
  publishers two processes publishing at once to the S3 registry: no version twice, every engine verifies
  cpu        server CPU time per request with 1 replica and with 3 (2 cores cap the QPS here)

A watcher thread per replica reads GetRollout every 0.1 s: the follow times are good to about 0.1 s.
Writes results.json and results.png into --out.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.fleet import Fleet, FleetConfig
from benchmarks.loadgen import LoadConfig, run_load
from benchmarks.server_cpu import thread_cpu_s
from benchmarks.swap import wait as _wait
from proto import livetower_v1_pb2 as pb

# Auto mode, decided on the fleet's merged reports after >= 8 s and 100 requests per arm.
POLICY = pb.CanaryPolicy(mode="auto", fraction=0.2, min_requests=100, min_duration_s=8.0, max_duration_s=40.0,
                         max_p99_ratio=3.0, max_error_rate=0.01, min_topk_overlap=0.2, max_score_drift=0.8,
                         shadow_samples=50, shadow_qps=20.0, outcome_test="off")


PHASES = ("rollout", "kill", "holder", "cut", "publishers", "cpu")


@dataclass(kw_only=True, frozen=True, slots=True)
class FleetBenchConfig:
    out: Path                       # results.json + results.png
    engines: Path                   # a local registry dir whose version 1 is published again and again
    rate: float = 100.0             # Recommend/s over the whole fleet, round robin
    lease_s: float = 5.0            # serve --lease-s
    poll_interval_s: float = 1.0    # serve --poll-interval-s (the default)
    cut_s: float = 30.0             # how long one replica's link is down
    publishes_each: int = 5         # engines each of the two publishers publishes at once
    cpu_s: float = 20.0             # measured seconds of each CPU-per-request run
    phases: tuple[str, ...] = PHASES  # which to run, in this order

    def __post_init__(self) -> None:
        unknown = set(self.phases) - set(PHASES)
        if unknown:
            raise ValueError(f"phases: unknown {sorted(unknown)}; choose from {PHASES}")
        for name in ("rate", "lease_s", "poll_interval_s", "cut_s", "cpu_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


class Watch:
    """Each replica's GetRollout every 0.1 s, from its own thread: (unix time, replica, stable, canary, leader)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet, self.rows, self._stop = fleet, [], threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(fleet.config.replicas)]

    def _run(self, i: int) -> None:
        while not self._stop.is_set():
            r = self.fleet.rollout(i, timeout_s=0.3)
            if r is not None:
                self.rows.append((time.time(), i, r.stable_version, r.canary_version, r.leader))
            time.sleep(0.1)

    def first(self, after: float, pred) -> dict[int, float]:
        """replica -> first time after `after` a row satisfied pred(stable, canary, leader)."""
        out: dict[int, float] = {}
        for t, i, stable, canary, leader in sorted(self.rows):
            if t >= after and i not in out and pred(stable, canary, leader):
                out[i] = t
        return out

    def __enter__(self) -> "Watch":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


class Load:
    """Open-loop Recommend load over every replica (round robin) in a background thread."""

    def __init__(self, fleet: Fleet, rate: float, duration_s: float, label: str) -> None:
        self.config = LoadConfig(target=fleet.balanced_target(), rate=rate, duration_s=duration_s, warmup_s=1.0,
                                 users=2000, items=300, history_len=10, k=10, mix=(("recommend", 1.0),),
                                 deadline_ms=1000.0, label=label, progress=False, use_uvloop=True,
                                 healthy_only=True)
        self.result: dict | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.result = run_load(self.config, log=lambda line: None)

    def __enter__(self) -> "Load":
        self._thread.start()
        time.sleep(2.0)  # workers spawned and connected
        return self

    def __exit__(self, *exc) -> None:
        self._thread.join()

    def summary(self) -> dict:
        r = self.result or {}
        return {"rate": self.config.rate, "requests": r.get("requests"), "errors": r.get("errors"),
                "latency_ms": r.get("latency_ms"), "timeseries": r.get("timeseries"),
                "measured_start_unix": r.get("measured_start_unix")}


def spread(times: dict[int, float], since: float) -> dict:
    vals = sorted(times.values())
    return {"per_replica_s": {str(i): round(t - since, 3) for i, t in sorted(times.items())},
            "all_by_s": round(vals[-1] - since, 3) if vals else None,
            "spread_s": round(vals[-1] - vals[0], 3) if vals else None, "replicas": len(vals)}


def decision(fleet: Fleet, version: int, alive: int, timeout_s: float = 90.0) -> tuple[pb.RolloutEvent, list]:
    """Wait for the promote/rollback of `version`; (the event, every matching event in the history)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = fleet.rollout(alive)
        events = [e for e in (r.history if r else ()) if e.version == version and e.action in ("promote", "rollback")]
        if events:
            return events[0], events
        time.sleep(0.2)
    raise TimeoutError(f"no decision on engine {version} within {timeout_s:g} s")


def _all(times: dict, n: int) -> bool:
    return len(times) == n


def phase_rollout(fleet: Fleet, watch: Watch, cfg: FleetBenchConfig, log) -> dict:
    with Load(fleet, cfg.rate, 45.0, "rollout") as load:
        t_pub = time.time()
        v = fleet.publish(1)
        log(f"rollout: published engine {v}")
        event, events = decision(fleet, v, 0)
        t_dec = event.time_ms / 1000
        time.sleep(3.0)
        canary_at = watch.first(t_pub, lambda s, c, lead: c == v or s == v)
        stable_at = watch.first(t_dec - 1.0, lambda s, c, lead: s == v)
        r = fleet.rollout(0)
        start = next(e for e in r.history if e.version == v and e.action == "canary")
    return {"version": v, "decision": event.action, "decided_by": event.replica, "decisions": len(events),
            "publish_to_canary_decision_s": round(start.time_ms / 1000 - t_pub, 3),
            "canary_serving": spread(canary_at, start.time_ms / 1000),
            "canary_serving_from_publish": spread(canary_at, t_pub),
            "promoted_serving": spread(stable_at, t_dec),
            "stable_after": [fleet.rollout(i).stable_version for i in range(fleet.config.replicas)],
            "load": load.summary()}


def _canary_running(fleet: Fleet, watch: Watch, log) -> tuple[int, float]:
    t = time.time()
    v = fleet.publish(1)
    watch_for = lambda: _all(watch.first(t, lambda s, c, lead: c == v), fleet.config.replicas)  # noqa: E731
    _wait(watch_for, 30, f"every replica serving canary {v}")
    log(f"canary {v} on every replica")
    return v, t


def phase_kill(fleet: Fleet, watch: Watch, cfg: FleetBenchConfig, log) -> dict:
    lead = fleet.holder()
    victim = (lead + 1) % fleet.config.replicas
    slow = pb.CanaryPolicy()
    slow.CopyFrom(POLICY)
    slow.min_duration_s = 30.0  # the canary still runs when the killed replica is back
    fleet.client(lead).set_policy(slow)
    with Load(fleet, cfg.rate, 50.0, "kill") as load:
        v, _ = _canary_running(fleet, watch, log)
        fleet.kill(victim)
        t_kill = time.time()
        time.sleep(1.0)
        fleet.start_replica(victim)
        serving = lambda: watch.first(t_kill, lambda s, c, who: s != 0).get(victim)  # noqa: E731
        _wait(serving, 120, "the restarted replica serving")
        first = next(row for row in sorted(watch.rows) if row[0] >= t_kill and row[1] == victim and row[2] != 0)
        event, events = decision(fleet, v, lead)
        time.sleep(3.0)
        finals = [fleet.rollout(i) for i in range(fleet.config.replicas)]
    fleet.client(lead).set_policy(POLICY)
    return {"version": v, "killed": victim, "restart_to_serving_s": round(first[0] - t_kill - 1.0, 3),
            "restarted_first_serving": {"stable": first[2], "canary": first[3]},
            "canary_running_at_restart": first[3] == v,
            "decision": event.action, "decided_by": event.replica, "decisions": len(events),
            "stable_after": [r.stable_version if r else None for r in finals], "load": load.summary()}


def phase_holder(fleet: Fleet, watch: Watch, cfg: FleetBenchConfig, log) -> dict:
    with Load(fleet, cfg.rate, 45.0, "holder") as load:
        lead = fleet.holder()
        v, _ = _canary_running(fleet, watch, log)
        fleet.kill(lead)
        t_kill = time.time()
        taken = lambda: watch.first(t_kill, lambda s, c, who: who not in ("", f"replica-{lead}"))  # noqa: E731
        _wait(taken, 30, "a new lease holder")
        took = taken()
        other = min(took)
        event, events = decision(fleet, v, other)
        r = fleet.rollout(other)
        leads = [f"{e.replica}: {e.reason}" for e in r.history if e.action == "lead" and e.time_ms / 1000 >= t_kill]
        fleet.start_replica(lead)
        fleet.wait_serving(r.stable_version, replicas=[lead])
    return {"version": v, "killed_holder": f"replica-{lead}", "takeover_s": round(min(took.values()) - t_kill, 3),
            "lease_s": cfg.lease_s, "lead_events": leads, "decision": event.action, "decided_by": event.replica,
            "decisions": len(events), "history_tail": [f"{e.action} {e.version} by {e.replica or e.actor}: {e.reason}"
                                                      for e in r.history[-6:]], "load": load.summary()}


def _query_inside(fleet: Fleet, i: int) -> dict:
    """Recommend on replica i over its own loopback (its link is down): does it still serve, and what."""
    code = ("from contracts.client import Client; c = Client('127.0.0.1:50051', timeout_s=2); "
            "r = c.recommend('user-1', 5, history=['item-1']); print(r.engine_version, len(r.item_ids))")
    done = subprocess.run(["ip", "netns", "exec", fleet.hosts.namespace(i), sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=60)
    return {"rc": done.returncode, "out": done.stdout.strip(), "err": done.stderr.strip()[-300:]}


def phase_cut(fleet: Fleet, watch: Watch, cfg: FleetBenchConfig, log) -> dict:
    with Load(fleet, cfg.rate, cfg.cut_s + 30.0, "cut") as load:
        lead = fleet.holder()
        cut = (lead + 1) % fleet.config.replicas
        before = fleet.rollout(cut).stable_version
        fleet.hosts.cut(cut)
        t_cut = time.time()
        log(f"cut: replica {cut} link down for {cfg.cut_s:g} s")
        v = fleet.publish(1)
        event, _ = decision(fleet, v, lead)
        inside = _query_inside(fleet, cut)
        time.sleep(max(0.0, t_cut + cfg.cut_s - time.time()))
        fleet.hosts.restore(cut)
        t_back = time.time()
        _wait(lambda: cut in watch.first(t_back, lambda s, c, who: s == v), 60, f"replica {cut} converging")
        back = watch.first(t_back, lambda s, c, who: s == v)[cut]
    return {"cut": cut, "cut_s": round(t_back - t_cut, 1), "stable_before": before, "promoted": v,
            "decision": event.action, "decided_at_s_after_cut": round(event.time_ms / 1000 - t_cut, 2),
            "served_inside_while_cut": inside, "converged_after_restore_s": round(back - t_back, 3),
            "load": load.summary()}


def _publish_many(url: str, engines: str, cache: str, n: int, q) -> None:
    from contracts.object_registry import ObjectRegistry
    from benchmarks.swap import copy_in
    from contracts.registry import Registry

    reg, src = ObjectRegistry(url, Path(cache)), Registry(Path(engines))
    q.put([copy_in(src, 1, reg) for _ in range(n)])


def phase_publishers(fleet: Fleet, cfg: FleetBenchConfig, log) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_publish_many, args=(fleet.registry_url, str(cfg.engines),
                                                     str(fleet.workdir / f"pub-{j}"), cfg.publishes_each, q))
             for j in range(2)]
    t0 = time.time()
    for p in procs:
        p.start()
    got = [q.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
    claimed = sorted(v for g in got for v in g)
    reader = fleet.registry()
    verified = {}
    for v in claimed:
        try:
            reader.verify(v)
            verified[v] = "ok"
        except Exception as e:  # noqa: BLE001 - reported
            verified[v] = str(e)
    return {"seconds": round(time.time() - t0, 2), "by_publisher": got, "distinct": len(set(claimed)),
            "claimed": len(claimed), "all_verify": all(s == "ok" for s in verified.values()), "verify": verified}


def _cpu_run(fleet: Fleet, replicas: list[int], rate: float, seconds: float) -> dict:
    load = Load(fleet, rate, seconds, f"cpu-{len(replicas)}-{rate:g}")
    if len(replicas) == 1:
        load.config = load.config.__class__(**{**asdict(load.config), "target": fleet.data_target(replicas[0])})
    pids = {i: fleet.procs[i].pid for i in replicas}
    before = {i: sum(thread_cpu_s(p).values()) for i, p in pids.items()}
    with load:
        pass
    after = {i: sum(thread_cpu_s(p).values()) for i, p in pids.items()}
    r = load.result
    n = r["requests"]["completed_ok"]
    cpu = sum(after[i] - before[i] for i in replicas)
    return {"rate": rate, "requests_ok": n, "errors": r["errors"]["total"], "server_cpu_s": round(cpu, 3),
            "cpu_ms_per_request": round(1e3 * cpu / n, 3) if n else None,
            "p50_ms": r["latency_ms"].get("p50"), "p99_ms": r["latency_ms"].get("p99")}


def phase_cpu(fleet: Fleet, cfg: FleetBenchConfig, log) -> dict:
    """Server CPU per request, all replicas summed, at two rates: the slope between them is the cost of a
    request; what it leaves over is the replicas' own fixed cost (polls, lease, history feed) per second."""
    pids = {i: p.pid for i, p in fleet.procs.items()}
    before = {i: sum(thread_cpu_s(p).values()) for i, p in pids.items()}
    time.sleep(10.0)
    out: dict = {"idle_cpu_s_per_s": {str(i): round((sum(thread_cpu_s(p).values()) - before[i]) / 10.0, 4)
                                      for i, p in pids.items()}}
    log(f"cpu: idle {out['idle_cpu_s_per_s']}")
    for label, replicas in (("3 replicas", list(range(fleet.config.replicas))), ("1 replica", [0])):
        lo, hi = (_cpu_run(fleet, replicas, rate, cfg.cpu_s) for rate in (cfg.rate * 0.5, cfg.rate * 1.5))
        dn = hi["requests_ok"] - lo["requests_ok"]
        slope = (hi["server_cpu_s"] - lo["server_cpu_s"]) / dn if dn > 0 else None
        out[label] = {"runs": [lo, hi], "marginal_cpu_ms_per_request": round(1e3 * slope, 3) if slope else None}
        log(f"cpu: {label}: {out[label]}")
    return out


def run(cfg: FleetBenchConfig, log=print) -> dict:
    from contracts.registry import Registry

    fc = FleetConfig(replicas=3, lease_s=cfg.lease_s, poll_interval_s=cfg.poll_interval_s)
    results: dict = {"config": {k: str(v) for k, v in asdict(cfg).items()}, "fleet": asdict(fc)}
    with Fleet(cfg.out / "work", engines_from=Registry(cfg.engines), config=fc, log=log) as fleet:
        v1 = fleet.publish(1)
        fleet.start_all(serving_version=v1, timeout_s=240)
        fleet.client(1).set_policy(POLICY)  # sent to any replica: reaches the holder
        phases = {"rollout": phase_rollout, "kill": phase_kill, "holder": phase_holder, "cut": phase_cut}
        with Watch(fleet) as watch:
            for name in (p for p in cfg.phases if p in phases):
                log(f"== {name}")
                results[name] = phases[name](fleet, watch, cfg, log)
                log(json.dumps({k: v for k, v in results[name].items() if k != "load"}, default=str))
                (cfg.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        fleet.client(0).set_policy(pb.CanaryPolicy(mode="manual"))  # publishes from here on wait: no canary runs
        if "publishers" in cfg.phases:
            log("== publishers")
            results["publishers"] = phase_publishers(fleet, cfg, log)
            log(json.dumps({k: v for k, v in results["publishers"].items() if k != "verify"}))
        if "cpu" in cfg.phases:
            log("== cpu")
            results["cpu"] = phase_cpu(fleet, cfg, log)
    (cfg.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    from benchmarks.fleet_plot import plot

    plot(results, cfg.out / "results.png")
    return results


def tiny_engine(workdir: Path, log=print) -> Path:
    """A local registry with engine 1 of the tiny debug model on a small synthetic world (what the tests serve);
    returns the registry dir. Built once per workdir (~10 s)."""
    from contracts.eventlog import SqliteEventLog
    from contracts.registry import Registry
    from trainer.config import TrainConfig
    from trainer.data.synthetic import SyntheticConfig, generate
    from trainer.loop import Trainer

    if (workdir / "registry" / "engines" / "1").is_dir():
        return workdir / "registry"
    workdir.mkdir(parents=True, exist_ok=True)
    events = SqliteEventLog(workdir / "events.sqlite")
    events.append(list(generate(SyntheticConfig(n_users=200, n_items=300, n_clusters=10, events_per_user=20,
                                                seed=3))))
    result = Trainer(TrainConfig.tiny_debug(), events, Registry(workdir / "registry"), workdir / "trainer").run_round()
    if result is None or result.published_version != 1:
        raise RuntimeError(f"the tiny engine was not published: {result}")
    log(f"built the tiny engine in {workdir}/registry")
    return workdir / "registry"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fleet_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-results/fleet"))
    p.add_argument("--engines", type=Path, help="a local registry dir whose engine 1 is published again and again "
                                                "(default: the tiny debug engine, built under --out)")
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--cut-s", type=float, default=30.0)
    p.add_argument("--poll-interval-s", type=float, default=1.0, help="each replica's serve --poll-interval-s")
    p.add_argument("--cpu-s", type=float, default=20.0)
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, from {','.join(PHASES)}")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    engines = args.engines or tiny_engine(args.out / "tiny-engine")
    run(FleetBenchConfig(out=args.out, engines=engines, rate=args.rate, cut_s=args.cut_s, cpu_s=args.cpu_s,
                         poll_interval_s=args.poll_interval_s,
                         phases=tuple(p for p in args.phases.split(",") if p)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
