"""The server's Prometheus metrics stay bounded while engines come and go."""

from prometheus_client import generate_latest

from server.metrics import RETIRED_VERSIONS_KEPT, ServerMetrics


def _versions_exported(metrics: ServerMetrics, series: str = "livetower_request_seconds_count") -> set[str]:
    """The engine_version labels of one series in a scrape."""
    text = generate_latest(metrics.registry).decode()
    return {line.split('engine_version="', 1)[1].split('"', 1)[0] for line in text.splitlines()
            if line.startswith(series + "{")}


def test_latency_series_of_retired_versions_are_dropped_and_held_ones_kept():
    metrics = ServerMetrics()
    held = {3}
    metrics.watch_versions(lambda: set(held))
    metrics.latency.labels("Health", "").observe(0.001)  # requests answered without an engine
    for v in range(1, 41):  # short rounds: a new engine every few seconds, each served for a while
        metrics.on_engine_event("load", v, 0.01)
        metrics.latency.labels("Recommend", str(v)).observe(0.002)
        metrics.latency.labels("Score", str(v)).observe(0.002)
    newest = 40
    want = {"", "3", *(str(v) for v in range(newest - RETIRED_VERSIONS_KEPT, newest + 1))}
    assert _versions_exported(metrics) == want
    held.clear()  # stable 3 retires: its series go at the next load
    metrics.on_engine_event("load", 41, 0.01)
    assert "3" not in _versions_exported(metrics) and "41" not in _versions_exported(metrics)
    assert len(_versions_exported(metrics)) == RETIRED_VERSIONS_KEPT + 1  # 33..40 and ""


def test_outcome_gauges_follow_the_kept_versions():
    from contracts.attribution import Outcome

    metrics = ServerMetrics()
    metrics.watch_versions(lambda: {2})
    metrics.watch_outcomes(lambda: {("stable", v): Outcome(10, 1, 1, 1, 0, 0) for v in range(1, 31)})
    for v in range(1, 31):
        metrics.on_engine_event("load", v, 0.01)
    exported = _versions_exported(metrics, "livetower_outcome_impressions")
    assert exported == {str(v) for v in (2, *range(30 - RETIRED_VERSIONS_KEPT, 31))}
