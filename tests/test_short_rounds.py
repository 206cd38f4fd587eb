"""Short rounds (trainer/short_rounds.py): publish a small backlog in a second, commit nothing, and let the next
full round train, gate and commit the same events; and the server's small-step canary path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from contracts.eventlog import SOURCE_KEY
from contracts.registry import Registry
from contracts.rollout import CanaryPolicy, RolloutState
from proto import livetower_v1_pb2 as pb
from server.engine.canary import CanaryStats, analyse, small_step
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
    assert t.read_ahead.bases == {2: 1, 3: 1}  # each forks the full round's model, not the previous short one
    assert reg.read_manifest(3).eval_metrics["short_round_events"] == 60

    # The full round trains the buffer (placed once: no second admission count) and commits past it.
    added = t.sketch.added
    full = t.run_round()
    assert full.events == 60 and t.next_offset == TOTAL + 61 and t.state.trained_events == TOTAL + 60
    assert t.sketch.added == added and not t.read_ahead.events
    assert full.published_version == 4 and reg.read_manifest(4).parent == 3  # refit of the newest engine


def test_fork_and_train_adds_one_pass_to_the_served_weights_and_leaves_the_model(trained_dir):
    from trainer import ema
    from trainer.short_rounds import buffered_windows, fork_and_train

    t = make_trainer(trained_dir, **SHORT)
    rows = {"user-0": [5, 6], "user-1": [7]}
    windows = buffered_windows(rows, t.state.user_seqs, t.model.cfg.max_history)
    assert len(windows) == 2 and sorted(int(x) for w in windows for x in w[1][w[2]]) == [5, 6, 7]
    before = state_of(t.model)
    served = fork_and_train(t.model, t.opt, windows, item_prob_R=t._item_prob(), n_items=len(t.vocab), cfg=t.cfg,
                            seed=1)
    assert all(torch.equal(v, before[k]) for k, v in t.model.state_dict().items())  # the model is not trained
    avg = ema.averaged(t.model, t.opt).state_dict()
    moved = (served.item_embedding.weight - avg["item_embedding.weight"]).abs().sum(dim=1)
    assert moved[[5, 6, 7]].min() > 0  # the targets' own rows moved by the pass


def test_a_crash_loses_only_the_buffer_and_the_restart_reads_it_again(trained_dir):
    t = make_trainer(trained_dir, **SHORT)
    t.event_log.append(stream_events(seed=21, n_users=10, events_per_user=4))
    assert t.run_short_round().published_version == 2
    again = make_trainer(trained_dir, **SHORT)  # the process died: no checkpoint was written by the short round
    assert again.next_offset == TOTAL + 1 and not again.read_ahead.events
    r = again.run_round()
    assert r.events == 40 and again.next_offset == TOTAL + 41


def test_no_short_round_forks_a_model_whose_full_round_did_not_publish(trained_dir):
    t = make_trainer(trained_dir, **SHORT, gate_min_ratio=100.0)  # every gate fails
    t.event_log.append(stream_events(seed=22))
    assert t.run_round().gate == "failed" and not t.state.model_published
    t.event_log.append(stream_events(seed=23, n_users=5))
    assert not t._short_round_due(backlog=40, since_short_s=10.0)
    assert make_trainer(trained_dir, **SHORT).state.model_published is False  # checkpointed


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


def manifest(version: int, graph: int, trained: int) -> pb.EngineManifest:
    return pb.EngineManifest(version=version, graph_version=graph, trained_events=trained)


def test_small_step_is_a_refit_of_stables_graph_with_few_more_events():
    policy = CanaryPolicy(small_step_events=1000)
    stable = manifest(5, 3, 10_000)
    assert small_step(manifest(6, 3, 10_400), stable, policy)
    assert small_step(manifest(6, 5, 10_400), manifest(5, 0, 10_000), policy)  # a refit of stable itself
    assert small_step(manifest(6, 0, 10_400), stable, policy) is None  # recompiled: its cost may differ
    assert small_step(manifest(6, 3, 11_001), stable, policy) is None  # too many events
    assert small_step(manifest(6, 3, 9_000), stable, policy) is None   # fewer events than stable
    assert small_step(manifest(6, 3, 10_400), stable, CanaryPolicy(small_step_events=-1)) is None


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
