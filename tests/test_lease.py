"""The decision lease (server/engine/lease.py): one replica decides at a time, another takes over when it
lapses, and a holder that paused past its lease cannot decide after its successor."""

from __future__ import annotations

import functools
import time

import pytest

from benchmarks.swap import stage
from contracts.registry import Registry
from contracts.rollout import CanaryPolicy, RolloutError, RolloutState
from server.engine.manager import EngineManager, EngineManagerConfig


@pytest.fixture
def managers(trained_dir):
    """make(lease_s) -> (registry, a, b): two candidate replicas on one registry; their shadow threads are
    stopped after the test (a torch call on a daemon thread at interpreter exit aborts the process)."""
    made = []

    def make(lease_s: float = 0.6):
        reg = Registry(trained_dir / "registry")
        reg.write_rollout(RolloutState(stable=1, policy=CanaryPolicy(mode="manual")))
        cfg = dict(warmup_calls=0, lease_s=lease_s)
        made.extend([EngineManager(reg, EngineManagerConfig(replica_id="a", **cfg)),
                     EngineManager(reg, EngineManagerConfig(replica_id="b", **cfg))])
        return reg, made[-2], made[-1]

    yield make
    for m in made:
        m.close()


def test_one_holder_then_a_takeover_when_it_lapses(managers):
    reg, a, b = managers(lease_s=1.5)  # 0.6 s lapsed between two polls 0.25 s apart on a loaded 2-core machine
    a.poll_once()
    a.keep_lease()  # renew: the first poll's engine load can outlast the lease on a loaded machine (CI failed so)
    b.poll_once()
    assert a.leading and not b.leading and reg.read_rollout().leader == "a"
    for _ in range(3):  # a renews at half-life: b never gets it while a polls
        time.sleep(0.25)
        a.poll_once()
        b.poll_once()
        assert a.leading and not b.leading
    time.sleep(1.7)  # a stops polling (dead, hung or cut off): its lease lapses
    b.poll_once()
    st = reg.read_rollout()
    assert b.leading and st.leader == "b"
    lead = st.history[-1]
    assert lead.action == "lead" and lead.replica == "b" and "from a" in lead.reason, lead
    a.poll_once()  # back: it sees the new holder and does not take the lease back
    assert not a.leading and reg.read_rollout().leader == "b"


def test_a_holder_that_paused_past_its_lease_cannot_decide(managers):
    reg, a, b = managers()
    v2 = reg.publish(*stage(reg, 1, reg))
    a.poll_once()
    a.start_canary(v2, 0.5)
    b.poll_once()  # follows the canary
    assert b.canary is not None and b.canary.version == v2
    time.sleep(0.7)  # a pauses past its lease; b takes it and decides first
    b.poll_once()
    assert b.leading
    b.rollback(actor="auto", reason="b decided", expect=v2)
    a.poll_once()  # a follows: the canary is gone
    assert a.canary is None
    # a decision a had computed before its pause, applied now, is refused by the fence and changes nothing
    a.leading = True
    with pytest.raises(RolloutError, match="no longer holds the decision lease"):
        a._mutate(lambda st: st.record("promote", v2, "auto", "stale decision"), "auto")
    st = reg.read_rollout()
    assert [e.action for e in st.history if e.version == v2] == ["canary", "rollback"]
    assert [e.replica for e in st.history if e.version == v2] == ["a", "b"]  # who decided


def test_merged_report_matches_the_replicas_own_figures():
    import numpy as np

    from server.engine.canary import CanaryStats
    from server.engine.fleet_stats import fresh, merged_figures, report

    rng = np.random.default_rng(1)
    a, b, both = CanaryStats(), CanaryStats(), CanaryStats()
    for st, scale in ((a, 0.002), (b, 0.004)):
        for x in rng.exponential(scale, 2000):
            for target in (st, both):
                target.observe(True, float(x), error=False)
                target.observe(False, float(x) * 0.9, error=False)
        st.observe(True, 0.0, error=True)
        both.observe(True, 0.0, error=True)
    merged = merged_figures(fresh([report(a, "a", 7), report(b, "b", 7), report(b, "old", 6)], 7))
    exact = both.figures()
    for key in ("canary_requests", "stable_requests", "canary_errors"):
        assert merged[key] == exact[key], key
    assert merged["canary_p99_ms"] == pytest.approx(exact["canary_p99_ms"], rel=0.04)  # one ~3 % bucket
    assert merged["p99_ratio"] == pytest.approx(exact["p99_ratio"], rel=0.06)
    # the third-slowest canary request, read as its bucket's lower edge: within one ~3 % bucket below the exact one
    assert 0.96 * exact["canary_tail_floor_ms"] <= merged["canary_tail_floor_ms"] <= exact["canary_tail_floor_ms"]


def test_the_lease_holder_judges_the_canary_on_every_replicas_traffic(managers):
    """a's own traffic on the canary is healthy; b's saw it fail. a holds the lease and rolls it back on the
    merged evidence (judged on its own, it would have promoted)."""
    reg, a, b = managers(lease_s=30.0)
    policy = CanaryPolicy(mode="auto", min_duration_s=0.0, min_requests=20, shadow_samples=1, max_error_rate=0.05)
    reg.update_rollout(lambda st: setattr(st, "policy", policy))
    v2 = reg.publish(*stage(reg, 1, reg))
    a.poll_once()  # takes the lease and auto-canaries v2
    b.poll_once()
    assert a.leading and not b.leading and a.canary.version == v2 == b.canary.version
    for _ in range(200):
        a.stats.observe(True, 0.002, error=False)
        a.stats.observe(False, 0.002, error=False)
        b.stats.observe(False, 0.002, error=False)
    for _ in range(40):
        b.stats.observe(True, 0.002, error=False)
        b.stats.observe(True, 0.0, error=True)
    a.stats.add_shadow(0.9, [0.5] * 10, [0.5] * 10, 0.001, 0.001)
    b.analyse_once()  # publishes b's report (b does not decide)
    assert reg.read_rollout().canary == v2
    a.analyse_once()
    st = reg.read_rollout()
    assert st.canary == 0 and v2 in st.rolled_back and "error rate" in st.rolled_back[v2], st.rolled_back
    assert st.history[-1].replica == "a" and st.history[-1].actor == "auto"


def test_every_replica_prefetches_a_publish_and_follows_its_canary_by_a_swap(managers):
    reg, a, b = managers(lease_s=60.0)  # a keeps the lease however slow the machine: b only follows
    a.poll_once()
    b.poll_once()
    v2 = reg.publish(*stage(reg, 1, reg))
    b.poll_once()
    assert b.standby is None  # manual mode: a publish may never be canaried, so it is not loaded ahead
    reg.update_rollout(lambda st: setattr(st, "policy", CanaryPolicy(mode="auto")))
    b.poll_once()
    standby = b.standby
    assert standby is not None and standby.version == v2  # loaded and checked before any decision
    a.start_canary(v2, 0.5)
    b.poll_once()
    assert b.canary is standby and b.standby is None  # followed by a reference swap, no load
    a.rollback(reason="test")
    b.poll_once()
    assert b.canary is None and b.standby is None  # a rolled-back version is not kept loaded


def test_a_small_step_is_not_prefetched(managers):
    """Short rounds publish a small step every few seconds; most are superseded before their canary, so loading
    each ahead cost a load apiece for nothing (server/engine/canary_control.py _small_step_pending)."""
    reg, a, b = managers(lease_s=60.0)
    reg.update_rollout(lambda st: setattr(st, "policy", CanaryPolicy(mode="auto")))
    a.poll_once()
    staging, manifest = stage(reg, 1, reg)
    manifest.graph_version = 1  # weights for engine 1's graph (as a refit's manifest says)...
    manifest.trained_events += 50  # ...trained on 50 events more: a small step
    v2 = reg.publish(staging, manifest)
    b.poll_once()
    assert b.standby is None and v2 in b.pending_versions() and b._small_step_pending(v2)
    reg.update_rollout(lambda st: setattr(st, "policy", CanaryPolicy(mode="auto", small_step_events=-1)))
    b.poll_once()
    assert not b._small_step_pending(v2)  # small steps off: prefetched like any publish


def test_hit_rates_are_added_over_every_replicas_reports(managers):
    from server.engine.fleet_stats import fleet_outcomes

    reg, a, b = managers()
    fleet_outcomes(reg, "b", 1000, {("canary", 2): (40, 4), ("stable", 1): (160, 8)}, leading=False)
    reg.write_report("outcomes-1000/torn.json", b"{not json")  # not evidence, not an error
    fleet_outcomes(reg, "a", 1000, {("canary", 2): (10, 1)}, leading=False)
    # a's newer counts for the window replace its older ones; b's stay (its impressions were served)
    merged = fleet_outcomes(reg, "a", 1000, {("canary", 2): (60, 6), ("stable", 1): (240, 12)}, leading=True)
    assert merged == {("canary", 2): (100, 10), ("stable", 1): (400, 20)}
    assert fleet_outcomes(reg, "a", 2000, {("canary", 3): (5, 0)}, leading=True) == {("canary", 3): (5, 0)}


def load_as_refit(registry, version, config):
    """EngineManager loader for engines staged as copies of engine 1 (torch backend) whose manifests say they are
    refits (graph_version set): loaded as the copies they are, judged as the refits their manifests say."""
    from proto import livetower_v1_pb2 as pb
    from server.engine.engine import Engine

    manifest = registry.read_manifest(version)
    plain = pb.EngineManifest()
    plain.CopyFrom(manifest)
    plain.graph_version = 0
    engine = Engine.load(registry.engine_dir(version), plain)
    engine.manifest = manifest
    return engine


def publish_refit(reg: Registry, trained: int, graph: int = 1) -> int:
    """A copy of engine 1 published as a refit of `graph` (0: not a refit) trained on `trained` events more."""
    staging, manifest = stage(reg, 1, reg)
    manifest.graph_version, manifest.trained_events = graph, manifest.trained_events + trained
    return reg.publish(staging, manifest)


def test_small_steps_published_within_the_interval_wait_and_only_the_newest_is_loaded(trained_dir):
    """CanaryPolicy.small_step_interval_s: a short round's refit published less than the interval after the last
    canary began is not canaried (nor loaded) yet; when the interval is over the newest one is, and the ones
    published in between are never loaded. A publish that is not a small step does not wait."""
    reg = Registry(trained_dir / "registry")
    reg.write_rollout(RolloutState(stable=1, policy=CanaryPolicy(mode="auto", small_step_interval_s=30.0)))
    loads = []
    m = EngineManager(reg, EngineManagerConfig(replica_id="a", warmup_calls=0, lease_s=60.0), loader=load_as_refit,
                      on_event=lambda kind, v, _: loads.append(v) if kind == "load" else None)
    try:
        m.poll_once()
        publish = functools.partial(publish_refit, reg)
        v2 = publish(50)
        m.poll_once()  # no canary began before: at once
        assert m.canary.version == v2
        m.promote(reason="test")
        v3, v4 = publish(100), publish(150)
        m.poll_once()
        assert m.canary is None and m.standby is None and v3 not in loads and v4 not in loads  # within 30 s
        m.canary_started -= 31.0  # the interval is over
        m.poll_once()
        assert m.canary.version == v4 and v3 not in loads
        m.promote(reason="test")
        v5 = publish(200, graph=0)  # recompiled (a full round's engine): not a small step
        m.poll_once()
        assert m.canary.version == v5  # at once, though a canary began just now
    finally:
        m.close()


def test_a_refit_of_a_graph_this_process_serves_is_warmed_up_briefly(trained_dir, monkeypatch):
    """EngineManagerConfig.refit_warmup_calls: a refit of the compiled graph a serving engine runs gets the short
    warm-up; a full engine, and a refit of a graph nothing here runs, the full one."""
    from server.engine.engine import Engine

    warmed = []
    monkeypatch.setattr(Engine, "warm_up", lambda self, calls: warmed.append((self.version, calls)) or 0.0)
    reg = Registry(trained_dir / "registry")
    reg.write_rollout(RolloutState(stable=1, policy=CanaryPolicy(mode="manual")))
    m = EngineManager(reg, EngineManagerConfig(warmup_calls=20, refit_warmup_calls=2), loader=load_as_refit)
    try:
        m.poll_once()
        v2, v3 = publish_refit(reg, 50), publish_refit(reg, 50, graph=99)
        m.load_verified(v2)
        m.load_verified(v3)
        assert warmed == [(1, 20), (v2, 2), (v3, 20)]
    finally:
        m.close()
    with pytest.raises(ValueError, match="refit_warmup_calls"):
        EngineManagerConfig(refit_warmup_calls=-1)
