"""deploy/observability/ for real: promtool checks and unit-tests the alerting rules, and a real Prometheus
scrapes a real server and trainer metrics endpoint and runs every dashboard query and rule."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import urllib.request

import pytest
import yaml
from prometheus_client import start_http_server

from benchmarks.dashboard import OBSERVABILITY, RULES, LocalPrometheus, load_panels, metric_names, promql
from tests.conftest import client_for, make_trainer, running_server, server_config, wait_for

needs_prometheus = pytest.mark.skipif(shutil.which("promtool") is None or shutil.which("prometheus") is None,
                                      reason="Debian package prometheus not installed (.ci/run installs it)")
TESTS = OBSERVABILITY / "prometheus-rules.test.yml"


def _alerts() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


def test_every_alert_is_complete_and_tested_both_ways():
    """Each alert has for:, a severity and both annotations, and the promtool tests assert it firing at
    some time and silent at another."""
    cases = [c for t in yaml.safe_load(TESTS.read_text())["tests"] for c in t["alert_rule_test"]]
    for rule in _alerts():
        name = rule["alert"]
        assert rule.get("for"), name
        assert rule["labels"]["severity"] in ("page", "ticket"), name
        assert {"summary", "description"} <= set(rule["annotations"]), name
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name}: no promtool case where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no promtool case where it stays silent"


@needs_prometheus
def test_promtool_checks_and_unit_tests_the_rules():
    check = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout
    unit = subprocess.run(["promtool", "test", "rules", str(TESTS)], capture_output=True, text=True, timeout=120)
    assert unit.returncode == 0, unit.stdout + unit.stderr
    assert "SUCCESS" in unit.stdout


@needs_prometheus
def test_promtool_unit_tests_can_fail(tmp_path):
    """The rule tests are not vacuous: the same tests against rules with a loosened threshold fail."""
    loose = RULES.read_text().replace("livetower_serving_freshness_seconds > 1800",
                                      "livetower_serving_freshness_seconds > 100")
    assert loose != RULES.read_text()
    (tmp_path / "prometheus-rules.yml").write_text(loose)
    shutil.copy(TESTS, tmp_path / TESTS.name)
    unit = subprocess.run(["promtool", "test", "rules", str(tmp_path / TESTS.name)], capture_output=True, text=True,
                          timeout=120)
    assert unit.returncode != 0
    assert "LivetowerFreshnessStale" in unit.stdout + unit.stderr


def test_dashboard_is_grafana_json_with_queries():
    panels = load_panels()
    assert len(panels) >= 10
    titles = " ".join(p.title for p in panels).lower()
    for what in ("p99", "shed", "freshness", "lag", "canary", "engine events", "stage"):
        assert what in titles, what
    for p in panels:
        assert p.targets, p.title
        for expr, _ in p.targets:
            assert "$" not in promql(expr, "1m"), f"{p.title}: a Grafana variable Prometheus cannot run: {expr}"


def _exported_names(text: str) -> set[str]:
    """Series names a /metrics text exposes, families without samples yet included (their # TYPE line)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
        elif line and not line.startswith("#"):
            names.add(line.split("{", 1)[0].split(" ", 1)[0])
    return names


@needs_prometheus
def test_prometheus_scrapes_server_and_runs_every_dashboard_query(trained_dir, tmp_path):
    """A real Prometheus scrapes a serving server and a trainer's endpoint every second: every dashboard
    expression runs, names only exported metrics, and the key panels have data; the rules load healthy."""
    t0 = time.monotonic()
    trainer = make_trainer(trained_dir)
    trainer.lag()  # what the loop exports before each round: the per-partition lag gauge
    httpd, _ = start_http_server(0, addr="127.0.0.1", registry=trainer.metrics.registry)
    trainer_target = f"127.0.0.1:{httpd.server_port}"
    stop = threading.Event()
    try:
        with running_server(server_config(trained_dir)) as (server, port):
            wait_for(lambda: server.manager.current is not None, 30, "engine 1 to load")
            client = client_for(server, port)
            client.recommend("user-1", k=10)  # the engine serves before Prometheus first scrapes

            def load() -> None:
                while not stop.is_set():
                    client.recommend("user-2", k=10)
                    client.log_event("user-2", "item-3")
                    time.sleep(0.02)

            sender = threading.Thread(target=load, daemon=True)
            sender.start()
            server_target = f"127.0.0.1:{server.metrics_port}"
            exported = _exported_names(
                urllib.request.urlopen(f"http://{server_target}/metrics", timeout=10).read().decode()
                + urllib.request.urlopen(f"http://{trainer_target}/metrics", timeout=10).read().decode())
            targets = {"livetower-server": [server_target], "livetower-trainer": [trainer_target]}
            with LocalPrometheus(tmp_path / "prom", targets, rule_files=(RULES,)) as prom:
                wait_for(lambda: len(prom.query('up{job=~"livetower.*"} == 1')) == 2, 15, "both targets up")
                p99 = promql(load_panels()[0].targets[0][0], "1m")  # P99 by engine version
                assert p99.startswith("histogram_quantile(0.99, sum by (engine_version, le)")
                wait_for(lambda: [r for r in prom.query(p99) if r["value"][1] != "NaN"], 15, "a P99 from two scrapes")

                for panel in load_panels():
                    for expr, _ in panel.targets:
                        missing = metric_names(expr) - exported
                        assert not missing, f"{panel.title}: {sorted(missing)} not exported"
                        prom.query(promql(expr, "1m"))  # RuntimeError on invalid PromQL

                (series,) = prom.query(p99)
                assert series["metric"]["engine_version"] == "1"
                assert 0 < float(series["value"][1]) <= 1.0
                assert float(prom.query("livetower_serving_engine_version")[0]["value"][1]) == 1
                assert prom.query('livetower_responses_total{method="Recommend", code="OK"}')
                assert prom.query('livetower_engine_stage_seconds_total{stage="tower"}')
                assert prom.query('livetower_shed_total{reason="queue_delay"}')  # every reason, zero included
                assert prom.query("livetower_trainer_consumer_lag_events")
                assert prom.query("livetower_serving_freshness_seconds > 0")
                assert prom.query('livetower_outcome_impressions{arm="stable", engine_version="1"} > 0')

                def evaluated():
                    groups = prom.api("rules")["groups"]
                    done = all(r["lastEvaluation"].startswith("20") for g in groups for r in g["rules"])
                    return groups if groups and done else None

                groups = wait_for(evaluated, 10, "every rule evaluated")
                rules = [r for g in groups for r in g["rules"]]
                assert {r["name"] for r in rules if r["type"] == "alerting"} == {a["alert"] for a in _alerts()}
                assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
                assert not [a for a in prom.api("alerts")["alerts"] if a["state"] == "firing"]
            proc = prom.proc
            stop.set()
            sender.join(10)
            client.close()
    finally:
        stop.set()
        httpd.shutdown()
        trainer.event_log.close()
    assert proc.poll() is not None, "prometheus still running"
    assert time.monotonic() - t0 < 20
