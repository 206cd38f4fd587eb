"""`livetower bench kernels`: the Triton retrieval kernel vs `torch.matmul + torch.topk` on a GPU.

For each item dtype (fp16, bf16), item count N (1M, 10M by default) and batch B (1, 32), at k=100 and
D=64, over an L2-normalised item matrix on the GPU:
  - kernel: `kernels.topk_triton.topk_cosine_triton(..., items_normalized=True)`, the whole call
    (stage 1 kernel + torch.topk merge of the candidates + unpacking), as a caller sees it;
  - torch:  `torch.topk(torch.matmul(q_normalised.to(dtype), items.T), k)`, the fastest plain-torch
    way (scores in the item dtype; the (B, N) score matrix is written and read back);
timed with CUDA events, median (and p10/p90) of --reps calls after --warmup calls.
Bytes: the scan must read the item matrix once, N*D*itemsize; the kernel also writes and the merge
reads B*n_splits*KB int64 candidate keys (counted in bytes_total). The floor is the item bytes over the
device-to-device copy bandwidth measured on the same card (a copy moves 2x its size: GB/s =
2*bytes/time). Reported: µs, GB/s (item bytes / time), fraction of the copy bandwidth, speedup over
torch, and recall of the kernel's ids vs torch's (fp16/bf16 matmul rounding reorders near-ties).
Writes results.json and results.png under --out.

Without CUDA it exits with status 2 and says so; `--cpu-smoke` instead times the torch reference on
the CPU at a small N, labelled as NOT a GPU measurement (a check that the script runs).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
NO_CUDA = "no CUDA device: this benchmark measures GPU kernels; run it on a GPU host"


def log(msg: str) -> None:
    print(msg, flush=True)


def time_cuda_us(fn, reps: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    t = sorted(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))  # ms -> µs
    return {"median_us": statistics.median(t), "p10_us": t[len(t) // 10], "p90_us": t[(9 * len(t)) // 10],
            "reps": reps}


def copy_bandwidth_gbps(n_bytes: int, reps: int, warmup: int) -> dict:
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    src.fill_(1)
    t = time_cuda_us(lambda: dst.copy_(src), reps, warmup)
    return {"bytes": n_bytes, "median_us": t["median_us"], "GBps": 2 * n_bytes / (t["median_us"] * 1e-6) / 1e9}


def make_items(n: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    items = torch.empty(n, d, dtype=dtype, device="cuda")
    for i in range(0, n, 1 << 20):  # chunks: no N x D fp32 temporary
        j = min(n, i + (1 << 20))
        items[i:j] = F.normalize(torch.randn(j - i, d, device="cuda", generator=g), dim=-1).to(dtype)
    return items


def run_gpu(args) -> dict:
    from kernels.topk_triton import launch_plan, topk_cosine_triton

    import triton

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    log(f"device: {props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB); "
        f"torch {torch.__version__}, triton {triton.__version__}")
    log(f"measuring device-to-device copy bandwidth ({args.copy_mib} MiB buffer) ...")
    copy = copy_bandwidth_gbps(args.copy_mib << 20, args.reps, args.warmup)
    torch.cuda.empty_cache()
    log(f"  copy: {copy['GBps']:.0f} GB/s")
    runs = []
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for n in args.items:
            log(f"building {n:,} x {args.dim} {dname} items ...")
            items = make_items(n, args.dim, dtype, seed=n)
            item_bytes = n * args.dim * items.element_size()
            for b in args.batch:
                q = torch.randn(b, args.dim, device=dev)
                qn = F.normalize(q, dim=-1).to(dtype)
                plan = launch_plan(b, n, args.dim, args.k, dev)
                cand_bytes = 2 * b * plan["n_splits"] * plan["KB"] * 8
                log(f"  B={b}: compiling / warming up the kernel (first call compiles: can take a minute) ...")
                ks, ki = topk_cosine_triton(q, items, args.k, items_normalized=True)
                ts, ti = torch.topk(torch.matmul(qn, items.T), args.k)
                recall = sum(len(set(a) & set(c)) for a, c in zip(ki.tolist(), ti.tolist())) / (b * args.k)
                kern = time_cuda_us(lambda: topk_cosine_triton(q, items, args.k, items_normalized=True),
                                    args.reps, args.warmup)
                tor = time_cuda_us(lambda: torch.topk(torch.matmul(qn, items.T), args.k), args.reps, args.warmup)
                floor_us = item_bytes / (copy["GBps"] * 1e9) * 1e6
                row = {
                    "dtype": dname, "N": n, "B": b, "k": args.k, "D": args.dim, "plan": plan,
                    "bytes_scan": item_bytes, "bytes_total": item_bytes + cand_bytes + b * args.dim * 4,
                    "kernel": kern, "torch": tor, "floor_us": floor_us,
                    "kernel_GBps": item_bytes / (kern["median_us"] * 1e-6) / 1e9,
                    "torch_GBps": item_bytes / (tor["median_us"] * 1e-6) / 1e9,
                    "kernel_fraction_of_copy_bw": floor_us / kern["median_us"],
                    "speedup_vs_torch": tor["median_us"] / kern["median_us"],
                    "recall_vs_torch": recall,
                }
                runs.append(row)
                log(f"  {dname} N={n:,} B={b} k={args.k}: kernel {kern['median_us']:.0f} µs "
                    f"({row['kernel_GBps']:.0f} GB/s, {100 * row['kernel_fraction_of_copy_bw']:.0f}% of copy), "
                    f"torch {tor['median_us']:.0f} µs ({row['torch_GBps']:.0f} GB/s), floor {floor_us:.0f} µs, "
                    f"speedup {row['speedup_vs_torch']:.2f}x, recall vs torch {recall:.3f}")
            items = None  # free before the next N
            torch.cuda.empty_cache()
    return {"kind": "gpu", "device": props.name, "torch": torch.__version__, "triton": triton.__version__,
            "copy_bandwidth": copy, "runs": runs}


def run_cpu_smoke(args) -> dict:
    from kernels.retrieval import topk_cosine_reference

    log("CPU SMOKE of the torch reference -- NOT a GPU measurement, not comparable with GPU figures")
    runs = []
    for dname in args.dtypes:
        items = F.normalize(torch.randn(args.smoke_items, args.dim), dim=-1).to(DTYPES[dname])
        for b in args.batch:
            q = torch.randn(b, args.dim)
            t = []
            for _ in range(args.smoke_reps):
                t0 = time.perf_counter()
                topk_cosine_reference(q, items, args.k, items_normalized=True)
                t.append((time.perf_counter() - t0) * 1e6)
            runs.append({"dtype": dname, "N": args.smoke_items, "B": b, "k": args.k, "D": args.dim,
                         "reference_median_us": statistics.median(t)})
            log(f"  cpu reference {dname} N={args.smoke_items:,} B={b}: {statistics.median(t):.0f} µs")
    return {"kind": "cpu-smoke", "not_a_gpu_measurement": True, "device": platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "runs": runs}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    labels = [f"{r['dtype']}\nN={r['N'] / 1e6:g}M\nB={r['B']}" for r in runs]
    x = range(len(runs))
    w = 0.27
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(runs)), 4.5))
    ax.bar([i - w for i in x], [r["kernel"]["median_us"] for r in runs], w, label="triton kernel")
    ax.bar(list(x), [r["torch"]["median_us"] for r in runs], w, label="torch matmul + topk")
    ax.bar([i + w for i in x], [r["floor_us"] for r in runs], w, label="floor: item bytes / copy BW")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("µs per call (median)")
    ax.set_title(f"top-{runs[0]['k'] if runs else ''} cosine retrieval on {results['device']} "
                 f"(copy {results['copy_bandwidth']['GBps']:.0f} GB/s)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="livetower bench kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, nargs="+", default=[1_000_000, 10_000_000], help="item counts N")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="query batch sizes B")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16"])
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--copy-mib", type=int, default=1024, help="buffer size for the copy-bandwidth probe")
    p.add_argument("--out", type=Path, default=Path("bench-results/kernels"))
    p.add_argument("--cpu-smoke", action="store_true",
                   help="without CUDA: time the torch reference on the CPU instead (NOT a GPU measurement)")
    p.add_argument("--smoke-items", type=int, default=100_000)
    p.add_argument("--smoke-reps", type=int, default=5)
    args = p.parse_args(argv)

    if torch.cuda.is_available():
        results = run_gpu(args)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        plot(results, args.out / "results.png")
        log(f"wrote {args.out}/results.json and results.png")
        return 0
    if not args.cpu_smoke:
        print(NO_CUDA + " (or pass --cpu-smoke for a CPU smoke run of the reference)", file=sys.stderr)
        return 2
    results = run_cpu_smoke(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_smoke.json").write_text(json.dumps(results, indent=2))
    log(f"wrote {args.out}/cpu_smoke.json (CPU smoke, not a GPU measurement)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
