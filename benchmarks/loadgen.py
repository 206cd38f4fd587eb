"""`livetower bench load`: open-loop gRPC load generator for the Recommender service.

Requests are scheduled at a fixed rate (fixed or Poisson gaps) and each is fired as its own task at its
scheduled time, never waiting for earlier ones; its latency runs from the *scheduled* send time to completion,
so client lag and server queueing show up in the figures (no coordinated omission). Requests scheduled during
the warm-up are sent but left out of the figures. ``--procs`` spawned worker processes (own asyncio loop, uvloop
when importable, ``--channels`` grpc.aio channels each) share the rate, each with its own seeded schedule, and
send HdrHistograms back to the parent, which merges them.

A request that would push the in-flight count over ``--max-inflight`` is not sent: it is counted as
error ``CLIENT_OVERLOAD`` (no latency recorded). Errors are counted by gRPC status code name.

Writes ``results.json`` and ``results.png`` into ``--out`` (default ``bench-results/load/<timestamp>``).
Exit code 1 when ``--slo-p99-ms`` / ``--error-budget`` is broken, 0 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing as mp
import queue as queue_mod
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from benchmarks import report
from benchmarks.loadgen_worker import worker_entry
from benchmarks.workload import ARRIVALS, KINDS, parse_mix, parse_range
from contracts.config_flags import Flag, FlagSet, flag_set
from contracts.config_flags import config_from_args as flags_to_config
from contracts.tls import ClientTls


def _doc(text: str, **kw):
    return field(metadata={"doc": text}, **kw)


@dataclass(kw_only=True, frozen=True, slots=True)
class LoadConfig:
    """One load run. Each field's ``metadata["doc"]`` is also its ``--flag`` help."""
    target: str = _doc("server address host:port", default="localhost:50051")
    rate: float = _doc("offered load, requests per second (all workers together)", default=200.0)
    duration_s: float = _doc("measured window, seconds", default=30.0)
    warmup_s: float = _doc("seconds of load sent before the measured window, left out of the figures",
                           default=5.0)
    arrival: str = _doc("gaps between sends: fixed (1/rate) or poisson (exponential, mean 1/rate)",
                        default="fixed")
    procs: int = _doc("worker processes (spawned), each sending rate/procs", default=1)
    channels: int = _doc("grpc.aio channels (TCP connections) per worker, used round-robin", default=1)
    max_inflight: int = _doc("in-flight cap (all workers together, split evenly); a request over it is not "
                             "sent and counts as CLIENT_OVERLOAD", default=10_000)
    deadline_ms: float = _doc("per-request gRPC deadline, ms", default=1000.0)
    users: int = _doc("size of the Zipf user population (ids user-0 .. user-{N-1}, user-0 hottest)",
                      default=100_000)
    zipf_s: float = _doc("Zipf exponent of user popularity (0 = uniform)", default=1.1)
    items: int = _doc("catalogue size: items are <item-prefix>0 .. <item-prefix>{N-1}", default=100_000)
    item_prefix: str = _doc("item id prefix", default="item-")
    history_len: int = _doc("items in each user's (deterministic) history", default=50)
    k: int = _doc("Recommend k", default=100)
    exclude_seen: bool = _doc("Recommend exclude_seen", default=False)
    score_candidates: tuple[int, int] = _doc("Score candidates per request, uniform in [lo, hi]",
                                             default=(100, 1000))
    mix: tuple[tuple[str, float], ...] = _doc("request kinds and weights",
                                              default=(("recommend", 0.9), ("score", 0.1)))
    seed: int = _doc("seed of schedules, users, histories and candidates", default=0)
    label: str = _doc("name of the run in the JSON", default="load")
    out: Path | None = _doc("directory for results.json + results.png (None: write nothing)", default=None)
    slo_p99_ms: float | None = _doc("SLO: P99 of successful requests must be <= this, ms", default=None)
    error_budget: float | None = _doc("SLO: error rate must be <= this (default 0.001 when --slo-p99-ms "
                                      "is given)", default=None)
    progress: bool = _doc("print a progress line about once a second", default=True)
    use_uvloop: bool = _doc("use uvloop in the workers when importable", default=True)
    connect_timeout_s: float = _doc("seconds a worker waits for its channels to connect", default=10.0)
    metadata: tuple[tuple[str, str], ...] = _doc("gRPC metadata sent with every request (e.g. Ray Serve's "
                                                 "application name)", default=())
    healthy_only: bool = _doc("send only to servers whose gRPC health service reports the Recommender SERVING "
                              "(client-side health checking: skips replicas still loading or draining)",
                              default=False)
    tls: ClientTls | None = _doc("TLS to the server (contracts/tls.py ClientTls); None: plaintext", default=None)

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"LoadConfig.{name}: {why}, got {getattr(self, name)!r}")

        if not isinstance(self.target, str) or ":" not in self.target:
            bad("target", "must be host:port")
        for name in ("rate", "duration_s", "deadline_ms", "connect_timeout_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                bad(name, "must be a finite number > 0")
        if not isinstance(self.warmup_s, (int, float)) or not math.isfinite(self.warmup_s) or self.warmup_s < 0:
            bad("warmup_s", "must be a finite number >= 0")
        if self.arrival not in ARRIVALS:
            bad("arrival", f"must be one of {ARRIVALS}")
        for name in ("procs", "channels", "max_inflight", "users", "items", "history_len", "k"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "must be an integer >= 1")
        if not (1 <= self.k <= 1000):
            bad("k", "must be in 1..1000 (the server's limit)")
        if not isinstance(self.zipf_s, (int, float)) or not math.isfinite(self.zipf_s) or self.zipf_s < 0:
            bad("zipf_s", "must be a finite number >= 0")
        sc = self.score_candidates
        if (not isinstance(sc, tuple) or len(sc) != 2 or not all(isinstance(x, int) for x in sc)
                or not (1 <= sc[0] <= sc[1] <= 10_000)):
            bad("score_candidates", "must be (lo, hi) with 1 <= lo <= hi <= 10000")
        if not isinstance(self.mix, tuple) or not self.mix:
            bad("mix", "must be a non-empty tuple of (kind, weight)")
        for entry in self.mix:
            if not (isinstance(entry, tuple) and len(entry) == 2):
                bad("mix", "entries must be (kind, weight)")
            name, w = entry
            if name not in KINDS:
                bad("mix", f"unknown kind {name!r} (known: {sorted(KINDS)})")
            if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                bad("mix", f"weight of {name!r} must be a finite number >= 0")
        if sum(w for _, w in self.mix) <= 0:
            bad("mix", "weights must not all be 0")
        if self.slo_p99_ms is not None and not self.slo_p99_ms > 0:
            bad("slo_p99_ms", "must be > 0")
        if self.error_budget is not None and not (0 <= self.error_budget <= 1):
            bad("error_budget", "must be in [0, 1]")
        if not all(isinstance(m, tuple) and len(m) == 2 and m[0] == m[0].lower() for m in self.metadata):
            bad("metadata", "must be (key, value) pairs with lower-case keys")
        if self.rate / self.procs > 1e6:
            bad("rate", "per-worker rate over 1e6/s")

    def effective_error_budget(self) -> float | None:
        if self.error_budget is None and self.slo_p99_ms is not None:
            return 0.001
        return self.error_budget

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["out"] = None if self.out is None else str(self.out)
        d["score_candidates"] = list(self.score_candidates)
        d["mix"] = dict(self.mix)
        d["metadata"] = dict(self.metadata)
        return d


# ---------------------------------------------------------------- parent side

def run_load(config: LoadConfig, *, log: Callable[[str], None] = print,
             windows: Callable[[float], dict[str, list[tuple[int, int]]]] | None = None) -> dict:
    """Run one load test and return the results dict (also written to ``config.out`` when set).

    The dict has ``slo`` = {"p99_ms", "error_budget", "violations", "passed"} and ``measured_start_unix``
    (wall time of second 0 of the measured window). ``windows``: called after the run with
    measured_start_unix, returns name -> [(first_second, end_second), ...] (by completion time); each
    gets ``results["windows"][name]`` = latency summary over those seconds, merged.
    """
    if not isinstance(config, LoadConfig):
        raise TypeError(f"config must be a LoadConfig, got {type(config).__name__}")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start_event = ctx.Event()
    start_value = ctx.Value("d", 0.0)
    procs = [ctx.Process(target=worker_entry, args=(config, i, q, start_event, start_value), daemon=True,
                         name=f"loadgen-{i}") for i in range(config.procs)]
    for p in procs:
        p.start()
    exports: dict[int, dict] = {}
    try:
        ready = set()
        t_wait = time.monotonic() + config.connect_timeout_s * max(1, config.channels) + 60.0
        while len(ready) < config.procs:
            kind, idx, payload = _get(q, procs, t_wait, "workers to connect")
            if kind == "ready":
                ready.add(idx)
        started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        start_value.value = time.time() + 0.3
        start_event.set()
        if config.progress:
            log(f"load: {config.rate:g} QPS {config.arrival} to {config.target} for {config.warmup_s:g}+"
                f"{config.duration_s:g} s, {config.procs} worker(s) x {config.channels} channel(s)")
        latest: dict[int, dict] = {}
        pending = report.new_hist()
        last_print = time.monotonic()
        t_end = time.monotonic() + config.warmup_s + config.duration_s + config.deadline_ms / 1e3 + 60.0
        while len(exports) < config.procs:
            kind, idx, payload = _get(q, procs, t_end, "workers to finish", done=exports)
            if kind == "progress":
                latest[idx] = payload
                if payload["interval"]:
                    pending.decode_and_add(payload["interval"])
                if len(latest) == config.procs and time.monotonic() - last_print >= 0.9:
                    last_print = time.monotonic()
                    log(_progress_line(config, latest, pending))
                    pending = report.new_hist()
            elif kind == "done":
                exports[idx] = payload
    finally:
        start_event.set()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    merged = report.merge([exports[i] for i in sorted(exports)])
    results = report.build_results(merged, config=config.to_json(), label=config.label, started_at=started_at,
                                   duration_s=config.duration_s, warmup_s=config.warmup_s)
    results["measured_start_unix"] = start_value.value + config.warmup_s
    # What the load itself costs the host it runs on (a server on the same cores competes with it): the workers'
    # CPU from the start signal to their last answer, per request sent (warm-up included, as in the CPU time).
    cpu_s, sent = sum(e["cpu_s"] for e in exports.values()), sum(e["sent_total"] for e in exports.values())
    results["client_cpu"] = {"seconds": cpu_s, "ms_per_request": cpu_s / sent * 1e3 if sent else None}
    if windows is not None:
        results["windows"] = {name: report.seconds_summary(merged, spans)
                              for name, spans in windows(results["measured_start_unix"]).items()}
    budget = config.effective_error_budget()
    violations = report.slo_violations(results, p99_ms=config.slo_p99_ms, error_budget=budget)
    results["slo"] = {"p99_ms": config.slo_p99_ms, "error_budget": budget, "violations": violations,
                      "passed": not violations}
    if config.out is not None:
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        report.plot(results, out / "results.png")
    return results


def _get(q, procs, t_limit: float, what: str, done: dict | None = None):
    while True:
        try:
            msg = q.get(timeout=0.5)
        except queue_mod.Empty:
            msg = None
        if msg is not None:
            if msg[0] == "error":
                raise RuntimeError(f"load worker {msg[1]} failed:\n{msg[2]}")
            return msg
        for i, p in enumerate(procs):
            if not p.is_alive() and (done is None or i not in done):
                try:  # its last message may still be in the pipe
                    return q.get(timeout=1.0)
                except queue_mod.Empty:
                    raise RuntimeError(f"load worker {i} exited (code {p.exitcode}) while waiting for {what}")
        if time.monotonic() > t_limit:
            raise TimeoutError(f"timed out waiting for {what}")


def _progress_line(cfg: LoadConfig, latest: dict, pending) -> str:
    t = max(v["t"] for v in latest.values()) - cfg.warmup_s
    tag = "warmup" if t < 0 else ("drain" if t > cfg.duration_s else "")
    s = lambda key: sum(v[key] for v in latest.values())  # noqa: E731
    p99 = f"{pending.get_value_at_percentile(99) / 1e3:8.2f}" if pending.get_total_count() else f"{'-':>8}"
    return (f"[{t:7.1f}s {tag:>6}] sent {s('sent'):>8} ok {s('ok'):>8} errors {s('errors'):>6} "
            f"inflight {s('inflight'):>5}  p99(last s) {p99} ms")


# ---------------------------------------------------------------- CLI

def parse_metadata(text: str) -> tuple[tuple[str, str], ...]:
    """`key=value,key=value` -> (("key", "value"), ...)."""
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    if any(len(p) != 2 or not p[0].strip() for p in pairs):
        raise argparse.ArgumentTypeError(f"metadata must be key=value,... got {text!r}")
    return tuple((k.strip().lower(), v.strip()) for k, v in pairs)


def _flags() -> FlagSet:
    """Every LoadConfig field but `out` (the CLI's default is a new timestamped directory, not None)."""
    return flag_set(
        LoadConfig, "target", "rate", "duration_s", "warmup_s", Flag("arrival", choices=ARRIVALS), "procs",
        "channels", "max_inflight", "deadline_ms", "users", "zipf_s", "items", "item_prefix", "history_len", "k",
        "exclude_seen", Flag("score_candidates", parse=parse_range, note="LO:HI"),
        Flag("mix", parse=parse_mix, note=f"kind=weight,... with kinds {sorted(KINDS)}"), "seed", "label",
        "slo_p99_ms", "error_budget", Flag("progress", name="quiet", negate=True), Flag("use_uvloop", name="uvloop"),
        "connect_timeout_s", "healthy_only", Flag("metadata", parse=parse_metadata, note="key=value,..."),
        Flag("tls", parse=parse_tls, note="ca=FILE[,cert=FILE,key=FILE,server_name=NAME]"))


def parse_tls(text: str) -> ClientTls:
    """`ca=FILE[,cert=FILE,key=FILE,server_name=NAME]` -> ClientTls (a field name may also be given in full)."""
    short = {"ca": "ca_file", "cert": "cert_file", "key": "key_file"}
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    if any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"tls must be ca=FILE[,cert=FILE,key=FILE,server_name=NAME], got {text!r}")
    kwargs = {short.get(k.strip(), k.strip()): v.strip() for k, v in pairs}
    try:
        return ClientTls(**{k: v if k == "server_name" else Path(v) for k, v in kwargs.items()})
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"tls {text!r}: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="livetower bench load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _flags().add_to(p)
    p.add_argument("--out", type=Path, default=None,
                   help="directory for results.json + results.png (default: bench-results/load/<timestamp>)")
    return p


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    out = args.out or Path("bench-results/load") / datetime.now().strftime("%Y%m%d-%H%M%S")
    return flags_to_config(_flags(), args, out=out)


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        p.error(str(e))
    results = run_load(cfg)
    print(report.format_table(results))
    print(f"wrote {cfg.out}/results.json and results.png")
    if results["slo"]["violations"]:
        for v in results["slo"]["violations"]:
            print(f"SLO FAILED: {v}", file=sys.stderr)
        return 1
    if cfg.slo_p99_ms is not None or cfg.error_budget is not None:
        print("SLO passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
