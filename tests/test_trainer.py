"""The trainer round loop: offsets, resume, crash safety, vocabulary growth, the eval gate."""

from __future__ import annotations

import pytest
import torch

from contracts.eventlog import SOURCE_KEY, SqliteEventLog
from contracts.registry import Registry
from proto import livetower_v1_pb2 as pb
from tests.conftest import SMALL_DATA, make_trainer, stream_events
from trainer.data.synthetic import generate


@pytest.fixture
def data_dir(tmp_path):
    log = SqliteEventLog(tmp_path / "events.sqlite")
    log.append(list(generate(SMALL_DATA)))
    log.close()
    return tmp_path


def test_rounds_consume_each_event_once_and_resume(data_dir):
    t1 = make_trainer(data_dir)
    r1 = t1.run_round()
    total = SMALL_DATA.n_users * SMALL_DATA.events_per_user
    assert r1.events == total and r1.gate == "passed" and r1.published_version == 1
    assert r1.metrics["model_recall@10"] > r1.metrics["popularity_recall@10"]  # planted structure is learnt
    assert t1.run_round() is None  # nothing new
    # A new process resumes exactly where the checkpoint says.
    t2 = make_trainer(data_dir)
    assert t2.next_offset == total + 1 and t2.state.trained_events == total
    assert t2.vocab.ids == t1.vocab.ids
    for (n, a), (_, b) in zip(t1.model.state_dict().items(), t2.model.state_dict().items()):
        assert torch.equal(a, b), n
    new = stream_events(seed=5)
    t2.event_log.append(new)
    r2 = t2.run_round()
    assert r2.events == len(new) and r2.published_version == 2
    m = Registry(data_dir / "registry").read_manifest(2)
    assert m.parent == 1 and m.trained_events == total + len(new)
    assert dict(m.stream_offsets) == {SOURCE_KEY: total + len(new) + 1}
    assert m.watermark_ms == max(e.timestamp_ms for e in [*generate(SMALL_DATA), *new])  # newest trained


def test_crash_before_checkpoint_trains_the_events_again(data_dir, monkeypatch):
    make_trainer(data_dir).run_round()
    new = stream_events(seed=6)
    t = make_trainer(data_dir)
    t.event_log.append(new)
    import trainer.loop as loop

    def crash(*a, **k):
        raise KeyboardInterrupt("killed before the checkpoint was written")

    monkeypatch.setattr(loop, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        t.run_round()
    monkeypatch.undo()
    again = make_trainer(data_dir)  # restart: the round's events are still ahead of the offset
    assert again.backlog() == len(new)
    assert again.run_round().events == len(new)


def test_crash_mid_publish_leaves_no_visible_engine(data_dir, monkeypatch):
    t = make_trainer(data_dir)
    import contracts.registry as registry_mod

    def crash(src, dst):
        raise KeyboardInterrupt("killed just before the rename")

    monkeypatch.setattr(registry_mod.os, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        t.run_round()
    monkeypatch.undo()
    reg = Registry(data_dir / "registry")
    assert reg.versions() == []
    # The checkpoint was written before publishing: a restart does not re-train, it cleans up staging
    # and publishes with the next round.
    t2 = make_trainer(data_dir)
    assert not [p for p in reg.engines_dir.iterdir() if p.name.startswith(".tmp-")]
    assert t2.backlog() == 0
    t2.event_log.append(stream_events(seed=7))
    assert t2.run_round().published_version == 1


def test_vocabulary_grows_past_the_table(data_dir):
    t = make_trainer(data_dir, item_min_count=1)  # each fresh item below has one event: admit at first sight
    t.run_round()
    rows_before = t.model.num_rows
    assert rows_before == 1024
    ts = max(e.timestamp_ms for e in generate(SMALL_DATA)) + 1
    events = [pb.Event(event_id=f"new-{i}", user_id=f"grower-{i % 40}", item_id=f"fresh-{i}", action="click",
                       weight=1.0, timestamp_ms=ts + i) for i in range(1200)]
    t.event_log.append(events)
    r = t.run_round()
    assert t.model.num_rows == 2048 and len(t.vocab) > 1024
    if r.published_version:
        assert Registry(data_dir / "registry").read_manifest(r.published_version).item_count == len(t.vocab)
    # Old rows kept their trained values through the growth: the optimizer state moved with them.
    assert t.opt.state[t.model.item_embedding.weight]["exp_avg"].shape[0] == 2048


def test_failed_gate_checkpoints_but_does_not_publish(data_dir):
    t = make_trainer(data_dir, gate_min_ratio=1000.0)
    r = t.run_round()
    assert r.gate == "failed" and r.published_version == 0
    assert Registry(data_dir / "registry").versions() == []
    assert make_trainer(data_dir).backlog() == 0  # trained and checkpointed all the same


def test_gate_compares_the_candidate_with_the_serving_model_on_the_same_holdout(data_dir):
    t = make_trainer(data_dir)
    assert t.run_round().published_version == 1
    assert set(t.state.published_models) == {1}
    # Unchanged model: the serving side scores exactly what the candidate scores.
    users = sorted(t.state.user_seqs)[:50]
    import numpy as np

    from trainer.evaluate import evaluate_model
    from trainer.examples import left_pad

    T = t.model.cfg.max_history
    hist = np.stack([left_pad(t.state.user_seqs[u][:-1], T) for u in users])
    tgt = np.asarray([t.state.user_seqs[u][-1] for u in users])
    version, serving = t._evaluate_serving(hist, tgt, users)
    assert version == 1 and serving == pytest.approx(evaluate_model(t.model, hist, tgt, len(t.vocab)))
    # A candidate held to 10x the serving model's recall fails the gate and publishes nothing.
    strict = make_trainer(data_dir, gate_min_vs_serving=10.0)
    strict.event_log.append(stream_events(seed=8))
    r = strict.run_round()
    assert r.gate == "failed" and r.published_version == 0 and "serving_recall@10" in r.metrics
    assert Registry(data_dir / "registry").versions() == [1]


def test_gate_baseline_is_the_servers_stable_version_not_the_last_published(data_dir):
    """After the server rolls canaries back, the gate must keep comparing with what users see (rollout.json's
    stable), and say which version it compared with, so the canary analysis can trust it."""
    from contracts.rollout import RolloutState

    t = make_trainer(data_dir)
    assert t.run_round().published_version == 1
    reg = Registry(data_dir / "registry")
    reg.write_rollout(RolloutState(stable=1))
    for seed, expect in ((8, 2), (9, 3)):  # v2 is "rolled back": stable stays 1
        t.event_log.append(stream_events(seed=seed))
        r = t.run_round()
        assert r.published_version == expect and r.metrics["gate_baseline_version"] == 1
    assert set(t.state.published_models) == {1, 3}  # stable + newest; v2 dropped
    assert reg.read_manifest(3).eval_metrics["gate_baseline_version"] == 1
    reg.write_rollout(RolloutState(stable=3))  # promoted: the baseline follows, v1 is dropped at the next publish
    t.event_log.append(stream_events(seed=11))
    r = t.run_round()
    assert r.metrics["gate_baseline_version"] == 3 and set(t.state.published_models) == {3, r.published_version}


def test_rounds_replay_earlier_users_windows(data_dir):
    t = make_trainer(data_dir)
    t.run_round()
    fresh = {"s9-0": [1, 2]}
    windows, users = t._replay_windows(40, exclude=fresh)
    assert len(windows) == 40 and len(users) == 40 and set(users) <= set(t.state.user_seqs) - set(fresh)
    for inputs_T, targets_T, mask_T in windows:
        assert mask_T.any() and (targets_T[mask_T] > 0).all()
    assert t._replay_windows(0, exclude=fresh) == ([], [])
    assert make_trainer(data_dir, replay_fraction=0.0)._replay_windows(0, exclude={}) == ([], [])


def test_round_backlog_picks_two_workers_and_the_round_trains_on_them(data_dir):
    """The sidecar's rounds go through the elastic policy: a backlog above events_per_worker gets two DDP
    workers (gloo, CPU), the choice is exported, and the round publishes like any other."""
    from trainer.config import ElasticConfig

    t = make_trainer(data_dir, precision="fp32", elastic=ElasticConfig(max_workers=2, events_per_worker=500,
                                                                       device="cpu"))
    t.devices = 2  # devices = usable cores on CPU; pinned so a 1-core runner still takes the two-worker path
    r = t.run_round()
    assert r.gate == "passed" and r.published_version == 1
    reg = t.metrics.registry
    assert reg.get_sample_value("livetower_trainer_elastic_workers") == 2
    # backlog 2000 / 500 per worker wants 4: capped by max_workers
    assert reg.get_sample_value("livetower_trainer_elastic_choices_total", {"reason": "max_workers"}) == 1
    assert reg.get_sample_value("livetower_trainer_elastic_attempts_total", {"outcome": "ok"}) == 1
    assert t.rate_per_worker and t.rate_per_worker > 0


def test_split_round_holds_out_newest_events_and_trains_the_rest():
    from trainer.gate import holdout_arrays
    from trainer.loop import new_windows, split_round

    new_by_user = {"a": [5, 6, 7], "b": [8], "c": [9], "d": [3, 4]}
    kept = {"b": [1, 2], "x": [1, 3]}  # c: one event, no history: never held out
    split = split_round(new_by_user, kept, max_eval_users=10, seed=0)
    assert split.seqs == {"a": [5, 6, 7], "b": [1, 2, 8], "c": [9], "d": [3, 4]}
    assert split.holdout == ["a", "b", "d"]
    rows, windows, users = new_windows(split, 4)
    assert len(users) == len(windows)
    assert sorted(rows) == [3, 5, 6, 9]  # the held-out newest events (7, 8, 4) are not trained now
    targets = sorted(int(t) for _, tgt_T, m_T in windows for t in tgt_T[m_T])
    assert targets == [6]  # 5 -> 6 is the only trained event with a history before it
    hist_BT, tgt_B = holdout_arrays(split, 4)
    assert tgt_B.tolist() == [7, 8, 4] and hist_BT.tolist() == [[0, 0, 5, 6], [0, 0, 1, 2], [0, 0, 0, 3]]
    capped = split_round(new_by_user, kept, max_eval_users=2, seed=0)
    assert len(capped.holdout) == 2 and set(capped.holdout) <= {"a", "b", "d"}
    assert capped == split_round(new_by_user, kept, max_eval_users=2, seed=0)  # seeded
    assert capped.holdout == sorted(capped.holdout)


def test_publish_collects_old_engines_but_keeps_stable(data_dir):
    """keep_engines: after each publish the registry keeps the newest N plus what serving needs (stable here)."""
    from contracts.rollout import RolloutState

    t = make_trainer(data_dir, keep_engines=1)
    assert t.run_round().published_version == 1
    reg = Registry(data_dir / "registry")
    reg.write_rollout(RolloutState(stable=1))
    for seed, expect in ((8, 2), (9, 3)):
        t.event_log.append(stream_events(seed=seed))
        assert t.run_round().published_version == expect
    assert reg.versions() == [1, 3]  # v2: neither newest nor stable
    assert not [p for p in reg.engines_dir.iterdir() if not p.name.isdigit()]
