"""`python -m benchmarks.upsert_freshness`: from an UpsertItems call to the first Recommend that can return the
new item (issue 23), under open-loop Recommend load.

Set-up: an engine of a feature model (the default DeepSeek user tower and ml-100k's item features: genres, title,
release year; untrained weights, since the latency does not depend on them) over the first --build-items
movies of ml-100k's u.item, served by a real `livetower serve` process. Then --upserts of the following movies,
one every --gap-s, each followed by Recommend probes with k = every item the server can serve (so "can return" is
literal) until the new id is in the answer; the latency runs from the upsert's send. Beside them, open-loop
Recommend load at --rate (benchmarks/loadgen.py); its latency is reported for a baseline window first and then
for the window with the upserts. Writes results.json and results.png into --out.

`--replicas 2`: the catalogue on the stream, as a fleet has it. A local Kafka-protocol broker (tansu), two
`livetower serve --catalog-stream` processes on one registry; the upserts go to replica 0, the probes to replica
1 (so the latency includes the broker, replica 1's follower and its engine update), the load round robin over
both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.loadgen import LoadConfig, run_load
from benchmarks.swap import wait
from benchmarks.tansu import free_port

ML100K = Path("../shared/data/ml-100k")


def build(data_dir: Path, records: list, backend: str) -> int:
    import torch

    from contracts.engine_format.item_features import FeatureConfig, featurize
    from contracts.registry import Registry
    from contracts.rollout import CanaryPolicy, RolloutState
    from trainer.export.build import BuildInfo, build_engine
    from trainer.export.compile import CompileOptions
    from trainer.features import FeatureTwoTower
    from trainer.model_config import ModelConfig

    mcfg = ModelConfig()
    fcfg = FeatureConfig(dim=mcfg.dim, numeric=("release_year",))
    n = len(records)
    torch.manual_seed(0)
    model = FeatureTwoTower(mcfg, n + 1, fcfg, featurize([None, *records], fcfg), torch.ones(n + 1)).eval()
    reg = Registry(data_dir / "registry")
    m = build_engine(model, [r.id for r in records], np.arange(n + 1, dtype=np.float64), reg,
                     BuildInfo(parent=0, stream_offsets={}, watermark_ms=0, trained_events=0, eval_metrics={}),
                     CompileOptions(backend=backend, inductor_cache_dir=data_dir / "inductor-cache"),
                     parity_tolerance=1e-3, progress=print)
    reg.write_rollout(RolloutState(stable=m.version, policy=CanaryPolicy(mode="manual")))
    return m.version


def upserts(client, token_md, new: list, gap_s: float, k: int, out: list, probe=None) -> None:
    """One upsert every gap_s; after each, Recommend probes (k = all items) until the new id is returned. probe:
    the client to probe (another replica); None: the one upserted to."""
    probe = probe or client
    from proto import livetower_v1_pb2 as pb

    history = ["m1", "m50", "m100"]
    for r in new:
        item = pb.CatalogItem(id=r.id, categorical={n: pb.CatalogValues(values=list(v)) for n, v in r.categorical.items()},
                              numeric=dict(r.numeric), text=dict(r.text))
        t0 = time.perf_counter()
        client.admin.UpsertItems(pb.UpsertItemsRequest(items=[item]), metadata=token_md, timeout=10)
        t_ack = time.perf_counter()
        probes = 0
        while True:
            probes += 1
            if r.id in probe.recommend("probe-user", k, history=history).item_ids:
                break
        t_found = time.perf_counter()
        out.append({"id": r.id, "upsert_ms": (t_ack - t0) * 1e3, "servable_ms": (t_found - t0) * 1e3, "probes": probes})
        time.sleep(max(0.0, gap_s - (time.perf_counter() - t0)))


def percentiles(xs: list[float]) -> dict:
    a = np.asarray(xs)
    return {"n": len(a), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.upsert_freshness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-results/upsert-freshness"))
    p.add_argument("--data", type=Path, default=ML100K, help="the ml-100k directory (u.item)")
    p.add_argument("--build-items", type=int, default=800)
    p.add_argument("--upserts", type=int, default=200)
    p.add_argument("--gap-s", type=float, default=0.2)
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--baseline-s", type=float, default=20.0)
    p.add_argument("--backend", default="aoti", choices=("aoti", "onnx", "torch"))
    p.add_argument("--replicas", type=int, default=1, choices=(1, 2),
                   help="2: two servers sharing the catalogue through the stream; upsert on one, probe the other")
    args = p.parse_args(argv)
    from contracts.catalog_files import read_ml100k_items
    from contracts.client import Client

    records = list(read_ml100k_items(args.data / "u.item"))
    if len(records) < args.build_items + args.upserts:
        raise SystemExit(f"{args.data}/u.item has {len(records)} items: fewer than --build-items + --upserts")
    k = args.build_items + args.upserts
    if k > 1000:
        raise SystemExit("--build-items + --upserts must be <= 1000 (Recommend's max k): probes return every item")
    out = args.out
    data_dir = out / "data"
    out.mkdir(parents=True, exist_ok=True)
    version = build(data_dir, records[:args.build_items], args.backend)
    broker = None
    extra: list[str] = []
    if args.replicas > 1:
        from benchmarks.tansu import LocalBroker

        broker = LocalBroker(log_path=out / "tansu.log").start()
        extra = ["--events", f"kafka://{broker.bootstrap}/events", "--catalog-stream",
                 "--registry", str(data_dir / "registry")]
    servers, clients = [], []
    try:
        for i in range(args.replicas):
            d = data_dir if args.replicas == 1 else out / f"replica-{i}"
            port, admin = free_port(), free_port()
            servers.append(subprocess.Popen(
                [str(Path(sys.executable).parent / "livetower"), "serve", "--data-dir", str(d), "--port", str(port),
                 "--admin-port", str(admin), "--metrics-port", "-1", *extra],
                stdout=open(out / f"server-{i}.log", "ab"), stderr=subprocess.STDOUT,
                env={**os.environ, "LIVETOWER_LOG_LEVEL": "INFO"}))
            token = wait(lambda d=d: (d / "admin.token").is_file() and (d / "admin.token").read_text().strip(),
                         120, "the server's admin token")
            clients.append((Client(f"127.0.0.1:{port}", admin_target=f"127.0.0.1:{admin}", admin_token=token,
                                   timeout_s=5), port, token))
        for client, _, _ in clients:
            wait(lambda client=client: _serving(client, version), 180, f"engine {version} serving")
        target = ("ipv4:" + ",".join(f"127.0.0.1:{port}" for _, port, _ in clients) if len(clients) > 1
                  else f"127.0.0.1:{clients[0][1]}")
        load_cfg = dict(target=target, rate=args.rate, warmup_s=2.0, users=2000, items=args.build_items,
                        item_prefix="m", history_len=20, k=100, mix=(("recommend", 1.0),), progress=False)
        print(f"baseline: {args.rate:g} Recommend/s for {args.baseline_s:g} s")
        baseline = run_load(LoadConfig(**load_cfg, duration_s=args.baseline_s, label="baseline"), log=lambda s: None)
        rows: list = []
        writer, _, token = clients[0]
        md = (("authorization", f"Bearer {token}"),)
        worker = threading.Thread(target=upserts, args=(writer, md, records[args.build_items:k], args.gap_s, k, rows,
                                                        clients[-1][0]))
        print(f"upserts: {args.upserts} items, one every {args.gap_s:g} s, beside the same load"
              + (" (upserts to replica 0, probes of replica 1)" if len(clients) > 1 else ""))
        window = args.upserts * args.gap_s + 5.0
        box: dict = {}
        loader = threading.Thread(target=lambda: box.setdefault("r", run_load(
            LoadConfig(**load_cfg, duration_s=window, label="with upserts"), log=lambda s: None)))
        loader.start()
        time.sleep(3.0)
        worker.start()
        worker.join()
        loader.join()
        with_upserts = box["r"]
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(30)
        if broker is not None:
            broker.stop()
    results = {"config": {k_: str(v) for k_, v in vars(args).items()}, "engine_version": version,
               "upsert_rpc_ms": percentiles([r["upsert_ms"] for r in rows]),
               "upsert_to_servable_ms": percentiles([r["servable_ms"] for r in rows]),
               "probes_needed": percentiles([r["probes"] for r in rows]),
               "load_baseline": {"latency_ms": baseline["latency_ms"], "errors": baseline["errors"]},
               "load_with_upserts": {"latency_ms": with_upserts["latency_ms"], "errors": with_upserts["errors"]},
               "rows": rows}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    _plot(results, out / "results.png")
    print(json.dumps({k_: v for k_, v in results.items() if k_ not in ("rows", "config")}, indent=1))
    return 0


def _serving(client, version: int) -> bool:
    import grpc

    try:
        return client.rollout().stable_version == version
    except grpc.RpcError:
        return False


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = sorted(r["servable_ms"] for r in results["rows"])
    ax1.plot(xs, np.arange(1, len(xs) + 1) / len(xs))
    ax1.set_xlabel("upsert sent -> first Recommend returning the item (ms)")
    ax1.set_ylabel("fraction of upserts")
    ax1.set_title(f"{len(xs)} upserts under load")
    names = ("load_baseline", "load_with_upserts")
    for j, q in enumerate(("p50", "p99")):
        ax2.bar([i + 0.35 * j for i in range(2)], [results[n]["latency_ms"][q] for n in names], 0.35, label=q)
    ax2.set_xticks([0.17, 1.17], ["baseline", "with upserts"])
    ax2.set_ylabel("Recommend latency (ms)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
