"""Merging, summarising and drawing the figures of a `livetower bench load` run.

Workers send HdrHistograms (microseconds, encoded) and counters; :func:`merge` adds them up,
:func:`build_results` turns them into the JSON written as ``results.json``, :func:`format_table` prints the
short summary, :func:`plot` writes ``results.png`` (latency over time + HdrHistogram-style percentile curve)
and :func:`slo_violations` says which SLO a run broke.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hdrh.histogram import HdrHistogram

# Latencies are recorded in microseconds, 1 us .. 1 h, 3 significant digits.
HIST_MIN_US = 1
HIST_MAX_US = 3_600_000_000
HIST_DIGITS = 3
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def new_hist() -> HdrHistogram:
    return HdrHistogram(HIST_MIN_US, HIST_MAX_US, HIST_DIGITS)


def record_us(h: HdrHistogram, seconds: float) -> None:
    h.record_value(min(max(int(round(seconds * 1e6)), HIST_MIN_US), HIST_MAX_US))


def decode(blob: bytes | None) -> HdrHistogram:
    h = new_hist()
    if blob:
        h.decode_and_add(blob)
    return h


def summary_ms(h: HdrHistogram) -> dict:
    """count, mean, P50/P90/P99/P99.9 and max in milliseconds (None when the histogram is empty)."""
    n = h.get_total_count()
    out: dict = {"count": n}
    if n == 0:
        out.update({"mean": None, **{_pkey(p): None for p in PERCENTILES}, "max": None})
        return out
    out["mean"] = h.get_mean_value() / 1e3
    for p in PERCENTILES:
        out[_pkey(p)] = h.get_value_at_percentile(p) / 1e3
    out["max"] = h.get_max_value() / 1e3
    return out


def _pkey(p: float) -> str:
    return f"p{p:g}"


def percentile_curve(h: HdrHistogram, points: int = 60) -> list[dict]:
    """Latency (ms) at percentiles spaced evenly in log(1/(1-p)), up to the resolution the count allows, then max."""
    n = h.get_total_count()
    if n == 0:
        return []
    top = max(1.0, math.log10(n))  # beyond 1/(1-p) = n every percentile is the max
    out = []
    for i in range(points):
        x = top * i / (points - 1)
        p = 100.0 * (1.0 - 10.0 ** -x)
        out.append({"percentile": p, "latency_ms": h.get_value_at_percentile(p) / 1e3})
    out.append({"percentile": 100.0, "latency_ms": h.get_max_value() / 1e3})
    return out


# ---------------------------------------------------------------- merging worker exports

@dataclass
class Merged:
    """Everything the workers measured, added up."""
    ok: HdrHistogram = field(default_factory=new_hist)           # measured window, OK responses
    all: HdrHistogram = field(default_factory=new_hist)          # measured window, OK + gRPC errors
    lag: HdrHistogram = field(default_factory=new_hist)          # actual send - scheduled send, all requests
    scheduled: int = 0          # requests scheduled in the measured window
    ok_in_window: int = 0       # OK completions whose completion time fell inside the measured window
    errors: Counter = field(default_factory=Counter)           # measured window, by status code name
    kinds: dict = field(default_factory=dict)                  # name -> {"count", "ok", "errors", "hist"}
    seconds: dict = field(default_factory=dict)                # second -> {"hist", "sent", "ok", "errors"}
    sent_total: int = 0         # incl. warm-up and drain
    workers: int = 0
    uvloop: bool = False


def merge(exports: list[dict]) -> Merged:
    m = Merged()
    for e in exports:
        m.workers += 1
        m.uvloop = m.uvloop or bool(e.get("uvloop"))
        m.ok.decode_and_add(e["ok"]) if e["ok"] else None
        m.all.decode_and_add(e["all"]) if e["all"] else None
        m.lag.decode_and_add(e["lag"]) if e["lag"] else None
        m.scheduled += e["scheduled"]
        m.ok_in_window += e["ok_in_window"]
        m.sent_total += e["sent_total"]
        m.errors.update(e["errors"])
        for name, k in e["kinds"].items():
            mk = m.kinds.setdefault(name, {"count": 0, "ok": 0, "errors": Counter(), "hist": new_hist()})
            mk["count"] += k["count"]
            mk["ok"] += k["ok"]
            mk["errors"].update(k["errors"])
            if k["hist"]:
                mk["hist"].decode_and_add(k["hist"])
        for sec, b in e["seconds"].items():
            mb = m.seconds.setdefault(sec, {"hist": new_hist(), "sent": 0, "ok": 0, "errors": 0})
            mb["sent"] += b["sent"]
            mb["ok"] += b["ok"]
            mb["errors"] += b["errors"]
            if b["hist"]:
                mb["hist"].decode_and_add(b["hist"])
    return m


def seconds_summary(m: Merged, spans: list[tuple[int, int]]) -> dict:
    """Latency summary (OK responses) and error count over the seconds [a, b) of each span, merged."""
    h, errors, secs = new_hist(), 0, set()
    for a, b in spans:
        secs.update(range(a, b))
    for sec in secs:
        bucket = m.seconds.get(sec)
        if bucket is not None:
            h.add(bucket["hist"])
            errors += bucket["errors"]
    return {**summary_ms(h), "errors": errors, "seconds": len(secs)}


def build_results(m: Merged, *, config: dict, label: str, started_at: str, duration_s: float,
                  warmup_s: float) -> dict:
    """The ``results.json`` document (without ``slo``, which the caller adds)."""
    err_total = sum(m.errors.values())
    timeseries = []
    for sec in sorted(m.seconds):
        b = m.seconds[sec]
        phase = "warmup" if sec < 0 else ("measured" if sec < duration_s else "drain")
        h = b["hist"]
        has = h.get_total_count() > 0
        timeseries.append({
            "t_s": sec, "phase": phase, "sent": b["sent"], "completed": b["ok"], "errors": b["errors"],
            "throughput_qps": b["ok"],
            "p50_ms": h.get_value_at_percentile(50) / 1e3 if has else None,
            "p99_ms": h.get_value_at_percentile(99) / 1e3 if has else None,
            "max_ms": h.get_max_value() / 1e3 if has else None,
        })
    return {
        "label": label,
        "started_at": started_at,
        "config": config,
        "window": {"warmup_s": warmup_s, "duration_s": duration_s},
        "workers": m.workers,
        "uvloop": m.uvloop,
        "requests": {"scheduled": m.scheduled, "completed_ok": m.ok.get_total_count(), "errors": err_total,
                     "ok_in_window": m.ok_in_window, "sent_total_incl_warmup": m.sent_total},
        "offered_qps": m.scheduled / duration_s,
        "achieved_qps": m.ok_in_window / duration_s,
        "latency_ms": summary_ms(m.ok),
        "latency_ms_incl_errors": summary_ms(m.all),
        "client_lag_ms": summary_ms(m.lag),
        "errors": {"total": err_total, "rate": err_total / m.scheduled if m.scheduled else 0.0,
                   "by_code": dict(sorted(m.errors.items()))},
        "kinds": {name: {"count": k["count"], "ok": k["ok"], "errors": dict(sorted(k["errors"].items())),
                         "latency_ms": summary_ms(k["hist"])} for name, k in sorted(m.kinds.items())},
        "percentile_curve": percentile_curve(m.ok),
        "timeseries": timeseries,
    }


# ---------------------------------------------------------------- SLO, table, plot

def slo_violations(results: dict, *, p99_ms: float | None, error_budget: float | None) -> list[str]:
    """Human-readable reasons the run broke its SLO (empty: passed or no SLO asked for)."""
    out = []
    if p99_ms is not None:
        p99 = results["latency_ms"]["p99"]
        if p99 is None:
            out.append(f"P99 undefined (no successful requests) with --slo-p99-ms {p99_ms:g}")
        elif p99 > p99_ms:
            out.append(f"P99 {p99:.2f} ms > SLO {p99_ms:g} ms")
    if error_budget is not None:
        rate = results["errors"]["rate"]
        if rate > error_budget:
            out.append(f"error rate {rate:.4%} > budget {error_budget:.4%} ({results['errors']['by_code']})")
    return out


def _f(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_table(r: dict) -> str:
    lat = r["latency_ms"]
    lines = [
        f"run {r['label']!r}: offered {r['offered_qps']:.1f} QPS, achieved {r['achieved_qps']:.1f} QPS over "
        f"{r['window']['duration_s']:g} s (warm-up {r['window']['warmup_s']:g} s), {r['workers']} worker(s)",
        f"{'kind':<12}{'count':>9}{'ok':>9}{'p50':>9}{'p90':>9}{'p99':>9}{'p99.9':>9}{'max':>9}  (ms)",
        f"{'ALL':<12}{r['requests']['scheduled']:>9}{lat['count']:>9}{_f(lat['p50']):>9}{_f(lat['p90']):>9}"
        f"{_f(lat['p99']):>9}{_f(lat['p99.9']):>9}{_f(lat['max']):>9}",
    ]
    for name, k in r["kinds"].items():
        kl = k["latency_ms"]
        lines.append(f"{name:<12}{k['count']:>9}{k['ok']:>9}{_f(kl['p50']):>9}{_f(kl['p90']):>9}"
                     f"{_f(kl['p99']):>9}{_f(kl['p99.9']):>9}{_f(kl['max']):>9}")
    e = r["errors"]
    lines.append(f"errors: {e['total']} ({e['rate']:.3%})" + (f" {e['by_code']}" if e["by_code"] else ""))
    lag = r["client_lag_ms"]
    lines.append(f"client send lag: p99 {_f(lag['p99'])} ms, max {_f(lag['max'])} ms"
                 + ("  << client could not keep up; latencies include it" if (lag["p99"] or 0) > 5 else ""))
    cpu = r.get("client_cpu", {}).get("ms_per_request")
    if cpu is not None:
        lines.append(f"client CPU: {cpu:.3f} ms per request sent (on the cores a local server shares with it)")
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    ts = [t for t in r["timeseries"] if t["p50_ms"] is not None]
    x = [t["t_s"] + 0.5 for t in ts]
    a.plot(x, [t["p50_ms"] for t in ts], ".-", label="P50")
    a.plot(x, [t["p99_ms"] for t in ts], ".-", label="P99")
    if r["window"]["warmup_s"] > 0:
        a.axvspan(-r["window"]["warmup_s"], 0, color="0.9", label="warm-up")
    a.axvline(r["window"]["duration_s"], color="0.6", ls=":")
    a.set_xlabel("seconds since measured start (by completion)")
    a.set_ylabel("latency from scheduled send, ms")
    a.set_yscale("log")
    a.set_title(f"{r['label']}: latency per second")
    a2 = a.twinx()
    tsx = [t["t_s"] for t in r["timeseries"]]
    if tsx:
        tsx.append(tsx[-1] + 1)
        for key, color, name in (("throughput_qps", "tab:green", "OK/s"), ("errors", "tab:red", "errors/s")):
            ys = [t[key] for t in r["timeseries"]]
            if key == "throughput_qps" or any(ys):
                a2.step(tsx, ys + ys[-1:], where="post", color=color, alpha=0.45, label=name)
    a2.set_ylabel("per second (by completion)", color="tab:green")
    h1, l1 = a.get_legend_handles_labels()
    h2, l2 = a2.get_legend_handles_labels()
    a.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)

    curve = [c for c in r["percentile_curve"] if c["percentile"] < 100.0]
    if curve:
        b.plot([1.0 / (1.0 - c["percentile"] / 100.0) for c in curve], [c["latency_ms"] for c in curve], "-")
        b.set_xscale("log")
        ticks = [1, 2, 10, 100, 1000, 10_000, 100_000, 1_000_000]
        top = 1.0 / (1.0 - curve[-1]["percentile"] / 100.0)
        ticks = [t for t in ticks if t <= top * 1.01] or [1]
        b.set_xticks(ticks, [f"{100 * (1 - 1 / t):g}%" for t in ticks])
    lat = r["latency_ms"]
    b.set_xlabel("percentile")
    b.set_ylabel("latency, ms")
    b.set_title(f"latency by percentile (n={lat['count']}, max {_f(lat['max'])} ms)\n"
                f"offered {r['offered_qps']:.0f} QPS, achieved {r['achieved_qps']:.0f} QPS", fontsize=10)
    b.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def paired_differences(diffs: list[float], *, resamples: int = 4000, seed: int = 0) -> dict:
    """What a list of paired differences (a configuration minus the baseline, one per interleaved round) says:
    their median, a 95 % bootstrap interval of the median (resampling the rounds, seeded), how many rounds went
    each way, and the exact two-sided sign-test p-value (ties dropped). On a machine whose speed moves from minute to
    minute a median alone reads as a result; an interval that spans 0 says the rounds do not show one. With few rounds
    (under ~6) the interval is little more than the rounds' own spread: read the sign test (3 of 3 one way: p 0.25)."""
    import random
    import statistics

    if not diffs:
        raise ValueError("paired_differences needs at least one difference")
    rng = random.Random(seed)
    n = len(diffs)
    medians = sorted(statistics.median(rng.choices(diffs, k=n)) for _ in range(resamples))
    lower, higher = sum(d < 0 for d in diffs), sum(d > 0 for d in diffs)
    m = lower + higher
    tail = sum(math.comb(m, i) for i in range(min(lower, higher) + 1)) / 2 ** m if m else 1.0
    return {"n": n, "median": statistics.median(diffs),
            "ci95": [medians[int(0.025 * (resamples - 1))], medians[int(0.975 * (resamples - 1))]],
            "lower": lower, "higher": higher, "sign_test_p": min(1.0, 2 * tail)}
