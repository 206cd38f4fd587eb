"""`livetower bench swap`: engine swaps under steady open-loop load.

1. prepare (once per --source dir): synthetic events trained in three rounds -> engine 1 (compiled
   AOTInductor), 2 and 3 (refits of 1's graph: weights only). Their files are copied into the served
   registry's staging area before the load starts; at each event only registry.publish runs (hash,
   fsync, rename), as when a trainer publishes an engine it has built.
2. timeline under --rate QPS (a `livetower serve` process, the load generator in its own processes):
   steady -> publish 2 (auto: canary, analysis, promote) -> publish 3 (auto) -> manual mode:
   publish 2's weights again as 4, operator canary -> operator rollback.
   Swap windows = [event - 1 s, event + 2 s) around each load/canary/promote/rollback; steady = the rest.
3. cycles: --cycles operator canary+promote cycles alternating two engines, server RSS after each.
4. load times in this process: full load (engine 1) vs refit (engine 2), median of 5.
Writes results.json and results.png into --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import threading
import time
from pathlib import Path

from benchmarks.loadgen import LoadConfig, run_load
from benchmarks.processes import free_port, start_server, stop_server
from contracts.client import Client
from contracts.eventlog import SqliteEventLog
from contracts.registry import MANIFEST, Registry, manifest_from_json
from proto import livetower_v1_pb2 as pb

TOKEN = "swap-benchmark-admin-token"
# How often the timeline asks the server for its rollout state (GetRollout) while it waits for a canary or a
# decision: the times it reports are this coarse. At 50 Hz the benchmark's own admin calls (each builds a
# rollout response with up to 500 history events) ran beside the live load through every canary.
POLL_S = 0.1


def prepare(src: Path, *, users: int, items: int, events_per_user: int, epochs: int) -> list[int]:
    from trainer.config import TrainConfig
    from trainer.data.synthetic import SyntheticConfig, generate
    from trainer.loop import Trainer

    reg = Registry(src / "registry")
    if len(reg.versions()) >= 3:
        return reg.versions()[:3]
    log = SqliteEventLog(src / "events.sqlite")
    if log.count() == 0:
        log.append_all(generate(SyntheticConfig(n_users=users, n_items=items, events_per_user=events_per_user)))
    # Round 1 trains on all but a small tail, so its item table already has the final size; rounds 2
    # and 3 train on the tail and keep the architecture: they publish refits of engine 1.
    tail = min(1000, log.count() // 10)
    while len(reg.versions()) < 3:
        first = not reg.versions()
        cfg = TrainConfig(epochs_per_round=epochs, max_round_events=log.count() - 2 * tail if first else tail,
                          inductor_cache_dir=src / "inductor-cache")
        trainer = Trainer(cfg, log, reg, src / "trainer")
        result = trainer.run_round()
        if result is None:
            raise RuntimeError("the event log ran out before three engines were published")
        if not result.published_version:
            trainer.publish(result.metrics, "skipped")  # the swap benchmark needs the versions, not the gate
        m = reg.read_manifest(reg.latest())
        print(f"prepared engine {m.version} ({'refit of %d' % m.graph_version if m.graph_version else 'compiled'}, "
              f"{m.build_seconds:.1f}s)", flush=True)
    return reg.versions()[:3]


def stage(src: Registry, version: int, dst: Registry) -> tuple[Path, pb.EngineManifest]:
    """Copy src's `version` into a staging dir of dst (what a trainer writes while it builds)."""
    staging = dst.staging_dir()
    shutil.copytree(src.engine_dir(version), staging, dirs_exist_ok=True)
    manifest = manifest_from_json((staging / MANIFEST).read_text())
    (staging / MANIFEST).unlink()
    return staging, manifest


def copy_in(src: Registry, version: int, dst: Registry) -> int:
    """Publish a copy of src's `version` into dst; returns the new version number there."""
    return dst.publish(*stage(src, version, dst))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait(pred, timeout_s: float, what: str, interval_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := pred():
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


class Timeline:
    """The scripted swaps, run on a thread while the load runs; records (unix time, label)."""

    def __init__(self, admin: Client, src: Registry, dst: Registry, versions: list[int], at_s: list[float]):
        self.admin, self.src, self.dst, self.versions, self.at_s = admin, src, dst, versions, at_s
        self.events: list[tuple[float, str]] = []
        self.figures: dict[str, float] = {}
        self.error: BaseException | None = None
        # Staged before the load starts, as a trainer writes an engine while it builds it: at each event only
        # the publish itself (hash, fsync, rename) runs. Copying ~10 MB in this process at the event put
        # the benchmark's own work into the swap windows, on the same two cores.
        self._staged = [stage(src, v, dst) for v in (versions[1], versions[2], versions[1])]

    def _publish_next(self) -> int:
        return self.dst.publish(*self._staged.pop(0))

    def mark(self, label: str) -> float:
        t = time.time()
        self.events.append((t, label))
        print(f"  {label}", flush=True)
        return t

    def _auto_swap(self, name: str) -> None:
        v = self._publish_next()
        t_pub = self.mark(f"publish v{v}")
        wait(lambda: self.admin.rollout().canary_version == v, 60, f"canary of {v}", POLL_S)
        t_can = self.mark(f"canary v{v}")
        ro = wait(lambda: (r := self.admin.rollout()).canary_version != v and r, 120, f"decision on {v}", POLL_S)
        t_dec = self.mark(f"{'promote' if ro.stable_version == v else 'rollback'} v{v} (auto)")
        self.figures[f"{name}_publish_to_canary_s"] = t_can - t_pub
        self.figures[f"{name}_canary_to_decision_s"] = t_dec - t_can
        self.figures[f"{name}_promoted"] = float(ro.stable_version == v)

    def run(self, t0: float) -> None:
        try:
            time.sleep(max(0.0, t0 + self.at_s[0] - time.time()))
            self._auto_swap("swap1")
            time.sleep(max(0.0, t0 + self.at_s[1] - time.time()))
            self._auto_swap("swap2")
            time.sleep(max(0.0, t0 + self.at_s[2] - time.time()))
            self.admin.set_policy(pb.CanaryPolicy(mode="manual"))
            v = self._publish_next()
            self.mark(f"publish v{v} (manual mode)")
            t = time.time()
            self.admin.start_canary(v, 0.2)
            self.figures["operator_canary_call_s"] = time.time() - t
            self.mark(f"canary v{v} (operator)")
            time.sleep(5.0)
            self.admin.rollback("benchmark: operator rollback")
            self.mark(f"rollback v{v} (operator)")
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self.error = e


def spans_around(events: list[tuple[float, str]], start_unix: float, before: int = 1, after: int = 2):
    return [(int(t - start_unix) - before, int(t - start_unix) + after) for t, _ in events]


def canary_phases(events: list[tuple[float, str]], start_unix: float) -> list[tuple[int, int]]:
    """Seconds from each canary start to its promote/rollback (the shadow comparison runs then)."""
    spans, opened = [], None
    for t, label in events:
        if label.startswith("canary"):
            opened = int(t - start_unix)
        elif opened is not None and label.split()[0] in ("promote", "rollback"):
            spans.append((opened, int(t - start_unix) + 1))
            opened = None
    return spans


def run_cycles(admin: Client, pid: int, a: int, b: int, cycles: int) -> list[dict]:
    """Operator canary + promote, alternating engines a and b (served registry's numbers)."""
    out = []
    stable = admin.rollout().stable_version
    for i in range(1, cycles + 1):
        v = b if stable == a else a
        t = time.perf_counter()
        admin.start_canary(v, 0.5)
        stable = admin.promote(f"cycle {i}").stable_version
        out.append({"cycle": i, "seconds": time.perf_counter() - t, "rss_mb": rss_mb(pid)})
        if i % 20 == 0 or i == 10:
            print(f"  cycle {i}/{cycles}: RSS {out[-1]['rss_mb']:.1f} MB", flush=True)
    return out


def load_times(src: Registry, full: int, refit: int, scratch: Path, repeats: int = 5) -> dict:
    """Server-side load (verify, load, parity, warm-up) of a newly compiled engine vs a refit one,
    each published afresh into a scratch registry so no compiled graph is reused by accident; the
    refit's graph (a copy of `full` as version 1) is already open, as it is in a server serving it."""
    from server.engine.manager import EngineManager, EngineManagerConfig

    shutil.rmtree(scratch, ignore_errors=True)
    reg = Registry(scratch)
    mgr = EngineManager(reg, EngineManagerConfig())
    mgr.load_verified(copy_in(src, full, reg))  # version 1: the graph the refits run
    times = {"full": [], "refit": []}
    for _ in range(repeats):
        for name, v in (("full", full), ("refit", refit)):
            version = copy_in(src, v, reg)
            t = time.perf_counter()
            mgr.load_verified(version)
            times[name].append(time.perf_counter() - t)
    shutil.rmtree(scratch, ignore_errors=True)
    return {f"{k}_load_s_median": statistics.median(v) for k, v in times.items()} | {"samples": times}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    ts = [t for t in results["load"]["timeseries"] if t["p99_ms"] is not None]
    a.plot([t["t_s"] + 0.5 for t in ts], [t["p50_ms"] for t in ts], ".-", label="P50")
    a.plot([t["t_s"] + 0.5 for t in ts], [t["p99_ms"] for t in ts], ".-", label="P99")
    for t, label in results["events"]:
        x = t - results["load"]["measured_start_unix"]
        a.axvline(x, color="tab:red", alpha=0.4)
        a.text(x, 0.98, label, transform=a.get_xaxis_transform(), rotation=90, fontsize=7, va="top")
    a.set_yscale("log")
    a.set_xlabel("seconds since measured start")
    a.set_ylabel("latency from scheduled send, ms")
    a.set_title(f"{results['config']['rate']:g} QPS through swaps (red: events)")
    a.legend(fontsize=8)
    cyc = results["cycles"]
    if cyc:
        b.plot([c["cycle"] for c in cyc], [c["rss_mb"] for c in cyc], ".-")
    b.set_xlabel("canary + promote cycle")
    b.set_ylabel("server RSS, MB")
    b.set_title("memory over swap cycles")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="livetower bench swap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, default=Path("bench-results/swap-source"), help="prepared engines")
    p.add_argument("--out", type=Path, default=Path("bench-results/swap"))
    p.add_argument("--users", type=int, default=3000)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--events-per-user", type=int, default=30)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--rate", type=float, default=200.0, help="offered Recommend QPS")
    p.add_argument("--steady-s", type=float, default=10.0, help="steady load before the first swap")
    p.add_argument("--gap-s", type=float, default=15.0, help="time between the timeline's steps")
    p.add_argument("--cycles", type=int, default=200, help="canary+promote cycles for the memory check")
    p.add_argument("--policy", default="min_duration_s=3,shadow_samples=100,min_requests=200",
                   help="auto policy fields for the run, FIELD=VALUE,...")
    p.add_argument("--prepare-only", action="store_true", help="build the source engines and stop")
    p.add_argument("--server-flags", default="", help="extra `livetower serve` flags (ablations, e.g. --no-gc-freeze)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"preparing engines in {args.source} …", flush=True)
    versions = prepare(args.source, users=args.users, items=args.items, events_per_user=args.events_per_user,
                       epochs=args.epochs)
    if args.prepare_only:
        return 0
    src = Registry(args.source / "registry")
    manifests = {v: src.read_manifest(v) for v in versions}
    data = args.out / "data"
    shutil.rmtree(data, ignore_errors=True)
    dst = Registry(data / "registry")
    copy_in(src, versions[0], dst)
    token_file = data / "admin.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)  # the server refuses a token file others may read
    admin_port = free_port()
    proc, port = start_server(data, ["--threads", "1", *args.server_flags.split()], args.out / "server.log",
                              admin_port=admin_port)
    admin = Client(f"127.0.0.1:{port}", admin_target=f"127.0.0.1:{admin_port}", admin_token=TOKEN, timeout_s=30)
    try:
        fields = dict(kv.split("=", 1) for kv in args.policy.split(",") if kv)
        policy = pb.CanaryPolicy(mode="auto")
        for k, v in fields.items():
            setattr(policy, k, type(getattr(policy, k))(v))
        admin.set_policy(policy)
        at = [args.steady_s, args.steady_s + args.gap_s, args.steady_s + 2 * args.gap_s]
        duration = at[-1] + args.gap_s
        timeline = Timeline(admin, src, dst, versions, at)
        cfg = LoadConfig(target=f"127.0.0.1:{port}", rate=args.rate, duration_s=duration, warmup_s=3.0,
                         users=args.users, items=args.items, k=100, mix=(("recommend", 1.0),), label="swap",
                         progress=False)
        box: dict = {}
        t0 = time.time() + 3.3 + 1.0  # the load generator starts ~0.3 s after its workers connect
        th = threading.Thread(target=timeline.run, args=(t0,), daemon=True)
        th.start()
        box["load"] = run_load(cfg, log=print, windows=lambda start: {
            "swap": spans_around(timeline.events, start),
            "steady": _complement(spans_around(timeline.events, start), int(duration)),
            "before_first_event": [(0, int(timeline.events[0][0] - start) - 1)] if timeline.events else [],
            "canary_phases": canary_phases(timeline.events, start)})
        th.join(60)
        if timeline.error is not None:
            raise timeline.error
        print(f"cycles: {args.cycles} operator canary+promote cycles …", flush=True)
        admin.set_policy(pb.CanaryPolicy(mode="manual"))
        cycles = run_cycles(admin, proc.pid, 2, 3, args.cycles)  # the served registry's copies of 2 and 3
    finally:
        admin.close()
        stop_server(proc)
    load = box["load"]
    w = load["windows"]
    results = {
        "config": vars(args) | {"source": str(args.source), "out": str(args.out)},
        "events": timeline.events,
        "figures": timeline.figures,
        "requests": load["requests"], "errors": load["errors"],
        "p99_ms": {"steady": w["steady"]["p99"], "swap_windows": w["swap"]["p99"],
                   "ratio": w["swap"]["p99"] / w["steady"]["p99"] if w["steady"]["p99"] else None,
                   "before_first_event": w["before_first_event"]["p99"], "canary_phases": w["canary_phases"]["p99"]},
        "windows": w,
        "rss_mb": {"after_10": cycles[9]["rss_mb"] if len(cycles) >= 10 else None,
                   "after_last": cycles[-1]["rss_mb"] if cycles else None, "cycles": len(cycles)},
        "cycle_seconds_median": statistics.median(c["seconds"] for c in cycles) if cycles else None,
        "build_seconds": {"full_compile": manifests[versions[0]].build_seconds,
                          "refit": [manifests[v].build_seconds for v in versions[1:]]},
        "load_times": load_times(src, versions[0], versions[1], args.out / "scratch"),
        "cycles": cycles,
        "load": load,
    }
    results["load"].pop("percentile_curve", None)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    plot(results, args.out / "results.png")
    print(json.dumps({k: results[k] for k in ("figures", "errors", "p99_ms", "rss_mb", "cycle_seconds_median",
                                             "build_seconds")} | {"load_times": {
                          k: v for k, v in results["load_times"].items() if k != "samples"}}, indent=1))
    return 0


def _complement(spans: list[tuple[int, int]], duration: int) -> list[tuple[int, int]]:
    busy = {s for a, b in spans for s in range(a, b)}
    return [(s, s + 1) for s in range(duration) if s not in busy]
