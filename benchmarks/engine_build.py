"""`livetower bench build`: build one engine per backend from the same model and compare.

For each backend: build time (export + compile + golden parity + publish), parity vs the eager torch
reference (max abs diff on the golden inputs and on random histories), load time, and user-tower
latency at batch 1 (median, P99) beside the eager model as the baseline; and how much a Python thread
still gets done while the tower runs in another thread (the event loop's share: 1.0 = the runner
holds no GIL), with torch's own pybind AOTI runner on the same compiled library as the baseline for
our C-ABI runner. Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from contracts.registry import USER_TOWER_FILE, Registry
from contracts.engine_format.backends import load_runner
from trainer.export.build import BuildInfo, UserTowerExport, build_engine
from trainer.export.compile import CompileOptions
from trainer.model import TwoTower
from trainer.model_config import ModelConfig
from trainer.vocab import table_rows_for


def latency_ms(fn, inputs: list[np.ndarray], warmup: int = 20) -> dict[str, float]:
    for x in inputs[:warmup]:
        fn(x)
    times = []
    for x in inputs:
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)),
            "mean_ms": float(np.mean(times))}


def python_share_while(fn, x: np.ndarray, seconds: float = 1.0) -> float:
    """Work a pure-Python thread does while `fn(x)` runs in a loop here, over the work it does alone."""
    import threading

    count, stop = [0], threading.Event()

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    th = threading.Thread(target=spin, daemon=True)
    th.start()
    time.sleep(0.1)

    def rate(busy: bool) -> float:
        c0, t0 = count[0], time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            if busy:
                fn(x)
            else:
                time.sleep(0.01)
        return (count[0] - c0) / (time.perf_counter() - t0)

    alone = rate(False)
    during = rate(True)
    stop.set()
    th.join()
    return during / alone


def random_histories(n: int, n_items: int, T: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h = np.zeros((1, T), np.int64)
        length = int(rng.integers(1, T + 1))
        h[0, T - length:] = rng.integers(1, n_items + 1, length)
        out.append(h)
    return out


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    cfg = ModelConfig()
    torch.manual_seed(0)
    model = TwoTower(cfg, table_rows_for(args.items)).eval()
    vocab = [f"item-{i}" for i in range(args.items)]
    counts = np.zeros(model.num_rows, np.int64)
    counts[1:args.items + 1] = np.random.default_rng(0).zipf(1.3, args.items).clip(max=10**6)
    tower = UserTowerExport(model).eval()
    hists = random_histories(args.calls, args.items, cfg.max_history, seed=1)
    with torch.no_grad():
        baseline = latency_ms(lambda h: tower(torch.from_numpy(h)), hists)
        baseline["python_share_while_running"] = python_share_while(
            lambda h: tower(torch.from_numpy(h)), np.concatenate(random_histories(8, args.items, cfg.max_history, 3)))
    results = {"config": {"items": args.items, "dim": cfg.dim, "max_history": cfg.max_history,
                          "layers": cfg.n_layers, "experts": cfg.n_routed_experts, "threads": args.threads,
                          "calls": args.calls, "torch": torch.__version__},
               "baseline_eager_torch": baseline, "backends": {}}
    print(f"eager torch baseline: p50 {baseline['p50_ms']:.3f} ms p99 {baseline['p99_ms']:.3f} ms", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        registry = Registry(Path(tmp) / "registry")
        for backend in args.backends:
            info = BuildInfo(parent=0, stream_offsets={}, watermark_ms=0, trained_events=0, eval_metrics={})
            t0 = time.perf_counter()
            manifest = build_engine(model, vocab, counts, registry, info,
                                    CompileOptions(backend=backend, inductor_cache_dir=str(Path(tmp) / "cache")),
                                    parity_tolerance=1e-4, progress=lambda m: print(f"  [{backend}] {m}", flush=True))
            build_s = time.perf_counter() - t0
            path = registry.engine_dir(manifest.version) / USER_TOWER_FILE[backend]
            t0 = time.perf_counter()
            runner = load_runner(backend, path, num_threads=args.threads)
            load_s = time.perf_counter() - t0
            batch = np.concatenate(random_histories(64, args.items, cfg.max_history, seed=2))
            with torch.no_grad():
                diff_random = float(np.abs(runner(batch) - tower(torch.from_numpy(batch)).numpy()).max())
            lat = latency_ms(runner, hists)
            share = python_share_while(runner, batch[:8])
            results["backends"][backend] = {
                "build_s": build_s, "load_s": load_s, "file_mb": path.stat().st_size / 1e6,
                "parity_golden_max_abs_diff": manifest.parity_max_abs_diff,
                "parity_random64_max_abs_diff": diff_random, **lat,
                "speedup_p50_vs_eager": baseline["p50_ms"] / lat["p50_ms"], "python_share_while_running": share}
            print(f"{backend}: build {build_s:.1f}s load {load_s:.2f}s parity {manifest.parity_max_abs_diff:.2e}/"
                  f"{diff_random:.2e} p50 {lat['p50_ms']:.3f} ms p99 {lat['p99_ms']:.3f} ms; a Python thread "
                  f"keeps {share:.0%} of its pace while it runs", flush=True)
            if backend == "aoti":  # torch's pybind runner on the same library: holds the GIL while it runs
                from contracts.engine_format.aoti_graphs import GRAPHS

                pyb = torch._C._aoti.AOTIModelContainerRunnerCpu(GRAPHS.open(path).so_path, 1)
                pyb_run = lambda h: pyb.run([torch.from_numpy(h)])[0]  # noqa: E731
                plat = latency_ms(pyb_run, hists)
                pshare = python_share_while(pyb_run, batch[:8])
                results["backends"]["aoti-pybind"] = {**plat, "python_share_while_running": pshare,
                                                      "speedup_p50_vs_eager": baseline["p50_ms"] / plat["p50_ms"]}
                print(f"aoti via torch's pybind runner: p50 {plat['p50_ms']:.3f} ms p99 {plat['p99_ms']:.3f} ms; "
                      f"a Python thread keeps {pshare:.0%} of its pace", flush=True)
                del pyb
            del runner
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["eager"] + list(results["backends"])
    p50 = [results["baseline_eager_torch"]["p50_ms"]] + [b["p50_ms"] for b in results["backends"].values()]
    p99 = [results["baseline_eager_torch"]["p99_ms"]] + [b["p99_ms"] for b in results["backends"].values()]
    build = [0.0] + [b.get("build_s", 0.0) for b in results["backends"].values()]
    share = [results["baseline_eager_torch"]["python_share_while_running"]] + [
        b.get("python_share_while_running", 0.0) for b in results["backends"].values()]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    x = np.arange(len(names))
    a.bar(x - 0.2, p50, 0.4, label="P50")
    a.bar(x + 0.2, p99, 0.4, label="P99")
    a.set_xticks(x, names)
    a.set_ylabel("ms per call (batch 1)")
    a.set_title(f"user tower, {results['config']['items']} items, T={results['config']['max_history']}")
    a.legend()
    b.bar(x, build)
    b.set_xticks(x, names)
    b.set_ylabel("engine build seconds")
    b.set_title("build (export + compile + parity + publish)")
    c.bar(x, share)
    c.set_xticks(x, names)
    c.set_ylim(0, 1.05)
    c.set_ylabel("Python thread's pace while the tower runs")
    c.set_title("GIL left to the event loop (1 = none held)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="livetower bench build", description=__doc__)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--backends", nargs="+", default=["aoti", "onnx", "torch"], choices=sorted(USER_TOWER_FILE))
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("bench-results/engine_build"))
    args = p.parse_args(argv)
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "results.png")
    print(f"wrote {args.out}/results.json and results.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
