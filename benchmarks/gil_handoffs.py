"""`livetower bench gil`: what the compute thread's calls cost beside a thread busy in Python.

In the server the compute thread runs the user tower (an AOTInductor container through ctypes) and the index search
(FAISS), each with the GIL released, while the event loop runs Python. Every time the compute thread gives the GIL up
it must get it back from the loop, which may keep it for up to the switch interval (the server sets 1 ms): a
hand-off. This measures, on a catalogue's latest engine and one thread, the median / P90 / P99 of each call alone
and beside a thread spinning in Python (the worst case of a busy loop), and from their difference the hand-offs a
call costs. Baseline in the same run: the tower given handles of the Python tensors themselves (how inputs crossed
before 2026-12-06), whose release mid-run took the GIL once more (contracts/engine_format/aoti_abi.py). Writes JSON
and a PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from contracts.engine_format import aoti_abi
from contracts.registry import Registry
from server.engine.engine import Engine, RecommendQuery

CALLS = ("tower", "tower (baseline: handles of Python tensors)", "index search", "recommend_batch")


class Spinner:
    """A thread running Python until stopped: a busy event loop at its worst."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, name="spinner", daemon=True)

    def _spin(self) -> None:
        n = 0
        while not self._stop.is_set():
            for _ in range(1000):
                n += 1

    def __enter__(self) -> "Spinner":
        self._thread.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def timed_ms(fn, calls: int) -> dict[str, float]:
    for i in range(20):
        fn(i)
    ts = []
    for i in range(calls):
        t = time.perf_counter()
        fn(i)
        ts.append((time.perf_counter() - t) * 1e3)
    return {q: round(float(np.percentile(ts, p)), 4) for q, p in (("p50", 50), ("p90", 90), ("p99", 99))}


def run(catalog: Path, calls: int, switch_interval_s: float, progress=print) -> dict:
    torch.set_num_threads(1)
    reg = Registry(catalog / "registry")
    version = reg.latest()
    engine = Engine.load(reg.engine_dir(version), reg.verify(version))
    if engine.runner.backend != "aoti" or engine.ann is None:
        raise SystemExit(f"engine {version} of {catalog} has backend {engine.runner.backend!r} and "
                         f"{'an' if engine.ann else 'no'} index: this measures an AOTInductor tower beside an index "
                         "(build a catalogue with `livetower bench catalog`)")
    rng = np.random.default_rng(0)
    ids = [engine.item_ids[i] for i in range(len(engine.item_ids))]
    histories = [[ids[j] for j in rng.integers(0, len(ids), engine.max_history)] for _ in range(64)]
    rows_BT = np.stack([engine.history_rows(h) for h in histories])
    u_1D = engine.runner(rows_BT[:1])
    shim = aoti_abi._TENSOR_SHIM

    def baseline_tower(i: int) -> None:
        aoti_abi._TENSOR_SHIM = None
        try:
            engine.runner(rows_BT[i % 64:i % 64 + 1])
        finally:
            aoti_abi._TENSOR_SHIM = shim

    fns = {CALLS[0]: lambda i: engine.runner(rows_BT[i % 64:i % 64 + 1]), CALLS[1]: baseline_tower,
           CALLS[2]: lambda i: engine.ann.search(u_1D, 100),
           CALLS[3]: lambda i: engine.recommend_batch([RecommendQuery(histories[i % 64], 100, False)])}
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(switch_interval_s)
    out: dict = {"catalog": str(catalog), "engine": version, "items": engine.n_items,
                 "index": engine.ann.settings.kind, "calls": calls,
                 "switch_interval_ms": switch_interval_s * 1e3, "view_handles": shim is not None, "results": {}}
    try:
        for name, fn in fns.items():
            alone = timed_ms(fn, calls)
            with Spinner():
                beside = timed_ms(fn, calls)
            handoffs = (beside["p50"] - alone["p50"]) / (switch_interval_s * 1e3)
            out["results"][name] = {"alone_ms": alone, "beside_spinner_ms": beside,
                                    "handoffs_at_median": round(handoffs, 2)}
            progress(f"{name}: alone P50 {alone['p50']:.3f} ms, beside a busy thread P50 {beside['p50']:.3f} / P90 "
                     f"{beside['p90']:.3f} / P99 {beside['p99']:.3f} ms (~{handoffs:.1f} hand-offs)")
    finally:
        sys.setswitchinterval(old_interval)
    return out


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r["results"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(11, 4))
    for j, (key, q, label) in enumerate((("alone_ms", "p50", "alone, P50"), ("beside_spinner_ms", "p50", "beside, P50"),
                                         ("beside_spinner_ms", "p90", "beside, P90"))):
        ax.bar(x + (j - 1) * 0.27, [r["results"][n][key][q] for n in names], 0.27, label=label)
    ax.set_xticks(x, [n.replace(" (", "\n(") for n in names])
    ax.set_ylabel("ms per call")
    ax.set_title(f"calls of the compute thread beside a thread busy in Python (switch interval "
                 f"{r['switch_interval_ms']:g} ms), {r['items']:,} items")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="livetower bench gil", description=__doc__.split("\n")[0])
    p.add_argument("--catalog", type=Path, required=True, help="a dir made by `livetower bench catalog`")
    p.add_argument("--calls", type=int, default=400, help="timed calls per measurement (default 400)")
    p.add_argument("--switch-interval-ms", type=float, default=1.0, help="sys.setswitchinterval (the server's default)")
    p.add_argument("--out", type=Path, default=Path("bench-results/gil"))
    args = p.parse_args(argv)
    if args.calls < 10:
        p.error(f"--calls must be >= 10, got {args.calls}")
    if not 0 < args.switch_interval_ms <= 100:
        p.error(f"--switch-interval-ms must be in (0, 100], got {args.switch_interval_ms}")
    r = run(args.catalog, args.calls, args.switch_interval_ms / 1e3)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gil_handoffs.json").write_text(json.dumps(r, indent=1))
    plot(r, args.out / "gil_handoffs.png")
    print(f"wrote {args.out}/gil_handoffs.json and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
