"""`python -m benchmarks.user_vectors`: what user features cost the server.

Three engines of the same catalogue (default ModelConfig, 1,000 items, torch backend) are caught up with a
catalogue of N user records, as the server does when it loads an engine (server/engine/catalog_sync.py):
- `new_encoder`: the first engine with a user encoder: reads every user record and encodes it;
- `shipped`: the same, for an engine whose build shipped the users' vectors (contracts/engine_format/
  user_vectors.py), with 1 % of the users' records changed after that build: those are encoded, the rest taken;
- `pointed`: a short round's refit of that engine (the same encoder, no file of its own): its manifest points to
  the shipped file (manifest.user_vectors_version), loaded on a server that has seen neither engine;
- `same_encoder`: an engine whose user encoder is the same (a short round's refit): shares the table;
- `id_only` (the baseline): an engine without user features: reads the item changes only.
Each is timed over `--runs` fresh stores (median and max), beside the build's cost of shipping the vectors
(`ship_s`: encoding every record in the trainer, once per engine that changes the encoder, and the file's size), the encoder's throughput, the table's memory
per user (RSS growth), and the per-request part: fusing a batch of 16 user vectors against the tower's own call
on the same batch (median and P99 of 500 calls). Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from contracts.catalog import CatalogRecord, CatalogStore
from contracts.registry import USER_ENCODER_FILE, USER_ENCODER_META, USER_VECTORS_FILE, Registry
from server.engine.catalog_sync import CatalogSync
from server.engine.engine import Engine
from server.engine.loading import load_from_registry
from server.engine.manager import EngineManagerConfig
from trainer.export.build import BuildInfo, build_engine
from trainer.export.compile import CompileOptions
from trainer.export.item_encoder import export_user_vectors
from trainer.model import TwoTower
from trainer.model_config import ModelConfig
from trainer.user_features import attach_user_features, user_feature_config

OCCUPATIONS = ("writer", "engineer", "student", "artist", "doctor", "other")
N_ITEMS = 1000
KINDS = ("new_encoder", "shipped", "pointed", "same_encoder", "id_only")
CHANGED_AFTER_BUILD = 0.01  # of the users, for `shipped`


def user_record(i: int, age: float | None = None) -> CatalogRecord:
    """ml-100k's u.user shape: age, gender, occupation, zip3."""
    return CatalogRecord(id=f"user-{i}", kind="user", numeric={"age": 18.0 + i % 60 if age is None else age},
                         categorical={"occupation": (OCCUPATIONS[i % 6],), "gender": ("MF"[i % 2],),
                                      "zip3": (f"{i % 900:03d}",)})


def publish(model: TwoTower, reg: Registry, user_catalog: CatalogStore | None = None, parent: int = 0) -> int:
    return build_engine(model, [f"item-{i}" for i in range(N_ITEMS)], np.arange(N_ITEMS + 1, dtype=np.float64), reg,
                        BuildInfo(parent=parent, stream_offsets={}, watermark_ms=0, trained_events=0, eval_metrics={}),
                        CompileOptions(backend="torch"), parity_tolerance=1e-4, user_catalog=user_catalog,
                        progress=lambda line: None).version


def time_shipping(reg: Registry, version: int, store: CatalogStore, work: Path) -> tuple[float, int]:
    """The build's part: export_user_vectors over the store, in a staging copy of the engine's encoder files;
    (seconds, the file's bytes)."""
    staging = work / "ship-staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name in (USER_ENCODER_FILE, USER_ENCODER_META):
        shutil.copy(reg.engine_dir(version) / name, staging / name)
    t0 = time.perf_counter()
    export_user_vectors(staging, store, None, lambda line: None)
    return time.perf_counter() - t0, (staging / USER_VECTORS_FILE).stat().st_size


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def median_p99_us(fn, calls: int = 500) -> dict[str, float]:
    for _ in range(50):
        fn()
    ts = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e6)
    return {"p50_us": round(float(np.median(ts)), 1), "p99_us": round(float(np.percentile(ts, 99)), 1)}


def run(n_users: int, runs: int, work: Path, progress=print) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig()
    reg = Registry(work / "registry")
    sample = [user_record(i) for i in range(1000)]
    with_users = TwoTower(cfg, N_ITEMS + 1)
    attach_user_features(with_users, user_feature_config(sample, cfg.out_dim), sample)
    versions = {"new_encoder": publish(with_users.eval(), reg)}
    versions["same_encoder"] = publish(with_users, reg)
    versions["id_only"] = publish(TwoTower(cfg, N_ITEMS + 1).eval(), reg)
    progress(f"engines {versions} built")
    seconds: dict[str, list[float]] = {k: [] for k in KINDS}
    out: dict = {"config": {"users": n_users, "items": N_ITEMS, "dim": cfg.out_dim, "backend": "torch",
                            "runs": runs, "threads": torch.get_num_threads()}}
    for r in range(runs):
        store = CatalogStore(work / f"catalog-{r}.sqlite")
        for s in range(0, n_users, 5000):
            store.upsert([user_record(i) for i in range(s, min(n_users, s + 5000))])
        sync, kept = CatalogSync(store), []
        gc.collect()
        rss0 = rss_bytes()
        for kind in KINDS:
            if kind in ("shipped", "pointed"):
                continue
            engine = Engine.load(reg.engine_dir(versions[kind]), reg.verify(versions[kind]))
            t0 = time.perf_counter()
            sync.catch_up([engine])
            seconds[kind].append(time.perf_counter() - t0)
            kept.append(engine)
            if kind == "new_encoder":
                gc.collect()
                out.setdefault("bytes_per_user", []).append(round((rss_bytes() - rss0) / n_users))
        assert kept[0].users is kept[1].users and len(kept[0].users.vecs) == n_users
        ship_s, ship_bytes = time_shipping(reg, versions["new_encoder"], store, work)
        out.setdefault("ship_s", []).append(round(ship_s, 3))
        out["ship_file_bytes"] = ship_bytes
        shipped_v = publish(with_users, reg, user_catalog=store)  # the same encoder, its build shipping the table
        changed = range(0, n_users, int(1 / CHANGED_AFTER_BUILD))
        store.upsert([user_record(i, age=99.0) for i in changed])
        engine = Engine.load(reg.engine_dir(shipped_v), reg.verify(shipped_v))
        fresh_sync = CatalogSync(store)  # its own table pool: this server has not seen the encoder
        t0 = time.perf_counter()
        fresh_sync.catch_up([engine])
        seconds["shipped"].append(time.perf_counter() - t0)
        pointed_v = publish(with_users, reg, user_catalog=store, parent=shipped_v)
        assert reg.read_manifest(pointed_v).user_vectors_version == shipped_v
        t0 = time.perf_counter()
        pointed = load_from_registry(reg, pointed_v, EngineManagerConfig(verify_pause_s=0.0))
        out.setdefault("pointed_load_s", []).append(round(time.perf_counter() - t0, 3))  # verifies the source too
        t0 = time.perf_counter()
        CatalogSync(store).catch_up([pointed])
        seconds["pointed"].append(time.perf_counter() - t0)
        assert pointed.users.vecs.keys() == engine.users.vecs.keys()
        reference = kept[0]
        sync.catch_up([reference])
        assert engine.users is not reference.users and engine.users.vecs.keys() == reference.users.vecs.keys()
        worst = max(float(np.abs(engine.users.vecs[u] - reference.users.vecs[u]).max())
                    for u in [f"user-{i}" for i in range(0, n_users, max(n_users // 1000, 1))])
        out.setdefault("shipped_max_abs_diff", []).append(worst)
        progress(f"run {r + 1}/{runs}: " + ", ".join(f"{k} {seconds[k][-1]:.2f} s" for k in KINDS))
        if r == runs - 1:
            engine = kept[0]
            u_BD = np.random.default_rng(0).standard_normal((16, cfg.out_dim)).astype(np.float32)
            ids = [f"user-{i}" for i in range(16)]
            hist_BT = np.ones((16, cfg.max_history), np.int64)
            out["fuse_batch16"] = median_p99_us(lambda: engine.fuse_user_features(u_BD, ids))
            out["tower_batch16_baseline"] = median_p99_us(lambda: engine.runner(hist_BT))
            recs = [user_record(i) for i in range(20_000)]
            engine.user_encoder(recs[:4096])  # warm-up
            t0 = time.perf_counter()
            for s in range(0, len(recs), 4096):
                engine.user_encoder(recs[s:s + 4096])
            out["encode_records_per_s"] = round(len(recs) / (time.perf_counter() - t0))
        store.close()
    out["catch_up_s"] = {k: {"median": round(float(np.median(v)), 3), "max": round(max(v), 3),
                             "runs": [round(x, 3) for x in v]} for k, v in seconds.items()}
    return out


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4))
    med = [r["catch_up_s"][k]["median"] for k in KINDS]
    mx = [r["catch_up_s"][k]["max"] for k in KINDS]
    x = np.arange(len(KINDS))
    a.bar(x - 0.2, med, 0.4, label="median")
    a.bar(x + 0.2, mx, 0.4, label="max")
    a.set_xticks(x, ["new encoder", "shipped\n(1 % changed)", "short round's,\npoints to it",
                     "same encoder\n(refit)", "id-only\n(baseline)"])
    a.set_ylabel("seconds to catch up")
    a.set_title(f"engine catch-up, {r['config']['users']:,} user records")
    a.legend()
    parts = ["fuse_batch16", "tower_batch16_baseline"]
    b.bar(np.arange(2) - 0.2, [r[p]["p50_us"] for p in parts], 0.4, label="P50")
    b.bar(np.arange(2) + 0.2, [r[p]["p99_us"] for p in parts], 0.4, label="P99")
    b.set_xticks(np.arange(2), ["fusion", "tower (torch)"])
    b.set_ylabel("µs per batch of 16")
    b.set_yscale("log")
    b.set_title("per request batch")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.user_vectors", description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=100_000, help="user records in the catalogue (default 100,000)")
    p.add_argument("--runs", type=int, default=3, help="fresh catalogues timed (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--out", type=Path, default=Path("bench-results/user_vectors"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        r = run(args.users, args.runs, Path(d))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "user_vectors.json").write_text(json.dumps(r, indent=1))
    plot(r, args.out / "user_vectors.png")
    print(json.dumps(r, indent=1))
    print(f"wrote {args.out}/user_vectors.json and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
