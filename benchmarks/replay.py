"""`livetower bench replay`: the replay study. MovieLens-100k is streamed through a fresh embedded event log in
timestamp order at `--speedup` x real time while the sidecar Trainer (a thread of this process, the
real `Trainer.run` loop: rounds on backlog, eval gate, checkpoint) trains and publishes engines into a
Registry as events arrive. Every streamed event is then scored as a next-event query for
(i) continuous: the newest engine published before the event was appended, (ii) frozen: the first
published engine, (iii) popularity over the events streamed before it. Engines are the published
artifacts loaded with the server's `Engine` class (benchmarks/replay_eval.py has the exact protocol);
they are scored after the stream ends (an engine never changes once published, so the scores are the
ones it would have served, and scoring does not steal CPU from the trainer during the stream).
Writes results.json + results.png into --out and prints the table.

    livetower bench replay                           # full ml-100k, ~6 min of stream + ~1 min scoring
    livetower bench replay --quick                   # 20k events, tiny model, ~1 min
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks import replay_eval as ev
from contracts.config_flags import Flag, FlagSet, flag_set
from contracts.config_flags import config_from_args as flags_to_config
from trainer.config import TrainConfig
from trainer.loop import Trainer

DEFAULT_DATA = Path("../shared/data/ml-100k")
DEFAULT_OUT = Path("bench-results/replay")


@dataclass(kw_only=True, frozen=True, slots=True)
class ReplayConfig:
    dataset: str = "ml100k"         # "ml100k" (from `data`) or "synthetic" (trainer.data.synthetic, for tests)
    data: Path = DEFAULT_DATA       # the ml-100k directory (u.data)
    synthetic_users: int = 150      # dataset "synthetic": users (200 items, 20 events per user)
    out: Path = DEFAULT_OUT         # results.json, results.png; the log/registry/checkpoint under out/work
    speedup: float = 6e4            # stream seconds per wall second (ml-100k spans 215 days: 6e4 -> ~5 min)
    max_events: int = 0             # replay only the first N events (0 = all)
    warmup_events: int = 10_000     # the first N events are in the log before the clock starts; one round on
                                    # them (gate off) publishes engine 1, the frozen one; 0 = start cold
    eval_every: int = 5000          # events per reported window
    k: int = 10                     # top-k of the metrics
    threads: int = 1                # torch intra-op threads (training and scoring)
    tick_s: float = 0.05            # the streamer appends what is due at most this often (one transaction)
    progress_s: float = 15.0        # seconds between progress lines
    train: TrainConfig = field(default_factory=lambda: TrainConfig(  # the study's rounds: 2 epochs (TrainConfig: 10)
        backend="torch", round_min_events=1000, round_interval_s=10.0, poll_interval_s=0.5, epochs_per_round=2))

    def __post_init__(self) -> None:
        if self.dataset not in ("ml100k", "synthetic"):
            raise ValueError(f"ReplayConfig.dataset must be 'ml100k' or 'synthetic', got {self.dataset!r}")
        for name in ("speedup", "tick_s", "progress_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ReplayConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("eval_every", "k", "threads", "synthetic_users"):
            if getattr(self, name) < 1:
                raise ValueError(f"ReplayConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_events", "warmup_events"):
            if getattr(self, name) < 0:
                raise ValueError(f"ReplayConfig.{name} must be >= 0 (0 = all / none), got {getattr(self, name)}")


class _Recorder:
    """Shared between the streamer (main thread) and the trainer thread; plain attribute writes under the GIL."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.appended = 0       # events appended to the log so far
        self.stream_ms = 0      # event time of the newest appended event
        self.version = 0        # newest published engine
        self.publishes: list[dict] = []
        self.rounds: list[dict] = []


class _ReplayTrainer(Trainer):
    """The sidecar Trainer, recording when each round ran and each engine was published."""

    recorder: _Recorder

    def run_round(self):
        r = super().run_round()
        if r is not None:
            rec = self.recorder
            self.recorder.rounds.append({"wall_s": round(time.monotonic() - rec.t0, 2), "events": r.events,
                                         "seconds": round(r.seconds, 2), "gate": r.gate,
                                         "published_version": r.published_version,
                                         "model_recall@10": r.metrics.get("model_recall@10"),
                                         "popularity_recall@10": r.metrics.get("popularity_recall@10")})
        return r

    def publish(self, metrics: dict[str, float], gate: str) -> int:
        v = super().publish(metrics, gate)
        if v:
            rec = self.recorder
            rec.publishes.append({"version": v, "wall_s": round(time.monotonic() - rec.t0, 2),
                                  "appended": rec.appended, "t_stream_ms": rec.stream_ms,
                                  "trained_events": self.state.trained_events})
            rec.version = v  # from here on, appended events count as served by v
        return v


def load_events(cfg: ReplayConfig) -> list:
    if cfg.dataset == "synthetic":
        from trainer.data.synthetic import SyntheticConfig, generate

        events = list(generate(SyntheticConfig(n_users=cfg.synthetic_users, n_items=200, n_clusters=8,
                                               events_per_user=20, seed=3)))
    else:
        from trainer.data.movielens import load_ml100k

        events = load_ml100k(cfg.data)
    return events[:cfg.max_events] if cfg.max_events else events


def stream(cfg: ReplayConfig, events: list, first: int, log_db, rec: _Recorder, trainer: Trainer) -> np.ndarray:
    """Append events[first:] when their (sped-up) time comes; -> version_at[e], the engine serving when e
    arrived (0 for the warm-up events)."""
    ts = np.array([e.timestamp_ms for e in events], np.int64)
    due_s = (ts - ts[first]) / 1000.0 / cfg.speedup
    version_at = np.zeros(len(events), np.int64)
    start, i, last_progress = time.monotonic(), first, 0.0
    while i < len(events):
        now = time.monotonic() - start
        j = max(int(np.searchsorted(due_s, now, side="right")), i)
        if j > i:
            version_at[i:j] = rec.version  # read before the append: an engine published meanwhile is not credited
            log_db.append(events[i:j])
            rec.appended, rec.stream_ms, i = j, int(ts[j - 1]), j
        if now - last_progress >= cfg.progress_s:
            last_progress = now
            print(f"  {now:6.0f} s: {i}/{len(events)} events streamed "
                  f"(stream time {np.datetime64(int(ts[i - 1]) if i else int(ts[0]), 'ms').astype('datetime64[s]')}), "
                  f"{len(rec.rounds)} rounds, engine v{rec.version}, trainer backlog {trainer.backlog()}", flush=True)
        if i < len(events):
            time.sleep(min(max(due_s[i] - (time.monotonic() - start), cfg.tick_s), 1.0))
    return version_at


def evaluate(cfg: ReplayConfig, events: list, first: int, version_at: np.ndarray, registry) -> dict:
    from server.engine.engine import Engine

    users_of, seqs, pos = {}, [], np.zeros(len(events), np.int64)
    items_of: dict[str, int] = {}
    user_idx = np.zeros(len(events), np.int64)
    target_idx = np.zeros(len(events), np.int64)
    for e, event in enumerate(events):
        u = users_of.setdefault(event.user_id, len(users_of))
        if u == len(seqs):
            seqs.append([])
        user_idx[e], pos[e] = u, len(seqs[u])
        seqs[u].append(event.item_id)
        target_idx[e] = items_of.setdefault(event.item_id, len(items_of))
    seq_idx = [np.array([items_of[i] for i in s], np.int64) for s in seqs]
    targets = [event.item_id for event in events]
    n = len(events)
    results = {s: (np.zeros(n), np.zeros(n), np.zeros(n, bool)) for s in ev.SERIES}
    staleness = np.zeros(n)
    versions = sorted(int(v) for v in np.unique(version_at) if v > 0)
    offset_of = np.arange(1, n + 1)  # a fresh log: event e is at offset e + 1
    t0 = time.perf_counter()
    for v in versions:
        m = registry.read_manifest(v)
        graph_dir = registry.engine_dir(m.graph_version) if m.graph_version else None
        engine = Engine.load(registry.engine_dir(v), m, num_threads=cfg.threads, use_ann=False, graph_dir=graph_dir)
        jobs = [("continuous", np.flatnonzero(version_at == v))]
        if v == versions[0]:
            jobs.append(("frozen", np.flatnonzero(version_at > 0)))
        for name, idx in jobs:
            hit, gain, defined = results[name]
            hit[idx], gain[idx] = ev.score_engine(engine, user_idx, pos, seqs, targets, idx, cfg.k)
            defined[idx] = True
        staleness[version_at == v] = offset_of[version_at == v] - int(m.stream_offsets.get("sqlite", 1))
        print(f"  scored engine v{v} ({len(jobs[0][1])} events{', + frozen on all' if len(jobs) > 1 else ''}) "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    hit, gain, defined = results["popularity"]
    hit[:], gain[:] = ev.score_popularity(user_idx, pos, seq_idx, target_idx, len(items_of), cfg.k)
    defined[first:] = True  # popularity counts the warm-up events; only streamed events are scored
    print(f"  scored popularity {time.perf_counter() - t0:.0f} s", flush=True)
    ts = np.array([e.timestamp_ms for e in events], np.int64)
    rows = ev.windows(results, ts, version_at, staleness, cfg.eval_every, first=first)
    return {"windows": rows, "summary": ev.summary(results, version_at > 0), "scoring_seconds":
            round(time.perf_counter() - t0, 1)}


def run(cfg: ReplayConfig) -> dict:
    import torch

    from contracts.eventlog import SqliteEventLog
    from contracts.registry import Registry

    torch.set_num_threads(cfg.threads)
    events = load_events(cfg)
    if len(events) < 2:
        raise ValueError(f"{len(events)} events to replay: need at least 2 (check --max-events and --data)")
    work = Path(cfg.out) / "work"
    shutil.rmtree(work, ignore_errors=True)
    log_db, registry = SqliteEventLog(work / "events.sqlite"), Registry(work / "registry")
    first = min(cfg.warmup_events, len(events) - 1)
    span_s = (events[-1].timestamp_ms - events[first].timestamp_ms) / 1000
    print(f"replay: {len(events) - first} {cfg.dataset} events after {first} warm-up events, spanning "
          f"{span_s / 86400:.1f} days at x{cfg.speedup:g} -> {span_s / cfg.speedup:.0f} s of stream; trainer: backend "
          f"{cfg.train.backend}, {cfg.train.epochs_per_round} epochs/round, rounds at >= "
          f"{cfg.train.round_min_events} events or {cfg.train.round_interval_s:g} s", flush=True)
    rec = _Recorder()
    warmup = None
    if first:  # the bootstrap engine: one round over the warm-up events, published whatever the gate says
        log_db.append_all(events[:first])
        r = Trainer(cfg.train.replace(gate_min_ratio=0.0), log_db, registry, work / "trainer").run_round()
        if r is None or not r.published_version:
            raise RuntimeError("the warm-up round published no engine (build failed?): see the trainer log")
        warmup = {"events": r.events, "seconds": round(r.seconds, 2), "metrics": r.metrics}
        rec.publishes.append({"version": r.published_version, "wall_s": 0.0, "appended": first,
                              "t_stream_ms": events[first - 1].timestamp_ms, "trained_events": r.events,
                              "warmup": True})
        rec.version, rec.appended = r.published_version, first
        print(f"warm-up round: {r.events} events, {r.seconds:.1f} s -> engine v{r.published_version} (frozen)",
              flush=True)
    trainer = _ReplayTrainer(cfg.train, log_db, registry, work / "trainer")  # resumes after the warm-up round
    trainer.recorder = rec
    rec.t0 = time.monotonic()
    stop, errors = threading.Event(), []

    def train() -> None:
        try:
            trainer.run(stop)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    th = threading.Thread(target=train, name="replay-trainer", daemon=True)
    th.start()
    t0 = time.monotonic()
    try:
        version_at = stream(cfg, events, first, log_db, rec, trainer)
    finally:
        stream_s = time.monotonic() - t0
        stop.set()
        th.join(600)
    streamed = log_db.count()
    log_db.close()
    if errors:
        raise RuntimeError("the trainer thread failed during the replay") from errors[0]
    if streamed != len(events):
        raise RuntimeError(f"the log holds {streamed} events, {len(events)} were streamed (duplicate event ids?)")
    print(f"stream done in {stream_s:.0f} s: {len(rec.rounds)} rounds, {len(rec.publishes)} engines published; "
          "scoring every event ...", flush=True)
    if not rec.publishes:
        raise RuntimeError("no engine was published during the replay (the gate failed every round?): "
                           "try a lower --speedup, or --gate-min-ratio 0")
    scored = evaluate(cfg, events, first, version_at, registry)
    cfg_json = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items() if k != "train"}
    train_json = {k: (str(v) if isinstance(v, Path) else v)
                  for k, v in dataclasses.asdict(cfg.train).items() if k not in ("ann",)}
    return {"config": cfg_json, "train_config": train_json, "events": len(events), "warmup_events": first,
            "streamed_events": len(events) - first, "warmup_round": warmup,
            "stream_span_days": round(span_s / 86400, 2), "stream_seconds": round(stream_s, 1),
            "protocol": ev.__doc__.strip(), "first_engine": rec.publishes[0], "publishes": rec.publishes,
            "rounds": rec.rounds, **scored}


def run_config(cfg: ReplayConfig) -> int:
    t0 = time.monotonic()
    try:
        res = run(cfg)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        cause = f" (cause: {e.__cause__!r})" if e.__cause__ is not None else ""
        print(f"error: {e}{cause}", file=sys.stderr)
        return 2
    res["wall_seconds"] = round(time.monotonic() - t0, 1)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    day = lambda ms: str(np.datetime64(int(ms), "ms").astype("datetime64[D]"))  # noqa: E731
    first = res["first_engine"]
    title = (f"replay {cfg.dataset}: {res['streamed_events']} events at x{cfg.speedup:g} after "
             f"{res['warmup_events']} warm-up events\n{len(res['publishes'])} engines, {cfg.train.epochs_per_round} "
             f"epochs/round (frozen = v{first['version']}, trained on {first['trained_events']} events)")
    ev.plot(out / "results.png", res["windows"], res["publishes"], title)
    print(title)
    print(ev.format_table(res["windows"], res["summary"], day))
    print(f"wrote {out / 'results.json'} and {out / 'results.png'} ({res['wall_seconds']:.0f} s in all)")
    return 0


# --quick: 20k events, the tiny model, a faster stream (about a minute); flags given still win
QUICK = dict(speedup=4e5, max_events=20_000, warmup_events=5000, eval_every=2000)
QUICK_TRAIN = dict(round_min_events=500)


def base_config(quick: bool) -> ReplayConfig:
    """The config the flags are applied to: ReplayConfig's defaults, or the --quick ones."""
    from trainer.model_config import ModelConfig

    base = ReplayConfig()
    if not quick:
        return base
    return dataclasses.replace(base, **QUICK, train=base.train.replace(model=ModelConfig.tiny_debug(), **QUICK_TRAIN))


def _flags() -> tuple[FlagSet, FlagSet]:
    """The ReplayConfig fields and the fields of its TrainConfig that the study takes as flags."""
    full = base_config(quick=False)
    quick = lambda name, preset: f"--quick: {preset[name]:g}" if name in preset else ""  # noqa: E731
    replay = flag_set(ReplayConfig, "data", "dataset", "out",
                      *(Flag(name, note=quick(name, QUICK))
                        for name in ("speedup", "max_events", "warmup_events", "eval_every")),
                      "threads", defaults=full)
    train = flag_set(TrainConfig, Flag("round_min_events", note=quick("round_min_events", QUICK_TRAIN)),
                     "round_interval_s", Flag("epochs_per_round", name="epochs"), "gate_min_ratio",
                     defaults=full.train)
    return replay, train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="livetower bench replay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    replay, train = _flags()
    replay.add_to(p)
    train.add_to(p)
    preset = ", ".join(f"{k} {v:g}" for k, v in {**QUICK, **QUICK_TRAIN}.items())
    p.add_argument("--quick", action="store_true", help=f"a study of about a minute: the tiny model, {preset}")
    return p


def config_from_args(args: argparse.Namespace) -> ReplayConfig:
    replay, train = _flags()
    base = base_config(args.quick)
    return flags_to_config(replay, args, base, train=flags_to_config(train, args, base.train))


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    try:
        cfg = config_from_args(p.parse_args(argv))
    except ValueError as e:
        p.error(str(e))
    return run_config(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
