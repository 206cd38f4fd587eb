"""Short rounds (trainer/short_rounds.py): publish a small backlog in a second, commit nothing, and let the next
full round train, gate and commit the same events; and the server's small-step canary path."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from contracts.eventlog import SOURCE_KEY
from contracts.registry import Registry
from contracts.rollout import CanaryPolicy, RolloutState
from proto import livetower_v1_pb2 as pb
from server.engine.canary import CanaryStats, ShadowScorer, analyse, small_step
from tests.conftest import SMALL_DATA, make_trainer, stream_events

TOTAL = SMALL_DATA.n_users * SMALL_DATA.events_per_user
SHORT = dict(short_round_max_events=500, item_min_count=1)


def new_item_events(item: str, users: list[str], t0_ms: int) -> list[pb.Event]:
    return [pb.Event(event_id=f"{item}-{u}", user_id=u, item_id=item, action="click", weight=1.0,
                     timestamp_ms=t0_ms + i) for i, u in enumerate(users)]


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_short_round_publishes_without_committing_and_the_full_round_takes_the_buffer(trained_dir):
    t = make_trainer(trained_dir, **SHORT)
    assert t.state.model_published and t.state.published_version == 1
    before = state_of(t.model)
    users = [f"user-{i}" for i in range(40)]  # SMALL_DATA's users, with histories
    reg = Registry(trained_dir / "registry")
    t0 = reg.read_manifest(1).watermark_ms + 1000  # (events far past the data's time would expire its items)
    t.event_log.append(new_item_events("fresh", users, t0))

    r = t.run_short_round()
    assert r.gate == "short" and r.published_version == 2 and r.events == 40
    m = reg.read_manifest(2)
    assert m.eval_metrics["short_round"] == 1.0 and m.parent == 1
    assert dict(m.stream_offsets) == {SOURCE_KEY: TOTAL + 41} and m.trained_events == TOTAL + 40
    assert m.watermark_ms > reg.read_manifest(1).watermark_ms
    # Nothing committed, the main model untouched; the new item has a row the published engine scores.
    assert t.next_offset == TOTAL + 1 and t.state.trained_events == TOTAL
    for k, v in state_of(t.model).items():
        if k != "item_embedding.weight":  # the table may grow for the new item; its old rows must not move
            assert torch.equal(v, before[k]), k
    old_rows = before["item_embedding.weight"].shape[0]
    assert torch.equal(t.model.item_embedding.weight[:old_rows], before["item_embedding.weight"])
    assert "fresh" in t.vocab.row_of
    assert t.run_short_round() is None  # nothing new since

    t.event_log.append(new_item_events("fresh2", users[:20], t0 + 100))
    r2 = t.run_short_round()
    assert r2.published_version == 3 and len(t.read_ahead.events) == 60
    assert t.read_ahead.bases == {2: 1, 3: 1}  # both built on the full round's model
    assert reg.read_manifest(3).eval_metrics["short_round_events"] == 60

    # The full round trains the buffer (placed once: no second admission count) and commits past it.
    added = t.sketch.added
    full = t.run_round()
    assert full.events == 60 and t.next_offset == TOTAL + 61 and t.state.trained_events == TOTAL + 60
    assert t.sketch.added == added and not t.read_ahead.events
    assert full.published_version == 4 and reg.read_manifest(4).parent == 3  # refit of the newest engine


def test_the_fork_trains_only_the_new_events_and_the_model_is_left_alone(trained_dir):
    from trainer.short_rounds import Fork, train_fork, windows_after

    t = make_trainer(trained_dir, **SHORT)
    windows, users = windows_after({"user-0": [4]}, {"user-0": [5, 6], "user-1": [7]}, t.state.user_seqs,
                                   t.model.cfg.max_history)
    assert users == ["user-0", "user-1"]
    assert len(windows) == 2 and sorted(int(x) for w in windows for x in w[1][w[2]]) == [5, 6, 7]
    assert any(4 in w[0] for w in windows)  # the earlier buffered row is context, not a target
    before = state_of(t.model)
    fork = Fork.of(t.model, t.opt, t.cfg, 1, 0, 0, len(t.vocab))
    served = train_fork(fork, windows, [], item_prob_R=t._item_prob(), n_items=len(t.vocab), cfg=t.cfg, seed=1,
                        now_ms=0)
    assert all(torch.equal(v, before[k]) for k, v in t.model.state_dict().items())  # the model is not trained
    moved = (served.item_embedding.weight - fork.base_avg["item_embedding.weight"]).abs().sum(dim=1)
    assert moved[[5, 6, 7]].min() > 0  # the targets' own rows moved by the pass
    after_one = state_of(fork.model)
    train_fork(fork, windows[:1], [], item_prob_R=t._item_prob(), n_items=len(t.vocab), cfg=t.cfg, seed=2, now_ms=0)
    assert not torch.equal(fork.model.item_embedding.weight, after_one["item_embedding.weight"])  # passes add up
    rows = t.model.num_rows
    t.model.grow(rows + 3)
    with torch.no_grad():
        t.model.item_embedding.weight[rows:] = 1.0
    fork.grow(t.model)
    out = fork.served()
    assert out.num_rows == rows + 3 and bool((out.item_embedding.weight[rows:] == 1.0).all())


def test_short_rounds_run_between_the_steps_of_a_full_round(trained_dir):
    t = make_trainer(trained_dir, **SHORT, short_round_interval_s=0.01, epochs_per_round=3)
    t.event_log.append(stream_events(seed=30, n_users=60, events_per_user=8))
    assert t.run_short_round().published_version == 2  # the fork exists; the buffer holds 480 events
    extra = stream_events(seed=31, n_users=10, events_per_user=4)
    published = []

    def append_once(step):
        if step == 0:
            t.event_log.append(extra)  # arrives while the full round trains
        before = t.read_ahead.last_version
        Trainer._between_steps(t, step)
        if t.read_ahead.last_version != before:
            published.append((step, t.read_ahead.last_version))

    from trainer.loop import Trainer

    t._between_steps = append_once
    r = t.run_round()
    assert r.events == 480 and published, "no short round ran between the full round's steps"
    reg = Registry(trained_dir / "registry")
    m = reg.read_manifest(published[0][1])
    assert m.eval_metrics["short_round"] == 1.0 and m.trained_events == TOTAL + 480 + 40
    assert len(t.read_ahead.events) == 40 and t.read_ahead.placed == 0  # read during the round, placed later
    assert t.next_offset == TOTAL + 481 and t.read_ahead.fork is None  # committed: the fork is stale
    assert t.run_short_round().published_version > r.published_version  # a new fork of the new model


def test_short_rounds_also_run_during_the_fold_in_of_held_out_users(trained_dir):
    t = make_trainer(trained_dir, **SHORT)
    t.event_log.append(stream_events(seed=32, n_users=60, events_per_user=8))
    folding, calls = [], []
    fold_in = t._fold_in

    def tracked(split):
        folding.append(len(split.holdout))
        fold_in(split)
        folding.clear()

    t._fold_in = tracked
    t._between_steps = lambda step: calls.append(bool(folding))
    assert t.run_round().holdout_users > 0
    assert calls.count(True) >= 1 and calls.count(False) >= 1  # during the fold-in and during the training


def test_a_crash_loses_only_the_buffer_and_the_restart_reads_it_again(trained_dir):
    t = make_trainer(trained_dir, **SHORT)
    t.event_log.append(stream_events(seed=21, n_users=10, events_per_user=4))
    assert t.run_short_round().published_version == 2
    again = make_trainer(trained_dir, **SHORT)  # the process died: no checkpoint was written by the short round
    assert again.next_offset == TOTAL + 1 and not again.read_ahead.events
    r = again.run_round()
    assert r.events == 40 and again.next_offset == TOTAL + 41


def test_a_failed_gate_keeps_the_published_fork_and_never_forks_the_failed_model(trained_dir):
    t = make_trainer(trained_dir, **SHORT, gate_min_ratio=100.0)  # every gate fails
    t.event_log.append(stream_events(seed=22))
    assert t.run_round().gate == "failed" and not t.state.model_published
    assert t.read_ahead.fork is not None and t.read_ahead.fork.base_version == 1  # made from the published model
    t.event_log.append(stream_events(seed=23, n_users=5))
    t.last_short = float("-inf")  # the interval has passed
    assert t._short_round_due(backlog=40)
    r = t.run_short_round()  # short rounds go on from what serves
    assert r.published_version == 2 and t.read_ahead.bases == {2: 1}
    assert make_trainer(trained_dir, **SHORT).state.model_published is False  # checkpointed
    again = make_trainer(trained_dir, **SHORT, gate_min_ratio=100.0)  # a restart: the fork is gone with the process
    again.last_short = float("-inf")
    assert not again._short_round_due(backlog=40) and again.run_short_round() is None  # none of the failed model


def test_the_gate_compares_with_the_full_round_a_serving_short_engine_forked_from(trained_dir):
    """A short engine was trained on the events the next full round holds out; comparing with it would fail
    every gate. Its base (the full-round model) never saw them."""
    t = make_trainer(trained_dir, **SHORT)
    t.event_log.append(stream_events(seed=24))
    assert t.run_short_round().published_version == 2
    Registry(trained_dir / "registry").write_rollout(RolloutState(stable=2))
    r = t.run_round()
    assert r.metrics["gate_baseline_version"] == 1 and r.published_version == 3
    assert set(t.state.published_models) == {1, 3}


def test_short_rounds_are_off_by_default_and_validated():
    from trainer.config import TrainConfig

    assert TrainConfig().short_round_max_events == 0
    with pytest.raises(ValueError, match="short_round_max_events"):
        TrainConfig(short_round_max_events=-1)
    with pytest.raises(ValueError, match="short_round_epochs"):
        TrainConfig(short_round_epochs=0)


def manifest(version: int, graph: int, trained: int, parent: int = 0) -> pb.EngineManifest:
    return pb.EngineManifest(version=version, graph_version=graph, trained_events=trained, parent=parent)


def test_small_step_is_a_refit_of_stables_graph_with_few_more_events():
    policy = CanaryPolicy(small_step_events=1000)
    stable = manifest(5, 3, 10_000)
    assert small_step(manifest(6, 3, 10_400), stable, policy)
    assert small_step(manifest(6, 5, 10_400), manifest(5, 0, 10_000), policy)  # a refit of stable itself
    assert small_step(manifest(6, 0, 10_400), stable, policy) is None  # recompiled: its cost may differ
    assert small_step(manifest(6, 3, 11_001), stable, policy) is None  # too many events
    assert small_step(manifest(6, 3, 9_000), stable, policy) is None   # fewer events than stable, not its descendant
    # a descendant of stable behind it: a full round's engine after the short rounds it published meanwhile
    assert "behind" in small_step(manifest(6, 3, 9_400), stable, policy, descends=True)
    assert small_step(manifest(6, 3, 8_999), stable, policy, descends=True) is None  # too far behind
    assert small_step(manifest(6, 0, 9_400), stable, policy, descends=True) is None  # recompiled
    assert small_step(manifest(6, 3, 10_400), stable, CanaryPolicy(small_step_events=-1)) is None


def test_descent_walks_the_registrys_parents(tmp_path):
    from server.engine.canary_control import CanaryControl

    class Lineage(CanaryControl):  # the walk needs only the registry
        def __init__(self, manifests):
            self.registry = type("R", (), {"read_manifest": lambda _, v: manifests[v]})()

    m = {v: manifest(v, 1, 0, parent=p) for v, p in ((2, 1), (3, 2), (4, 3), (6, 0))}
    lineage = Lineage(m)
    assert lineage._descends_from(manifest(5, 1, 0, parent=4), 2)  # 5 -> 4 -> 3 -> 2
    assert lineage._descends_from(manifest(5, 1, 0, parent=2), 2)
    assert not lineage._descends_from(manifest(5, 1, 0, parent=4), 6)  # 6 is not on 5's line
    assert not lineage._descends_from(manifest(7, 1, 0, parent=6), 2)  # 6's parent is 0
    assert not lineage._descends_from(manifest(9, 1, 0, parent=8), 2)  # 8 collected: unknown, so no


class _Rollouts:
    """CanaryControl over an in-memory lineage: manifests by version, engines as (version, manifest) records,
    the rollout state in memory; only what supersede_behind_canary uses (the manager's loading and locking are
    tested elsewhere)."""

    def __init__(self, stable: pb.EngineManifest):
        from server.engine.canary_control import CanaryControl

        class Control(CanaryControl):
            policy = CanaryPolicy(mode="auto")

            def __init__(self):
                self.manifests = {stable.version: stable}
                self.registry = SimpleNamespace(read_manifest=lambda v: self.manifests[v])
                self.rollout = RolloutState(stable=stable.version, policy=self.policy)
                self.stable, self.canary, self.canary_fraction = self._engine_for(stable.version, ""), None, 0.1

            def _engine_for(self, version, actor):
                return SimpleNamespace(version=version, manifest=self.manifests[version])

            def pending_versions(self, versions=None):
                return sorted(v for v in self.manifests if v > self.stable.version and v != self.rollout.canary)

            def _mutate(self, change, actor=""):
                change(self.rollout)
                return self.rollout

            def _begin_canary(self, engine, fraction):
                self.canary = engine

        self.control = Control()

    def publish(self, version: int, parent: int, trained: int) -> int:
        self.control.manifests[version] = manifest(version, 1, trained, parent=parent)
        return version


def test_a_canary_behind_stable_gives_way_to_the_short_round_built_on_it():
    """A full round's engine that stable's short rounds outran (fewer trained events, stable's descendant) is
    replaced as the canary by the next short engine of its line; an engine of another line does not replace it,
    and a canary that is not behind stable is never replaced."""
    lineage = _Rollouts(manifest(2, 1, 1100, parent=1))  # stable: a short round's engine
    c = lineage.control

    def canary(version: int) -> None:
        c.rollout.canary, c.canary = version, c._engine_for(version, "")

    canary(lineage.publish(3, 2, 1060))  # the full round's engine: 40 events behind stable
    lineage.publish(4, 2, 1130)  # another short engine of stable's line, not of the canary's
    assert c.supersede_behind_canary(set()) == 0 and c.canary.version == 3
    lineage.publish(5, 3, 1140)  # the short round built on the full round's engine
    assert c.supersede_behind_canary(set()) == 5
    st = c.rollout
    assert c.canary.version == 5 and st.canary == 5 and not st.rolled_back
    assert [(e.action, e.version) for e in st.history[-2:]] == [("supersede", 3), ("canary", 5)]
    assert "40 events behind" in st.history[-2].reason
    lineage.publish(6, 5, 1150)
    assert c.supersede_behind_canary(set()) == 0  # 5 is ahead of stable: it runs its course
    # Behind, but the only descendant is behind stable too, or not a small step: kept.
    lineage = _Rollouts(manifest(2, 1, 1100, parent=1))
    c = lineage.control
    c.rollout.canary, c.canary = 3, c._engine_for(lineage.publish(3, 2, 1060), "")
    lineage.publish(4, 3, 1090)
    c.manifests[5] = manifest(5, 9, 1150, parent=3)  # another graph
    assert c.supersede_behind_canary(set()) == 0 and c.canary.version == 3


def test_a_promotion_behind_stable_is_held_for_a_newer_engine_of_its_line():
    from server.engine.canary import Verdict, hold_behind

    stable, behind, ahead = manifest(5, 1, 1000), manifest(6, 1, 960), manifest(7, 1, 1010)
    policy, go = CanaryPolicy(behind_hold_s=2.0), Verdict("promote", "small step: shadow ok", {})
    held = hold_behind(go, behind, stable, "small step", 0.5, policy)
    assert held.action == "wait" and "40 events behind stable" in held.reason
    assert hold_behind(go, behind, stable, "small step", 2.0, policy) is go  # held long enough
    assert hold_behind(go, ahead, stable, "small step", 0.5, policy) is go  # not behind
    assert hold_behind(go, behind, stable, None, 0.5, policy) is go  # a full canary: its own minimum duration
    assert hold_behind(go, behind, stable, "small step", 0.5, CanaryPolicy(behind_hold_s=-1)) is go
    assert CanaryPolicy.from_proto(CanaryPolicy(behind_hold_s=-1).to_proto()).behind_hold_s == -1
    assert CanaryPolicy.from_proto(CanaryPolicy(behind_hold_s=0).to_proto()).behind_hold_s == 2.0  # unset: default
    rollback = Verdict("rollback", "overlap", {})
    assert hold_behind(rollback, behind, stable, "small step", 0.5, policy) is rollback
    with pytest.raises(ValueError, match="behind_hold_s"):
        CanaryPolicy(behind_hold_s=-2)


def stats_with(shadow: int, overlap: float, canary_requests: int = 0) -> CanaryStats:
    s = CanaryStats()
    rng = np.random.default_rng(0)
    for _ in range(shadow):
        scores = list(rng.random(10))
        s.add_shadow(overlap, scores, scores, 0.001, 0.001)
    for _ in range(canary_requests):
        s.observe(True, 0.002)
    return s


def test_a_small_step_is_decided_on_its_shadow_sample_alone():
    policy = CanaryPolicy(min_duration_s=5.0, shadow_samples=100, small_step_shadow_samples=20)
    why = "small step: test"
    assert analyse(stats_with(19, 0.9), policy, small=why).action == "wait"
    v = analyse(stats_with(20, 0.9), policy, small=why)
    assert v.action == "promote" and why in v.reason
    assert analyse(stats_with(20, 0.9), policy).action == "wait"  # not small: min_duration_s, 100 pairs, live
    assert analyse(stats_with(20, 0.05), policy, small=why).action == "rollback"  # the shadow checks still hold
    errors = stats_with(20, 0.9)
    for _ in range(5):
        errors.observe(True, 0.0, error=True)
    assert analyse(errors, policy, small=why).action == "rollback"


def test_a_small_steps_shadow_pairs_come_at_its_own_rate():
    policy = CanaryPolicy(shadow_samples=100, shadow_qps=20.0, small_step_shadow_samples=20, small_step_shadow_qps=50.0)
    engine = SimpleNamespace(version=2)  # the rate needs no engine: nothing runs until start()
    small = ShadowScorer(engine, engine, CanaryStats(), policy, list, small=True)
    full = ShadowScorer(engine, engine, CanaryStats(), policy, list)
    assert [small._rate(n) for n in (0, 19, 20, 99, 100)] == [50.0, 50.0, 20.0, 20.0, 1.0]
    assert [full._rate(n) for n in (0, 19, 20, 99, 100)] == [20.0, 20.0, 20.0, 20.0, 1.0]
    with pytest.raises(ValueError, match="small_step_shadow_qps must be > 0"):
        CanaryPolicy(small_step_shadow_qps=0.0)


def test_a_small_step_waits_out_the_interval_since_the_last_canary_began():
    """At most one small-step canary (an engine load and a shadow burst) per policy.small_step_interval_s: a small
    step published sooner waits, a publish that is not a small step does not, and -1 (or 0 in process) is none."""
    import time

    lineage = _Rollouts(manifest(2, 1, 1100, parent=1))
    c = lineage.control
    step = lineage.publish(3, 2, 1150)        # a short round's refit of stable's graph
    c.manifests[4] = manifest(4, 0, 1400, parent=2)  # a full round recompiled: not a small step
    c.policy = CanaryPolicy(small_step_interval_s=2.0)
    c.canary_started = time.monotonic() - 0.5
    assert c.small_step_waits(step)
    assert not c.small_step_waits(4)
    c.canary_started = time.monotonic() - 2.1
    assert not c.small_step_waits(step)
    c.canary_started = time.monotonic()
    for none in (-1, 0):
        c.policy = CanaryPolicy(small_step_interval_s=none)
        assert not c.small_step_waits(step)
    assert CanaryPolicy.from_proto(CanaryPolicy(small_step_interval_s=-1).to_proto()).small_step_interval_s == -1
    assert CanaryPolicy.from_proto(CanaryPolicy(small_step_interval_s=0).to_proto()).small_step_interval_s == 2.0
    with pytest.raises(ValueError, match="small_step_interval_s"):
        CanaryPolicy(small_step_interval_s=-0.5)
