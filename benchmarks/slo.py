"""`livetower bench slo`: the naive baseline and the optimised server, same model, same run.

For each server configuration (started here as its own process on a free port, afresh for every
load run so no backlog carries over):
  1. the headline: Recommend k=100 at --rate QPS open-loop, --runs times (median of the P99s);
  2. capacity: rates from --sweep in ascending order until P99 >= --slo-p99-ms or errors exceed the
     budget (one run each); then the highest passing rate is confirmed by the median of --runs runs
     (stepping down the sweep while the median fails): that rate is the configuration's capacity;
  3. overload (optimised only): 2 x capacity, --runs times: shed fraction (RESOURCE_EXHAUSTED) and
     P99 of the admitted requests (medians).
Writes results.json and results.png into --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.calibration import grpc_roundtrip_ms, python_loop_s, tower_ms
from benchmarks.catalog import BASELINE_DIR
from benchmarks.loadgen import LoadConfig, run_load
from benchmarks.report import paired_differences
from benchmarks.processes import (PEER_METADATA, Staller, free_port_block, parse_stall, start_otlp_sink, start_server,
                                  start_trainer, stop_otlp_sink, stop_server, trainer_events)
from benchmarks.server_cpu import CpuSample, per_request_ms, shed_by_reason, wait_for_workers
from benchmarks.workload import KINDS, make_workload, parse_mix

CONFIGS = {
    "baseline": {"dir": BASELINE_DIR, "flags": ["--no-batching", "--no-uvloop", "--no-compute-process"],
                 "what": "torch.export eager user tower, torch matmul + topk, inline on the event loop, no batching"},
    "optimised": {"dir": ".", "flags": [],
                  "what": "AOTInductor user tower, micro-batching, the batches' towers and searches in a compute "
                          "host process, admission control, uvloop"},
    # Ablations: each drops one step of the optimised path, to show what that step buys.
    "aoti-inline": {"dir": ".", "flags": ["--no-batching", "--no-uvloop", "--no-compute-process"],
                    "what": "AOTInductor user tower only (inline, no batching, asyncio loop)"},
    "exact": {"dir": ".", "flags": ["--no-ann"], "what": "optimised, exact top-k instead of the HNSW index"},
    "no-uvloop": {"dir": ".", "flags": ["--no-uvloop"], "what": "optimised, default asyncio loop"},
    "no-batching": {"dir": ".", "flags": ["--no-batching"], "what": "optimised without micro-batching (inline)"},
    "no-inline": {"dir": ".", "flags": ["--inline-below-ms", "0"],
                  "what": "optimised, every Recommend through the compute thread (none computed on the event loop)"},
    # SO_REUSEPORT spreads connections, not requests: over one connection every request reaches one process (how this
    # ablation was measured until 2026-12-06, docs/serving.md). So its load goes over several connections.
    "workers2": {"dir": ".", "flags": ["--workers", "2"], "channels": 8,
                 "what": "optimised, 2 processes with SO_REUSEPORT, the load over 8 connections"},
    "conns8": {"dir": ".", "flags": [], "channels": 8, "control_for": "workers2",
               "what": "optimised, one process, the load over 8 connections (workers2's control)"},
    "in-process": {"dir": ".", "flags": ["--no-compute-process"],
                   "what": "optimised, the batches' towers and searches on the server's compute thread (no compute "
                           "host process: the default until 2026-12-07)"},
    "compute-process-only": {"dir": ".", "flags": ["--inline-below-ms", "0"],
                             "what": "optimised, every Recommend's tower and search in the compute host process"},
    # Beside the training sidecar (--with-trainer): the trainer's own settings, against optimised's defaults.
    "trainer-spins": {"dir": ".", "flags": [], "trainer_flags": ["--no-trainer-passive-wait"],
                      "what": "optimised, beside a trainer whose OpenMP threads spin when idle (libgomp's default)"},
    "no-gc-freeze": {"dir": ".", "flags": ["--no-gc-freeze"], "what": "optimised without gc.freeze()"},
    "gil-5ms": {"dir": ".", "flags": ["--gil-switch-interval-ms", "5"],
                "what": "optimised with Python's default 5 ms GIL switch interval"},
    # Tracing (issue 24): the optimised server exporting OpenTelemetry spans over OTLP to a local sink process
    # (benchmarks/otlp_sink.py; its CPU shares the machine, as a collector agent beside the server would).
    "tracing-1pct": {"dir": ".", "flags": [], "tracing_ratio": 0.01,
                     "what": "optimised, OpenTelemetry request spans sampled at 1 %, exported over OTLP"},
    "tracing-100pct": {"dir": ".", "flags": [], "tracing_ratio": 1.0,
                       "what": "optimised, every request traced (request, batch-wait and compute spans), exported over OTLP"},
    # The gRPC floor: the same stack answering with a canned response, no engine (benchmarks/grpc_floor.py).
    "grpc-floor": {"dir": ".", "flags": [], "peer": "floor",
                   "what": "grpc.aio on uvloop answering a canned k-item Recommend: no engine, no server logic"},
    # A peer: the same engine (tower package, item index) served by another widely used model server.
    "ray-serve": {"dir": ".", "flags": [], "peer": "ray",
                  "what": "the same engine behind Ray Serve's gRPC ingress (benchmarks/ray_peer.py), one replica"},
}


def server_processes(flags: list[str]) -> int:
    """How many processes a configuration's server flags start (`--workers N`; 1 without it)."""
    return int(flags[flags.index("--workers") + 1]) if "--workers" in flags else 1


def load_for(spec: dict, base: LoadConfig) -> LoadConfig:
    """The load a configuration gets: the common one, over the configuration's own number of connections (a server
    of several processes on one port needs several, or one process gets every request)."""
    return dataclasses.replace(base, channels=spec["channels"]) if "channels" in spec else base


def one_run(base: LoadConfig, port: int, rate: float, label: str) -> dict:
    r = run_load(dataclasses.replace(base, target=f"127.0.0.1:{port}", rate=rate, label=label), log=lambda m: None)
    lat, ok = r["latency_ms_incl_errors"], r["latency_ms"]
    # Headline percentiles count every request, failed ones at the time their error came back (a
    # DEADLINE_EXCEEDED is a slow request, not a missing one); *_ok_ms are the admitted requests only.
    summary = {"rate": rate, "achieved_qps": r["achieved_qps"], "p50_ms": lat.get("p50"), "p90_ms": lat.get("p90"),
               "p99_ms": lat.get("p99"), "p999_ms": lat.get("p99.9"), "max_ms": lat.get("max"),
               "p50_ok_ms": ok.get("p50"), "p99_ok_ms": ok.get("p99"),
               "error_rate": r["errors"]["rate"], "errors_by_code": r["errors"]["by_code"],
               "scheduled": r["requests"]["scheduled"],
               # How late the load generator itself sent (scheduled -> sent): a client stall shows here, and as a
               # burst at the server, not as server time.
               "client_lag_ms": {q: r["client_lag_ms"].get(q) for q in ("p99", "max")},
               # The load generator's own CPU per request, on the cores it shares with the server.
               "client_cpu_ms_per_request": r["client_cpu"]["ms_per_request"],
               # Per second of the measured window (t_s from measured_start_unix), to line slow seconds up with
               # the server's log (engine loads, canaries, swaps).
               "measured_start_unix": r["measured_start_unix"],
               # Per request kind of the mix (Recommend, LogEvents, ...): whose requests make the tail.
               "kinds": {kind: {"count": v["count"], "errors": v["errors"],
                                **{q: v["latency_ms"].get(q) for q in ("p50", "p99", "max")}}
                         for kind, v in r["kinds"].items()},
               "seconds": [{k: t[k] for k in ("t_s", "p99_ms", "max_ms", "errors")}
                           for t in r["timeseries"] if t["phase"] == "measured"]}
    print(f"  {label}: offered {rate:.0f} achieved {r['achieved_qps']:.0f} QPS  p50 {summary['p50_ms']:.2f}  "
          f"p99 {summary['p99_ms']:.2f}  max {summary['max_ms']:.2f} ms  errors {summary['errors_by_code']}",
          flush=True)
    cpu = summary["client_cpu_ms_per_request"]
    print(f"    client send lag: p99 {summary['client_lag_ms']['p99']} ms, max {summary['client_lag_ms']['max']} ms; "
          f"client CPU/request {cpu if cpu is None else round(cpu, 3)} ms", flush=True)
    if len(summary["kinds"]) > 1:
        kinds = ", ".join(f"{kind} p99 {v['p99']} ms ({v['count']})" for kind, v in summary["kinds"].items())
        print(f"    by kind: {kinds}", flush=True)
    return summary


def passes(s: dict, slo_ms: float, budget: float) -> bool:
    return s["p99_ms"] is not None and s["p99_ms"] < slo_ms and s["error_rate"] <= budget


def measured(name: str, catalog: Path, args, base: LoadConfig, out: Path, rate: float, label: str) -> dict:
    """One load run against a freshly started server: no backlog from an earlier run leaks in. livetower servers
    (of one process or several) also report their CPU time per request by component (benchmarks/server_cpu.py). With
    --with-trainer, a copy of the catalogue is served while `livetower train` trains on it beside the server,
    on the events the load itself logs, publishing engines the server canaries and promotes."""
    spec = CONFIGS[name]
    flags = spec["flags"] + args.server_flags.get(name, [])
    peer = spec.get("peer")
    workers = server_processes(flags)
    mport = -1 if peer else free_port_block(workers)
    if peer in PEER_METADATA:
        base = dataclasses.replace(base, metadata=PEER_METADATA[peer])
    if peer == "floor":
        flags = [*flags, "--k", str(base.k)]  # its canned answer as long as the load asks for
    base = load_for(spec, base)
    data = catalog / spec["dir"]
    sidecar = args.with_trainer and not peer
    if sidecar:
        data = copy_catalog(data, out / "work", backlog=args.trainer_backlog, seed=0)  # the same backlog each run
    sink = start_otlp_sink(out / f"otlp-sink-{name}.log") if "tracing_ratio" in spec else None
    if sink is not None:
        flags = [*flags, "--tracing", "--tracing-otlp-endpoint", f"127.0.0.1:{sink[1]}",
                 "--tracing-sample-ratio", str(spec["tracing_ratio"])]
    try:
        proc, port = start_server(data, flags, out / f"server-{name}.log", metrics_port=mport, peer=peer)
    except Exception:
        if sink is not None:
            stop_otlp_sink(*sink)
        raise
    trainer_flags = [*args.trainer_flags.split(), *spec.get("trainer_flags", [])]
    trainer = start_trainer(data, trainer_flags, out / f"trainer-{name}.log") if sidecar else None
    summary = None
    try:
        pids, ports = [proc.pid], [mport]
        if workers > 1:  # every process up (the warm-up reached one of them): both lists complete
            pids, ports = wait_for_workers(proc.pid, workers, mport)
        before = CpuSample(pids, ports) if mport > 0 else None
        trained_before = trainer_events(trainer[1]) if trainer else 0.0
        t0 = time.monotonic()
        if args.stall is None:
            summary = one_run(base, port, rate, label)
        else:
            with Staller(pids, *args.stall) as staller:
                summary = one_run(base, port, rate, label)
            summary["stalls"] = {"every_s": args.stall[0], "ms": args.stall[1] * 1e3, "count": staller.stalls}
        if trainer:
            summary["trainer"] = {"events_per_s": (trainer_events(trainer[1]) - trained_before)
                                  / (time.monotonic() - t0), "flags": " ".join(trainer_flags)}
            print(f"    trainer beside it: {summary['trainer']['events_per_s']:.1f} events/s trained", flush=True)
        if before is not None:
            after = CpuSample(pids, ports)
            summary["cpu_ms_per_request"] = per_request_ms(before, after)
            summary["shed_by_reason"] = shed_by_reason(before, after)  # the server's own count, warm-up included
            c = summary["cpu_ms_per_request"]
            print(f"    server CPU/request {c.get('total', 0):.3f} ms: event loop {c.get('event_loop', 0):.3f}, "
                  f"compute {c.get('compute', 0):.3f} (tower {c.get('tower', 0):.3f}, retrieval "
                  f"{c.get('retrieval', 0):.3f}), gRPC threads {c.get('grpc_threads', 0):.3f}, "
                  f"batch {c.get('mean_batch', 0):.1f}; shed by reason {summary['shed_by_reason'] or 'none'}",
                  flush=True)
        return summary
    finally:
        if trainer:
            stop_server(trainer[0], grace_s=5)
        stop_server(proc)  # SIGTERM: the server flushes its buffered spans before it exits
        if sidecar and not args.keep_work:
            # Each run copies the catalogue (registry, engines, event log: ~1 GB at 100k items); kept, a few
            # series filled this machine's disk.
            shutil.rmtree(out / "work", ignore_errors=True)
        if sink is not None:
            spans = stop_otlp_sink(*sink)
            if summary is not None:  # every span of the run, warm-up included, as counted by the sink
                summary["spans_exported"] = spans
                print(f"    spans received by the OTLP sink: {spans}", flush=True)


def copy_catalog(src: Path, work: Path, *, backlog: int, seed: int) -> Path:
    """A fresh copy of a catalogue's serving and training state (the trainer beside the server changes it), with
    `backlog` new events in its log so the trainer beside the server is never idle during the run."""
    from contracts.eventlog import SqliteEventLog

    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(src, work, ignore=shutil.ignore_patterns(BASELINE_DIR))
    wl = make_workload(users=20_000, zipf_s=1.1, items=json.loads((src / "catalog.json").read_text())["items"], k=100)
    rng = np.random.default_rng(seed)  # the same kind of click events the load logs (benchmarks/workload.py)
    log = SqliteEventLog(work / "events.sqlite")
    try:
        log.append_all(KINDS["log"].make(rng, wl).events[0] for _ in range(backlog))
    finally:
        log.close()
    return work


def calibrate(catalog: Path, out: Path) -> dict:
    """The machine's speed today, beside the figures: gRPC loopback round trip, tower alone, a Python loop."""
    proc, port = start_server(catalog, [], out / "server-calibration.log")
    try:
        rtt = grpc_roundtrip_ms(f"127.0.0.1:{port}")
    finally:
        stop_server(proc)
    cal = {"grpc_roundtrip_ms": rtt, "tower_batch1_ms": tower_ms(catalog / "registry"),
           "python_10m_loop_s": python_loop_s()}
    print(f"calibration: gRPC loopback round trip {cal['grpc_roundtrip_ms']:.3f} ms, user tower (batch 1) "
          f"{cal['tower_batch1_ms']:.3f} ms, 10M-step Python loop {cal['python_10m_loop_s']:.2f} s", flush=True)
    return cal


def headline(runs: list[dict], rate: float) -> dict:
    cpu = [r["cpu_ms_per_request"] for r in runs if r.get("cpu_ms_per_request")]
    # Over the components every run has: which thread's time is "unstaged" depends on where a run computed
    # (compute thread, or inline on the event loop), so runs of one configuration can name different ones.
    common = [k for k in cpu[0] if all(k in c for c in cpu)] if cpu else []
    return {"rate": rate, "runs": runs,
            "median_cpu_ms_per_request": {k: statistics.median(c[k] for c in cpu) for k in common} if cpu else None,
            "median_p99_ms": statistics.median(r["p99_ms"] for r in runs),
            "median_p50_ms": statistics.median(r["p50_ms"] for r in runs),
            "median_error_rate": statistics.median(r["error_rate"] for r in runs)}


def interleaved(names: list[str], catalog: Path, args, base: LoadConfig, out: Path) -> dict:
    """Headlines only, measured in rounds: each round runs every config once, the order rotated by one per
    round, so a machine that drifts (a slower minute) weighs on every config alike. Per round, each config's
    difference to the first config (the baseline) is kept too: paired differences are steadier than medians."""
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            runs[name].append(measured(name, catalog, args, base, out, args.rate, f"{name}@{args.rate:.0f} "
                                                                                 f"round {r + 1}"))
    res = {n: {"what": CONFIGS[n]["what"], "flags": CONFIGS[n]["flags"] + args.server_flags.get(n, []),
               "headline": headline(runs[n], args.rate)} for n in names}
    for n in names[1:]:
        pairs = list(zip(runs[n], runs[names[0]]))
        diff = {"p99_ms": [a["p99_ms"] - b["p99_ms"] for a, b in pairs]}
        if all(a.get("cpu_ms_per_request") and b.get("cpu_ms_per_request") for a, b in pairs):
            diff["cpu_ms_per_request"] = [a["cpu_ms_per_request"]["total"] - b["cpu_ms_per_request"]["total"]
                                          for a, b in pairs]
        stats = {k: paired_differences(v) for k, v in diff.items()}
        res[n]["vs_" + names[0]] = {**{f"{k}_per_round": v for k, v in diff.items()},
                                    **{f"median_{k}": s["median"] for k, s in stats.items()},
                                    **{f"{k}_paired": s for k, s in stats.items()}}
        print(f"  {n} - {names[0]}: " + "; ".join(
            f"median {k} {s['median']:+.3f} (95% CI {s['ci95'][0]:+.3f} .. {s['ci95'][1]:+.3f}; {s['lower']} of "
            f"{s['n']} rounds lower, sign test p {s['sign_test_p']:.2f})" for k, s in stats.items()), flush=True)
    return res


def bench_config(name: str, catalog: Path, args, base: LoadConfig, out: Path) -> dict:
    spec = CONFIGS[name]
    print(f"[{name}] {spec['what']}", flush=True)
    res: dict = {"what": spec["what"], "flags": spec["flags"] + args.server_flags.get(name, [])}
    runs = [measured(name, catalog, args, base, out, args.rate, f"{name}@{args.rate:.0f} run {i + 1}")
            for i in range(args.runs)]
    res["headline"] = headline(runs, args.rate)
    if name in args.headline_only:
        return res
    sweep, passed = [], []
    for rate in args.sweep:
        s = measured(name, catalog, args, base, out, rate, f"{name} sweep @{rate:.0f}")
        sweep.append(s)
        if not passes(s, args.slo_p99_ms, args.error_budget):
            break
        passed.append(rate)
    res["sweep"], res["capacity_qps"], res["capacity_runs"] = sweep, 0.0, []
    for rate in reversed(passed):  # confirm: the median of --runs runs must pass too
        more = [measured(name, catalog, args, base, out, rate, f"{name} confirm @{rate:.0f} run {i + 2}")
                for i in range(args.runs - 1)]
        runs = [next(x for x in sweep if x["rate"] == rate), *more]
        res["capacity_runs"].append({"rate": rate, "runs": runs, "median_p99_ms": _median(runs, "p99_ms")})
        if passes({"p99_ms": _median(runs, "p99_ms"), "error_rate": _median(runs, "error_rate")},
                  args.slo_p99_ms, args.error_budget):
            res["capacity_qps"] = rate
            break
    capacity = res["capacity_qps"]
    if name == "optimised" and capacity > 0 and not args.skip_overload:
        runs = []
        for i in range(args.runs):
            s = measured(name, catalog, args, base, out, 2 * capacity, f"{name} overload @{2 * capacity:.0f} run {i + 1}")
            shed = s["errors_by_code"].get("RESOURCE_EXHAUSTED", 0)
            runs.append({**s, "shed_fraction": shed / max(s["scheduled"], 1)})
        res["overload"] = {"rate": 2 * capacity, "runs": runs,
                           **{f"median_{k}": _median(runs, k) for k in ("shed_fraction", "p99_ok_ms", "p50_ok_ms",
                                                                       "p99_ms", "error_rate")}}
    return res


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(results["configs"])
    med = [results["configs"][n]["headline"]["median_p99_ms"] for n in names]
    a.bar(names, med, color=["tab:gray", "tab:blue"][:len(names)])
    a.axhline(results["slo_p99_ms"], color="red", ls="--", label=f"SLO {results['slo_p99_ms']} ms")
    a.set_ylabel("P99 ms (median of runs)")
    a.set_title(f"Recommend k={results['load']['k']} at {results['rate']:.0f} QPS, {results['items']} items")
    a.legend()
    if any(results["configs"][n].get("sweep") for n in names):
        for n in names:
            sw = results["configs"][n].get("sweep", [])
            b.plot([s["rate"] for s in sw], [s["p99_ms"] for s in sw], marker="o", label=n)
        b.set_xlabel("offered QPS (open loop)")
        b.set_title("P99 vs offered load")
    else:  # headlines only: every run's P99 (by round with --rounds), so the spread shows beside the medians
        for n in names:
            runs = results["configs"][n]["headline"]["runs"]
            b.plot(range(1, len(runs) + 1), [r["p99_ms"] for r in runs], marker="o", label=n)
        b.set_xlabel("round" if results.get("rounds") else "run")
        b.set_title(f"P99 of each run at {results['rate']:.0f} QPS")
    b.axhline(results["slo_p99_ms"], color="red", ls="--")
    b.set_ylabel("P99 ms")
    b.set_yscale("log")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="livetower bench slo", description=__doc__)
    p.add_argument("--catalog", type=Path, required=True, help="a dir made by `livetower bench catalog`")
    p.add_argument("--configs", default="baseline,optimised")
    p.add_argument("--headline-only", default="", help="configs (ablations) measured at --rate only: no sweep")
    p.add_argument("--rate", type=float, default=500.0, help="headline rate")
    p.add_argument("--runs", type=int, default=3, help="headline repetitions (median reported)")
    p.add_argument("--rounds", type=int, default=0,
                   help="headlines only, interleaved: this many rounds of every config once (order rotated), "
                        "instead of --runs per config, the sweep and the overload (0: off)")
    p.add_argument("--sweep", default="100,200,300,400,500,600,800,1000,1200,1500,2000",
                   help="ascending rates for the capacity search")
    p.add_argument("--duration-s", type=float, default=20.0)
    p.add_argument("--warmup-s", type=float, default=5.0)
    p.add_argument("--slo-p99-ms", type=float, default=10.0)
    p.add_argument("--error-budget", type=float, default=0.001)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--mix", default=None, help="request kinds and weights (default recommend=1.0)")
    p.add_argument("--optimised-flags", default="", help="extra `serve` flags for the optimised server")
    p.add_argument("--skip-overload", action="store_true")
    p.add_argument("--with-trainer", action="store_true",
                   help="each run serves a copy of the catalogue while `livetower train` trains on it beside the "
                        "server, on the events the load logs (use a --mix with log=..., default then "
                        "recommend=0.95,log=0.05)")
    p.add_argument("--trainer-backlog", type=int, default=50_000,
                   help="with --with-trainer: events added to the copy's log first, so the trainer never idles")
    p.add_argument("--trainer-flags", default="--max-round-events 5000", help="extra `train` flags with --with-trainer (e.g. "
                                                      "'--trainer-nice 0 --trainer-cpu-weight 0': no lower priority)")
    p.add_argument("--keep-work", action="store_true",
                   help="with --with-trainer: keep each run's copy of the catalogue (OUT/work, about 1 GB at 100k "
                        "items) instead of removing it after the run; the logs and results stay either way")
    p.add_argument("--stall", default="", metavar="EVERY_S,MS",
                   help="the unfriendly case of a host that pauses: stop the server process for MS milliseconds "
                        "every EVERY_S seconds during the load (SIGSTOP/SIGCONT; warm-up included), e.g. 2,50")
    p.add_argument("--out", type=Path, default=Path("bench-results/slo"))
    args = p.parse_args(argv)
    try:
        args.stall = parse_stall(args.stall) if args.stall else None
    except ValueError as e:
        p.error(f"--stall: {e}")
    args.sweep = [float(x) for x in args.sweep.split(",") if x.strip()]  # "": headline only
    args.headline_only = {x for x in args.headline_only.split(",") if x}
    for name in args.configs.split(","):
        if name not in CONFIGS:
            p.error(f"--configs: unknown configuration {name!r}; known: {', '.join(CONFIGS)}")
        if "trainer_flags" in CONFIGS[name] and not args.with_trainer:
            p.error(f"--configs: {name} sets the trainer's flags: it needs --with-trainer")
    args.mix = args.mix or ("recommend=0.95,log=0.05" if args.with_trainer else "recommend=1.0")
    args.server_flags = {"optimised": args.optimised_flags.split()}
    catalog = json.loads((args.catalog / "catalog.json").read_text())
    base = LoadConfig(duration_s=args.duration_s, warmup_s=args.warmup_s, items=catalog["items"], k=args.k,
                      mix=parse_mix(args.mix), progress=False)
    args.out.mkdir(parents=True, exist_ok=True)
    ann = next(iter(sorted((args.catalog / "registry" / "engines").glob("*/ann.json"))), None)
    results = {"catalog": str(args.catalog), "items": catalog["items"], "rate": args.rate,
               "ann": json.loads(ann.read_text()) if ann else None,
               "slo_p99_ms": args.slo_p99_ms, "error_budget": args.error_budget, "load": base.to_json(),
               "cpus": os.cpu_count(), "calibration": calibrate(args.catalog, args.out), "configs": {}}
    if args.rounds:
        results["rounds"] = args.rounds
        results["configs"] = interleaved(args.configs.split(","), args.catalog, args, base, args.out)
    for name in args.configs.split(",") if not args.rounds else ():
        results["configs"][name] = bench_config(name, args.catalog, args, base, args.out)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    if {"baseline", "optimised"} <= set(results["configs"]):
        b, o = results["configs"]["baseline"], results["configs"]["optimised"]
        results["ratio"] = {"p99_at_rate_baseline_over_optimised": b["headline"]["median_p99_ms"]
                            / o["headline"]["median_p99_ms"]}
        if "capacity_qps" in b and "capacity_qps" in o:  # a --headline-only config has no capacity search
            results["ratio"]["capacity_optimised_over_baseline"] = o["capacity_qps"] / max(b["capacity_qps"], 1)
    if {"ray-serve", "optimised"} <= set(results["configs"]):
        r, o = results["configs"]["ray-serve"], results["configs"]["optimised"]
        results.setdefault("ratio", {})["p99_at_rate_ray_serve_over_optimised"] = (
            r["headline"]["median_p99_ms"] / o["headline"]["median_p99_ms"])
        if r.get("capacity_qps") and "capacity_qps" in o:  # 0: the peer failed the lowest rate of the sweep
            results["ratio"]["capacity_optimised_over_ray_serve"] = o["capacity_qps"] / r["capacity_qps"]
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "results.png")
    print(json.dumps({n: {"median_p99_ms@rate": c["headline"]["median_p99_ms"], "capacity_qps": c.get("capacity_qps"),
                          "overload": {k: c["overload"][k] for k in ("rate", "median_shed_fraction",
                                                                     "median_p99_ok_ms", "median_p99_ms")}
                          if "overload" in c
                          else None} for n, c in results["configs"].items()}, indent=1))
    print(f"wrote {args.out}/results.json and results.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
