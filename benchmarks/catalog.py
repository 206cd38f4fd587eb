"""`livetower bench catalog`: a trained catalogue for serving benchmarks.

Writes synthetic events for N items (clusters on a ring, drifting users) into DIR, trains one
round with the real trainer (which publishes the optimised engine, AOTInductor by default, into
DIR/registry) and builds the naive baseline from the same weights: a torch.export engine in
DIR/baseline/registry, to be served with --no-batching. Both servers then answer with the same
model, so a load test compares serving paths, not models.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from contracts.eventlog import SqliteEventLog
from contracts.registry import Registry
from trainer.config import TrainConfig
from trainer.data.synthetic import SyntheticConfig, generate
from trainer.export.build import BuildInfo, build_engine
from trainer.export.compile import CompileOptions
from trainer.loop import Trainer

BASELINE_DIR = "baseline"


def build_catalog(out: Path, *, items: int, users: int, events_per_user: int, clusters: int, backend: str,
                  epochs: int, batch_size: int = 64) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    log = SqliteEventLog(out / "events.sqlite")
    if log.count() == 0:
        cfg = SyntheticConfig(n_users=users, n_items=items, n_clusters=clusters, events_per_user=events_per_user,
                              zipf_a=0.6)
        log.append_all(generate(cfg), chunk=50_000,
                       progress=lambda n: print(f"  events {n}/{users * events_per_user}", flush=True))
    # Every item of the events gets a row: the live trainer's admission bounds (an item needs 2 events, at most 50k
    # new items a round) would serve a 100k catalogue as ~50k items and a 1M one as 50k.
    train_cfg = TrainConfig(backend=backend, epochs_per_round=epochs, max_round_events=10**9, batch_size=batch_size,
                            inductor_cache_dir=out / "inductor-cache", item_min_count=1,
                            max_new_items_per_round=max(items, 1))
    t0 = time.perf_counter()
    trainer = Trainer(train_cfg, log, Registry(out / "registry"), out / "trainer")
    result = trainer.run_round()
    if result is None:  # already trained: publish a fresh engine from the checkpoint (current build options)
        trainer.publish({}, "passed")
    train_s = time.perf_counter() - t0
    st = trainer.state
    base_reg = Registry(out / BASELINE_DIR / "registry")
    if base_reg.versions():
        print(f"baseline engine {base_reg.latest()} already built")
        summary = json.loads((out / "catalog.json").read_text())
        summary["optimised_engine"] = Registry(out / "registry").latest()
        (out / "catalog.json").write_text(json.dumps(summary, indent=1))
        return summary
    baseline = build_engine(trainer.model, list(trainer.vocab.ids), st.item_counts,
                            base_reg,
                            BuildInfo(parent=0, stream_offsets=dict(st.offsets), watermark_ms=st.watermark_ms,
                                      trained_events=st.trained_events, eval_metrics={}),
                            CompileOptions(backend="torch"), parity_tolerance=train_cfg.parity_tolerance,
                            progress=print)
    summary = {"items": len(trainer.vocab), "events": st.trained_events, "train_and_build_s": train_s,
               "optimised_engine": result.published_version if result else 0, "backend": backend,
               "baseline_engine": int(baseline.version), "metrics": result.metrics if result else {}}
    (out / "catalog.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="livetower bench catalog", description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--events-per-user", type=int, default=50)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--backend", default="aoti", choices=("aoti", "onnx", "torch"))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="windows per step (larger: fewer optimizer steps "
                                                              "over a big item table)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("livetower").setLevel(logging.INFO)
    print(json.dumps(build_catalog(args.out, items=args.items, users=args.users,
                                   events_per_user=args.events_per_user, clusters=args.clusters,
                                   backend=args.backend, epochs=args.epochs, batch_size=args.batch_size), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
