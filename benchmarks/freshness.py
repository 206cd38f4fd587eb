"""`python -m benchmarks.freshness`: event -> serving freshness with and without short rounds, and its cost in
the server's P99 (issue 23).

For each configuration, one after the other, on its own local tansu broker and data dir: synthetic bootstrap
events on the topic, `livetower train --events kafka://…` and `livetower serve --events kafka://…` as processes
(the default DeepSeek tower, AOTInductor engines), wait for the first engine; then
1. idle: open-loop Recommend at --qps for --idle-s with no new events (the trainer has nothing to do);
2. live: --seconds of events at --event-rate/s stamped with the current time, beside the same load, scraping
   `livetower_serving_freshness_seconds` (now - event-time watermark of the engine serving as stable) every
   second, counted once an engine trained on this phase's events serves.
Configurations (--configs):
- full: full rounds only (every --round-interval-s, or 1,000 events), each canaried with the full policy
  (small steps off: min_duration_s, 100 shadow pairs, live sample or max_duration_s): what served before;
- short: the same plus short rounds (--short-round-max-events, one pass, refit) and the default policy, whose
  small-step path promotes a refit of stable's graph within 2,000 events on 20 shadow pairs.
Writes results.json and results.png under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import threading
import time
from pathlib import Path

import grpc

from benchmarks.loadgen import LoadConfig, run_load
from benchmarks.processes import stop_server
from benchmarks.stream import fresh_loop_dir, live_events, scrape, spawn, wait_serving
from benchmarks.tansu import free_port
from contracts.kafka_events import KafkaTarget, now_ms, produce_all
from contracts.registry import Registry
from contracts.rollout import CanaryPolicy
from proto import livetower_v1_pb2_grpc as pb_grpc

CONFIGS = ("full", "short")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.freshness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-results/freshness"))
    p.add_argument("--configs", default="full,short", help=f"comma-separated, of {CONFIGS}")
    p.add_argument("--seconds", type=float, default=180.0, help="length of the live phase")
    p.add_argument("--idle-s", type=float, default=20.0, help="load with no new events, before the live phase")
    p.add_argument("--event-rate", type=float, default=50.0, help="events/s in the live phase")
    p.add_argument("--qps", type=float, default=200.0, help="open-loop Recommend load in both phases")
    p.add_argument("--users", type=int, default=1000, help="synthetic users (30 events each) before the phases")
    p.add_argument("--round-interval-s", type=float, default=10.0, help="full rounds at least this often")
    p.add_argument("--short-round-max-events", type=int, default=500)
    p.add_argument("--train-flags", default="", help="more `livetower train` flags for every configuration")
    p.add_argument("--serve-flags", default="", help="more `livetower serve` flags for every configuration (e.g. "
                                                     "--poll-interval-s 0.25: a publish is seen sooner)")
    p.add_argument("--small-step-shadow-qps", type=float, default=CanaryPolicy().small_step_shadow_qps,
                   help="the short configuration's CanaryPolicy.small_step_shadow_qps")
    p.add_argument("--small-step-interval-s", type=float, default=CanaryPolicy().small_step_interval_s,
                   help="the short configuration's CanaryPolicy.small_step_interval_s (-1: none)")
    return p.parse_args(argv)


def percentiles_s(xs: list[float]) -> dict:
    if not xs:
        return {"count": 0}
    s = sorted(xs)
    return {"count": len(s), "p50": s[len(s) // 2], "p90": s[int(0.9 * len(s))], "max": s[-1],
            "mean": statistics.fmean(s)}


class EventProducer(threading.Thread):
    """Events at a fixed rate, stamped with the current time, one produce call a second."""

    def __init__(self, target: KafkaTarget, rate: float, users: int) -> None:
        super().__init__(daemon=True)
        self.target, self.rate, self.users = target, rate, users
        self.stop = threading.Event()
        self.produced = 0

    def run(self) -> None:
        import random

        rng = random.Random(1)

        async def main():
            while not self.stop.is_set():
                t0 = time.monotonic()
                batch = live_events(rng, self.produced, max(1, int(self.rate)), self.users)
                await produce_all(self.target, batch)
                self.produced += len(batch)
                await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))

        asyncio.run(main())


def engine_events(metrics_url: str) -> dict[str, float]:
    import urllib.request

    try:
        text = urllib.request.urlopen(metrics_url, timeout=2).read().decode()
    except OSError:
        return {}
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^livetower_engine_events_total\{kind="([^"]+)"\} (\S+)$', text, re.M)}


def short_round_seconds(log: Path) -> list[float]:
    return [float(m.group(1)) for m in re.finditer(r"short round .* in ([0-9.]+)s", log.read_text(errors="replace"))]


LOAD_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) INFO livetower\.engine: engine \d+ loaded", re.M)


def load_windows(server_log: Path, duration_s: float):
    """run_load's `windows`: the live load's latency split by what the server did in each second (by completion
    time): the second in which an engine load finished (its canary's shadow burst follows at once), the second
    after one, and the seconds with neither, so a step's cost is told from the rest of the traffic."""
    def windows(start_unix: float) -> dict[str, list[tuple[int, int]]]:
        ends = [time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000 - start_unix
                for m in LOAD_LINE.finditer(server_log.read_text(errors="replace"))]  # log: local time, ms
        loads = {int(t // 1) for t in ends if 0 <= t < duration_s}
        after = {s + 1 for s in loads if s + 1 < duration_s} - loads
        quiet = set(range(int(duration_s))) - loads - after
        return {name: [(s, s + 1) for s in sorted(secs)]
                for name, secs in (("load_second", loads), ("second_after", after), ("no_load", quiet))}
    return windows


def wait_bootstrapped(registry: Registry, n_events: int, procs, timeout_s: float) -> None:
    """Until the stable engine was trained on every bootstrap event (the trainer may take it in several rounds):
    the live phase measures events arriving at a trainer that has caught up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise SystemExit("the trainer or the server exited; see their logs")
        stable = registry.read_rollout().stable
        if stable and registry.read_manifest(stable).trained_events >= n_events:
            return
        time.sleep(1.0)
    raise SystemExit(f"the bootstrap events were not all trained into a serving engine within {timeout_s:.0f} s")


def run_config(name: str, args, root: Path) -> dict:
    work = root / name
    broker, target, url = fresh_loop_dir(work, work / "tansu.log")
    policy = (CanaryPolicy(small_step_shadow_qps=args.small_step_shadow_qps,
                           small_step_interval_s=args.small_step_interval_s) if name == "short"
              else CanaryPolicy(small_step_events=-1))
    Registry(work / "data" / "registry").update_rollout(lambda st: setattr(st, "policy", policy))
    flags = ["--round-interval-s", str(args.round_interval_s), *args.train_flags.split()]
    if name == "short":
        flags += ["--short-round-max-events", str(args.short_round_max_events)]
    procs = []
    try:
        from trainer.data.synthetic import SyntheticConfig, generate

        # Bootstrap history of the last two hours: days-old events would all expire (item_ttl_s) at the first
        # live round and every item would be admitted afresh.
        boot = SyntheticConfig(n_users=args.users, start_ms=now_ms() - 2 * 3600 * 1000)
        n = asyncio.run(produce_all(target, generate(boot)))
        print(f"[{name}] {n} bootstrap events; trainer flags: {' '.join(flags)}", flush=True)
        port, metrics_port = free_port(), free_port()
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        procs.append(spawn(["train", "--data-dir", str(work / "data"), "--events", url, "--trainer-metrics-port",
                            "-1", *flags], work / "trainer.log"))
        procs.append(spawn(["serve", "--data-dir", str(work / "data"), "--events", url, "--port", str(port),
                            "--admin-port", "0", "--metrics-port", str(metrics_port), *args.serve_flags.split()],
                           work / "server.log"))
        addr = f"127.0.0.1:{port}"
        wait_serving(pb_grpc.RecommenderStub(grpc.insecure_channel(addr)), procs[1], work / "server.log", 900)
        wait_bootstrapped(Registry(work / "data" / "registry"), n, procs, 900)
        load = dict(target=addr, rate=args.qps, warmup_s=2.0, users=args.users, items=1000, item_prefix="item-",
                    history_len=20, k=100, mix=(("recommend", 1.0),), progress=False)
        print(f"[{name}] serving; idle phase: {args.qps:g} Recommend/s for {args.idle_s:g} s", flush=True)
        idle = run_load(LoadConfig(**load, duration_s=args.idle_s, label=f"{name} idle"), log=lambda s: None)
        before = engine_events(metrics_url)
        print(f"[{name}] live phase: {args.event_rate:g} events/s beside the load for {args.seconds:g} s", flush=True)
        producer = EventProducer(target, args.event_rate, args.users)
        box: dict = {}
        loader = threading.Thread(target=lambda: box.setdefault("r", run_load(
            LoadConfig(**load, duration_s=args.seconds, label=f"{name} live"), log=lambda s: None,
            windows=load_windows(work / "server.log", args.seconds))))
        loader.start()
        producer.start()
        t_start, series = time.time(), []
        try:
            while loader.is_alive():
                f = scrape(metrics_url, "livetower_serving_freshness_seconds")
                v = scrape(metrics_url, "livetower_serving_engine_version")
                series.append({"t": round(time.time() - t_start, 2), "freshness_s": f, "version": v})
                if len(series) % 30 == 0:
                    print(f"[{name}]   t={series[-1]['t']:.0f}s freshness {f if f is None else round(f, 1)} s, "
                          f"engine v{v}", flush=True)
                time.sleep(1.0)
        finally:
            producer.stop.set()
            loader.join()
            producer.join(10)
        after = engine_events(metrics_url)
    finally:
        for p in procs:
            stop_server(p)
        broker.stop()
    counted = [s for s in series if s["freshness_s"] is not None and s["freshness_s"] <= s["t"]]
    live = box["r"]
    result = {"trainer_flags": flags, "serve_flags": args.serve_flags.split(),
              "policy": {"small_step_events": policy.small_step_events,
                         "small_step_shadow_qps": policy.small_step_shadow_qps,
                         "small_step_interval_s": policy.small_step_interval_s},
              "freshness_s": percentiles_s([s["freshness_s"] for s in counted]),
              "counted_from_t": counted[0]["t"] if counted else None, "series": series,
              "events_produced": producer.produced,
              "engine_events_in_live_phase": {k: after.get(k, 0) - before.get(k, 0) for k in after},
              "short_round_s": percentiles_s(short_round_seconds(work / "trainer.log")),
              "load_idle": {"latency_ms": idle["latency_ms"], "errors": idle["errors"]},
              "load_live": {"latency_ms": live["latency_ms"], "errors": live["errors"]},
              "load_live_by_second": live.get("windows", {})}
    fr, li, lv = result["freshness_s"], idle["latency_ms"], live["latency_ms"]
    print(f"[{name}] freshness p50 {fr.get('p50', float('nan')):.1f} s p90 {fr.get('p90', float('nan')):.1f} s "
          f"({fr['count']} samples); load P99 idle {li['p99']:.2f} ms, live {lv['p99']:.2f} ms; "
          f"engine events {result['engine_events_in_live_phase']}", flush=True)
    for what, w in result["load_live_by_second"].items():
        if w.get("count"):
            print(f"[{name}]   live, {what} ({w['seconds']} s): P50 {w['p50']:.2f} P99 {w['p99']:.2f} ms, "
                  f"{w['count']} requests, {w['errors']} errors", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv or [])
    names = [c for c in args.configs.split(",") if c]
    if bad := [c for c in names if c not in CONFIGS]:
        raise SystemExit(f"--configs: unknown {bad}; choose from {CONFIGS}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "runs": {name: run_config(name, args, args.out / "work") for name in names}}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "results.png")
    print(f"results in {args.out}", flush=True)
    return 0


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    for name, r in runs.items():
        pts = [(s["t"], s["freshness_s"]) for s in r["series"] if s["freshness_s"] is not None
               and s["freshness_s"] <= s["t"]]
        fr = r["freshness_s"]
        if pts:
            a.plot([t for t, _ in pts], [f for _, f in pts],
                   label=f"{name}: p50 {fr['p50']:.1f} s, p90 {fr['p90']:.1f} s")
    a.set_xlabel("time in live phase (s)")
    a.set_ylabel("now - watermark of the stable engine (s)")
    a.set_title("event to serving freshness")
    a.legend()
    names = list(runs)
    for j, (phase, q) in enumerate((("load_idle", "p50"), ("load_idle", "p99"), ("load_live", "p50"),
                                    ("load_live", "p99"))):
        b.bar([i + 0.2 * j for i in range(len(names))], [runs[n][phase]["latency_ms"][q] for n in names], 0.2,
              label=f"{phase.split('_')[1]} {q}")
    b.set_xticks([i + 0.3 for i in range(len(names))], names)
    b.set_ylabel("Recommend latency (ms, open loop)")
    b.set_title(f"load at {results['config']['qps']} QPS: idle vs live")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
