"""`python -m benchmarks.dashboard`: the Grafana dashboard's panels drawn from a real Prometheus.

Grafana does not install here, so the dashboard (deploy/observability/grafana-dashboard.json) is rendered by
running each panel's PromQL, as written there, over a time range against a Prometheus and drawing one
matplotlib subplot per panel into OUT/dashboard.png. The only rewrite is Grafana's `$__rate_interval`, given
a fixed window (--rate-interval).

    python -m benchmarks.dashboard --prometheus http://127.0.0.1:9090 --out DIR [--minutes 30]
    python -m benchmarks.dashboard --demo --out DIR [--demo-seconds 90]

--demo starts everything itself in a temporary directory: a trained tiny engine, `livetower serve`,
`livetower train --tiny` beside it (new engines -> canaries -> promotions), a local Prometheus scraping both
every second with deploy/observability/prometheus-rules.yml loaded, and a Recommend + LogEvents load; then it
renders the run. LocalPrometheus is also what tests/test_observability.py runs.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from benchmarks.processes import free_port, start_server, start_trainer, stop_server

OBSERVABILITY = Path(__file__).resolve().parent.parent / "deploy" / "observability"
DASHBOARD = OBSERVABILITY / "grafana-dashboard.json"
RULES = OBSERVABILITY / "prometheus-rules.yml"
RATE_INTERVAL = "$__rate_interval"


@dataclass(frozen=True, slots=True)
class Panel:
    title: str
    unit: str                           # Grafana unit id: "s", "percentunit", "reqps", "short", "none"
    targets: tuple[tuple[str, str], ...]  # (PromQL as in the dashboard, legend format with {{label}})


def load_panels(path: Path = DASHBOARD) -> list[Panel]:
    dash = json.loads(path.read_text())
    return [Panel(p["title"], p.get("fieldConfig", {}).get("defaults", {}).get("unit", "short"),
                  tuple((t["expr"], t.get("legendFormat", "")) for t in p["targets"]))
            for p in dash["panels"]]


def promql(expr: str, rate_interval: str) -> str:
    """The dashboard's expression as Prometheus runs it: Grafana's $__rate_interval made a fixed window."""
    return expr.replace(RATE_INTERVAL, rate_interval)


def metric_names(expr: str) -> set[str]:
    """The livetower_* metric names an expression reads."""
    return set(re.findall(r"\blivetower_[a-z0-9_]+", expr))


class LocalPrometheus:
    """A real Prometheus (Debian's /usr/bin/prometheus) on a free loopback port with its own data dir,
    scraping `targets` ({job: ["host:port", ...]}) every scrape_interval; stopped (and waited for) on exit."""

    def __init__(self, work: Path, targets: dict[str, list[str]], *, scrape_interval: str = "1s",
                 rule_files: tuple[Path, ...] = (), binary: str = "prometheus") -> None:
        self.work, self.port = work, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        work.mkdir(parents=True, exist_ok=True)
        config = {"global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
                  "rule_files": [str(p) for p in rule_files],
                  "scrape_configs": [{"job_name": job, "static_configs": [{"targets": hosts}]}
                                     for job, hosts in targets.items()]}
        (work / "prometheus.yml").write_text(json.dumps(config, indent=1))  # JSON is YAML
        self.log_path = work / "prometheus.log"
        self.proc: subprocess.Popen | None = None
        self.binary = binary

    def __enter__(self) -> LocalPrometheus:
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.work / 'prometheus.yml'}", f"--storage.tsdb.path={self.work / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d"],
            stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                if urllib.request.urlopen(f"{self.url}/-/ready", timeout=2).status == 200:
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"prometheus did not become ready; see {self.log_path}")
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def api(self, path: str, **params) -> dict:
        return prom_api(self.url, path, **params)

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]


def prom_api(url: str, path: str, **params) -> dict:
    """GET /api/v1/<path>; the decoded "data", or RuntimeError with Prometheus's error (bad PromQL: 400)."""
    try:
        body = json.loads(urllib.request.urlopen(f"{url}/api/v1/{path}?{urllib.parse.urlencode(params)}",
                                                 timeout=30).read())
    except urllib.error.HTTPError as e:
        body = json.loads(e.read() or b"{}")
    if body.get("status") != "success":
        raise RuntimeError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]


def _legend(fmt: str, labels: dict) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or str(labels)


_SCALE = {"s": (1e3, "ms"), "percentunit": (100.0, "%"), "reqps": (1.0, "per second")}


def render(url: str, out: Path, *, start: float, end: float, step: float, rate_interval: str,
           panels: list[Panel] | None = None) -> Path:
    """Every panel's queries over [start, end] drawn into out/dashboard.png; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = panels if panels is not None else load_panels()
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(16, 3.6 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        scale, ylabel = _SCALE.get(panel.unit, (1.0, ""))
        drawn, right = 0, None
        for expr, legend in panel.targets:
            # the dashboard puts a target named "... (right axis)" on a right axis in its own unit
            on_right = "(right axis)" in legend
            if on_right and right is None:
                right = ax.twinx()
                right.tick_params(labelsize=7)
            for series in prom_api(url, "query_range", query=promql(expr, rate_interval), start=start, end=end,
                                   step=step)["result"]:
                t = [float(ts) - start for ts, _ in series["values"]]
                v = [float(x) * (1.0 if on_right else scale) for _, x in series["values"]]
                (right if on_right else ax).plot(t, v, label=_legend(legend, series["metric"]), lw=1.3,
                                                 color=f"C{drawn % 10}")
                drawn += 1
        if right is not None:
            right.legend(fontsize=6, loc="upper right")
        ax.set_title(panel.title, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=6, loc="upper left")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("seconds from start of range", fontsize=8)
    fig.suptitle(f"livetower dashboard: {len(panels)} panels from {url} (rate window {rate_interval}, step {step:g}s)")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "dashboard.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _load(port: int, stop: threading.Event, rate: float, counts: dict) -> None:
    """Recommend (and a LogEvents every 10th call) at about `rate` per second until stop."""
    import grpc

    from contracts.client import Client

    client = Client(f"127.0.0.1:{port}")
    i = 0
    try:
        while not stop.is_set():
            t0 = time.monotonic()
            user = f"user-{i % 150}"
            try:
                client.recommend(user, k=10)
                if i % 10 == 0:
                    client.log_event(user, f"item-{(i * 7) % 300}")
                counts["ok"] += 1
            except grpc.RpcError as e:
                counts[e.code().name] = counts.get(e.code().name, 0) + 1
            i += 1
            time.sleep(max(0.0, 1 / rate - (time.monotonic() - t0)))
    finally:
        client.close()


def _trained_data_dir(data: Path) -> None:
    """Synthetic events and engine v1, trained in-process (the tests' tiny config)."""
    from contracts.eventlog import SqliteEventLog
    from contracts.registry import Registry
    from trainer.config import TrainConfig
    from trainer.data.synthetic import SyntheticConfig, generate
    from trainer.loop import Trainer

    log = SqliteEventLog(data / "events.sqlite")
    log.append(list(generate(SyntheticConfig(n_users=200, n_items=300, n_clusters=10, events_per_user=20, seed=3))))
    result = Trainer(TrainConfig.tiny_debug(), log, Registry(data / "registry"), data / "trainer").run_round()
    log.close()
    if result is None or not result.published_version:
        raise RuntimeError(f"the demo's first round published nothing: {result}")


def demo(out: Path, seconds: float, rate: float) -> Path:
    with tempfile.TemporaryDirectory(prefix="livetower-dashboard-") as tmp:
        work = Path(tmp)
        data = work / "data"
        data.mkdir()
        print("training engine v1 ...", flush=True)
        _trained_data_dir(data)
        metrics_port = free_port()
        server, port = start_server(data, [], work / "server.log", metrics_port=metrics_port)
        trainer = None
        try:
            trainer, trainer_port = start_trainer(data, ["--tiny"], work / "trainer.log")
            targets = {"livetower-server": [f"127.0.0.1:{metrics_port}"],
                       "livetower-trainer": [f"127.0.0.1:{trainer_port}"]}
            with LocalPrometheus(work / "prometheus", targets, rule_files=(RULES,)) as prom:
                stop, counts = threading.Event(), {"ok": 0}
                load = threading.Thread(target=_load, args=(port, stop, rate, counts), daemon=True)
                start = time.time()
                print(f"load {rate:g}/s for {seconds:g}s; prometheus {prom.url}", flush=True)
                load.start()
                time.sleep(seconds)
                stop.set()
                load.join(30)
                time.sleep(2)  # a last scrape
                end = time.time()
                print(f"calls: {counts}", flush=True)
                alerts = sorted({(a["labels"]["alertname"], a["state"]) for a in prom.api("alerts")["alerts"]})
                print(f"alerts at the end (pending: waiting out their for:): {alerts or 'none'}", flush=True)
                path = render(prom.url, out, start=start, end=end, step=1.0, rate_interval="15s")
                shutil.copy(work / "server.log", out / "server.log")
                shutil.copy(work / "trainer.log", out / "trainer.log")
                return path
        finally:
            if trainer is not None:
                stop_server(trainer, grace_s=20)
            stop_server(server, grace_s=20)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.dashboard", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prometheus", help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    ap.add_argument("--out", type=Path, default=Path("bench-results/dashboard"), help="output directory")
    ap.add_argument("--minutes", type=float, default=30.0, help="range to draw, ending now (with --prometheus)")
    ap.add_argument("--rate-interval", default="1m", help="window given to $__rate_interval (with --prometheus)")
    ap.add_argument("--demo", action="store_true", help="start server, trainer, Prometheus and load; render that")
    ap.add_argument("--demo-seconds", type=float, default=90.0, help="length of the demo's load")
    ap.add_argument("--demo-rate", type=float, default=50.0, help="the demo's Recommend calls per second")
    args = ap.parse_args(argv)
    if args.demo:
        path = demo(args.out, args.demo_seconds, args.demo_rate)
    elif args.prometheus:
        end = time.time()
        start = end - args.minutes * 60
        path = render(args.prometheus.rstrip("/"), args.out, start=start, end=end,
                      step=max(1.0, args.minutes * 60 / 300), rate_interval=args.rate_interval)
    else:
        ap.error("give --prometheus URL or --demo")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
