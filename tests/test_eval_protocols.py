"""Offline evaluation protocols: splits without leaks, sampled negatives, metrics by hand, popularity."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.config import TrainConfig
from trainer.data.sequences import SequenceData, load_ml100k_sequences, load_sasrec_txt
from trainer.studies.incremental import training_events
from trainer.model import TwoTower
from trainer.model_config import ModelConfig
from trainer.studies.offline import run_eval
from trainer.studies.offline_train import OfflineTrainConfig
from trainer.evaluate import evaluate_popularity, expected_metrics
from trainer.studies.protocols import EvalSet, leave_one_out, negatives_for, sample_negatives, time_split
from trainer.studies.ranking import evaluate_model_on, evaluate_popularity_on, popularity_counts


def toy(n_users: int = 40, n_items: int = 30, seed: int = 0) -> SequenceData:
    """Sequences of distinct items (lengths 1..12) with increasing timestamps."""
    rng = np.random.default_rng(seed)
    items, times = [], []
    for u in range(n_users):
        L = 1 + u % 12
        items.append(rng.permutation(np.arange(1, n_items + 1))[:L].astype(np.int64))
        times.append(np.sort(rng.integers(0, 10_000, L)).astype(np.int64))
    return SequenceData(name="toy", items=items, times=times, n_items=n_items)


def test_loaders_parse_both_formats(tmp_path):
    (tmp_path / "v.txt").write_text("1 3\n1 2\n2 5\n1 4\n")
    d = load_sasrec_txt(tmp_path / "v.txt")
    assert d.n_users == 2 and d.n_items == 5 and d.items[0].tolist() == [3, 2, 4] and d.times is None
    (tmp_path / "u.data").write_text("1\t7\t5\t300\n2\t1\t3\t100\n1\t2\t4\t100\n1\t9\t4\t100\n")
    m = load_ml100k_sequences(tmp_path)
    assert m.items[0].tolist() == [2, 9, 7] and m.times[0].tolist() == [100, 100, 300]  # ties keep file order
    with pytest.raises(ValueError, match="n_items"):
        SequenceData(name="x", items=[], n_items=0)


def test_leave_one_out_never_trains_on_val_or_test():
    data = toy()
    s = leave_one_out(data)
    assert len(s.test) == sum(len(x) >= 3 for x in data.items)
    for u, seq in enumerate(data.items):
        if len(seq) < 3:  # SASRec: short users only train
            assert s.train[u].tolist() == seq.tolist() and u not in s.test.users
    for j, u in enumerate(s.test.users):
        seq = data.items[u]
        assert s.test.targets[j] == seq[-1] and s.test.histories[j].tolist() == seq[:-1].tolist()
        assert s.train[u].tolist() == seq[:-2].tolist()
        assert seq[-1] not in s.train[u] and seq[-2] not in s.train[u]  # distinct items: no leak
    for j, u in enumerate(s.val.users):
        assert s.val.targets[j] == data.items[u][-2] and s.val.histories[j].tolist() == s.train[u].tolist()
    events = training_events(data, s)  # the incremental replay holds exactly the training items
    assert len(events) == sum(len(x) for x in s.train)
    assert [e.timestamp_ms for e in events] == sorted(e.timestamp_ms for e in events)


def test_time_split_respects_the_cuts():
    data = toy(n_users=60)
    s = time_split(data)
    t_val, t_test = s.notes["t_val"], s.notes["t_test"]
    assert t_val <= t_test and len(s.test) > 0 and len(s.val) > 0
    for u, tr in enumerate(s.train):
        assert (data.times[u][:len(tr)] < t_val).all() and len(tr) == (data.times[u] < t_val).sum()
    for j, u in enumerate(s.test.users):  # every event from t_test on, with all earlier events as history
        n = len(s.test.histories[j])
        assert data.times[u][n] >= t_test and s.test.targets[j] == data.items[u][n] and n >= 1
        assert s.test.histories[j].tolist() == data.items[u][:n].tolist()
    for j, u in enumerate(s.val.users):
        n = len(s.val.histories[j])
        assert t_val <= data.times[u][n] < t_test and s.val.targets[j] not in s.train[u]
    assert len(s.test) == sum(int((ts >= t_test).sum() - (ts[0] >= t_test)) for ts in data.times)
    with pytest.raises(ValueError, match="timestamps"):
        time_split(SequenceData(name="nt", items=data.items, n_items=data.n_items))


def test_negatives_exclude_user_items_and_count():
    data = toy()
    s = leave_one_out(data)
    neg = negatives_for(data, s.test, s, n=100, exclude="sequence", seed=7)
    assert neg.shape == (len(s.test), 100)
    for j, u in enumerate(s.test.users):
        assert not np.isin(neg[j], data.items[u]).any()  # never the target, nor any of the user's items
        assert neg[j].min() >= 1 and neg[j].max() <= data.n_items
    neg_t = negatives_for(data, s.test, s, n=100, exclude="train", seed=7)
    for j, u in enumerate(s.test.users):
        assert not np.isin(neg_t[j], s.train[u]).any()
    assert (negatives_for(data, s.test, s, seed=7) == neg).all()  # fixed by the seed
    with pytest.raises(ValueError, match="excluded"):
        sample_negatives(np.random.default_rng(0), 3, np.array([1, 2, 3]), 5)


def test_hr_ndcg_by_hand_with_ties():
    m = expected_metrics(np.array([0, 5, 20]), np.zeros(3, np.int64), ks=(10,), hit_name="hr")
    assert m["hr@10"] == pytest.approx(2 / 3)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(7)) / 3)
    # 9 above and 1 tie: rank 9 or 10 with equal chance
    m = expected_metrics(np.array([9]), np.array([1]), ks=(10,))
    assert m["recall@10"] == pytest.approx(0.5) and m["ndcg@10"] == pytest.approx(0.5 / math.log2(11))


def test_popularity_baseline_ranks():
    n = 20
    counts = np.zeros(n + 1, np.int64)
    counts[1:] = 100 - np.arange(1, n + 1)  # item i has popularity rank i - 1
    ev = EvalSet(users=np.arange(3), histories=[np.array([1, 2]), np.array([], np.int64), np.array([5])],
                 targets=np.array([4, 12, 1]))
    negs = np.array([[3, 5, 6], [1, 2, 3], [2, 2, 3]])
    m = evaluate_popularity_on(counts, ev, negatives_BK=negs, ks=(1, 3))
    # full: user0 target 4, items 1, 2 seen -> only item 3 above: rank 1; user1 rank 11; user2 target 1: rank 0
    assert m["full"]["recall@3"] == pytest.approx(2 / 3)
    assert m["full"]["ndcg@3"] == pytest.approx((1 / math.log2(3) + 1) / 3)
    # sampled: user0 item 3 beats 4 -> rank 1; user1 all three beat 12 -> rank 3; user2 rank 0
    assert m["sampled"]["hr@1"] == pytest.approx(1 / 3) and m["sampled"]["hr@3"] == pytest.approx(2 / 3)
    assert popularity_counts([np.array([1, 1, 3])], 4).tolist() == [0, 2, 0, 1, 0]


def test_popularity_ties_by_hand_full_and_sampled():
    n = 10
    counts = np.array([0, 50, 40, 30, 30, 30, 5, 5, 5, 5, 5])  # items 3, 4, 5 tied at 30; 6..10 tied at 5
    ev = EvalSet(users=np.arange(3), histories=[np.array([1]), np.array([4, 5]), np.array([], np.int64)],
                 targets=np.array([4, 3, 8]))
    negs = np.array([[3, 5, 4], [9, 2, 1], [6, 7, 2]])
    m = evaluate_popularity_on(counts, ev, negatives_BK=negs, ks=(1, 2, 3))
    # full: user0 target 4, item 1 seen: 1 above, 2 tied -> positions 2..4; user1 target 3, its ties seen:
    # position 3 for sure; user2 target 8: 5 above, 4 tied -> positions 6..10
    assert m["full"]["recall@2"] == pytest.approx((1 / 3 + 0 + 0) / 3)
    assert m["full"]["recall@3"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert m["full"]["ndcg@3"] == pytest.approx(((1 / math.log2(3) + 1 / math.log2(4)) / 3 + 1 / math.log2(4)) / 3)
    # sampled (the negatives are not excluded, a negative equal to the target ties with it): user0 3 tied of 3
    # (items 3, 5 and the drawn 4 itself) -> positions 1..4; user1: 2 above -> 3; user2 1 above, 2 tied -> 2..4
    assert m["sampled"]["hr@1"] == pytest.approx((1 / 4 + 0 + 0) / 3)
    assert m["sampled"]["hr@2"] == pytest.approx((2 / 4 + 0 + 1 / 3) / 3)
    assert m["sampled"]["hr@3"] == pytest.approx((3 / 4 + 1 + 2 / 3) / 3)
    # the sidecar's gate metric is the same implementation: identical numbers on the same ranking
    side = evaluate_popularity(counts, ev.targets, n, seen_rows=[h.tolist() for h in ev.histories], ks=(1, 2, 3))
    assert side == pytest.approx(m["full"])


def test_model_metrics_match_a_direct_computation():
    torch.manual_seed(0)
    cfg = ModelConfig.tiny_debug()
    model = TwoTower(cfg, 64).eval()
    n = 30
    rng = np.random.default_rng(1)
    hists = [rng.permutation(np.arange(1, n + 1))[:L] for L in (3, 7, 1, 20)]
    ev = EvalSet(users=np.arange(4), histories=hists, targets=np.array([5, 9, 2, 30]))
    m = evaluate_model_on(model, ev, n, ks=(5,))
    with torch.no_grad():
        items = model.encode_items(torch.arange(1, n + 1))
        ranks = []
        for h, t in zip(hists, ev.targets):
            x = np.zeros(cfg.max_history, np.int64)
            hh = h[-cfg.max_history:]
            x[len(x) - len(hh):] = hh
            s = (model.encode_users(torch.from_numpy(x)[None]) @ items.T)[0]
            allowed = torch.ones(n, dtype=torch.bool)
            allowed[torch.from_numpy(h - 1)] = False
            allowed[t - 1] = False
            ranks.append(int(((s > s[t - 1]) & allowed).sum()))
    ranks = np.array(ranks)
    assert m["full"]["recall@5"] == pytest.approx((ranks < 5).mean())
    assert m["full"]["ndcg@5"] == pytest.approx(((ranks < 5) / np.log2(ranks + 2)).mean(), rel=1e-6)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="epochs"):
        OfflineTrainConfig(epochs=0)
    with pytest.raises(ValueError, match="loss"):
        OfflineTrainConfig(loss="hinge")


@pytest.mark.parametrize("loss", ["sampled_softmax", "full_softmax", "bce"])
def test_run_eval_end_to_end_tiny(loss):
    cfg = OfflineTrainConfig(train=TrainConfig.tiny_debug(precision="fp32", logq_correction=loss != "bce"),
                             epochs=2, patience=0, loss=loss)
    r = run_eval(toy(), ["sasrec", "full"], cfg, n_negatives=10, progress=lambda m: None)
    for who in ("model", "popularity"):
        for split in ("val", "test"):
            assert 0 <= r[who][split]["sasrec_hr@10"] <= 1 and "full_ndcg@20" in r[who][split]
    assert r["train"]["epochs_run"] == 2 and len(r["train"]["val_curve"]) == 2


@pytest.mark.parametrize("loss", ["sampled_softmax", "full_softmax"])
def test_learned_temperature_and_sasrec_style_options_train(loss):
    model = dataclasses.replace(ModelConfig.tiny_debug(), abs_positions=True, emb_dropout=0.2, temperature=0.1)
    cfg = OfflineTrainConfig(train=TrainConfig.tiny_debug(precision="fp32", model=model, in_batch_negatives=False,
                                                          logq_correction=False),
                             epochs=2, patience=0, loss=loss, learn_temperature=True)
    r = run_eval(toy(), ["sasrec"], cfg, n_negatives=10, progress=lambda m: None)
    temps = r["train"]["temperature"]
    assert len(temps) == 2 and all(t >= 0.01 for t in temps) and temps[-1] != 0.1  # it moved
    assert r["config"]["learn_temperature"] and r["config"]["model"]["abs_positions"]


def test_incremental_rounds_score_on_the_same_sets():
    from trainer.studies.incremental import compare_incremental

    data = toy(n_users=60)
    cfg = OfflineTrainConfig(train=TrainConfig.tiny_debug(precision="fp32", epochs_per_round=1, min_eval_users=1))
    r = compare_incremental(data, ["sasrec", "full"], cfg, chunk_events=100, n_negatives=10, progress=lambda m: None)
    n_train = sum(len(s) for s in leave_one_out(data).train)
    assert r["train"]["events"] == n_train and r["train"]["rounds"] == -(-n_train // 100)
    assert 0 <= r["test"]["sasrec_hr@10"] <= 1 and "full_recall@20" in r["val"]


def test_run_eval_rejects_unknown_or_mixed_protocols():
    cfg = OfflineTrainConfig(train=TrainConfig.tiny_debug(precision="fp32"), epochs=1)
    with pytest.raises(ValueError, match="protocols"):
        run_eval(toy(), ["full", "hr"], cfg, progress=lambda m: None)
    with pytest.raises(ValueError, match="time"):
        run_eval(toy(), ["time", "full"], cfg, progress=lambda m: None)


def _recorded_config(note_prefix: str) -> dict:
    runs = [json.loads(line) for line in (Path(__file__).parent.parent / "docs" / "quality_runs.jsonl")
            .read_text().splitlines()]
    return next(r for r in runs if r.get("note", "").startswith(note_prefix))["config"]


def test_presets_are_the_recorded_configs():
    """docs/quality.md says the sidecar's defaults are the recorded run 59 and --preset legacy / tuned the
    pre-issue-9 runs 1 and 6: the presets' configs must equal what those jsonl lines recorded."""
    from trainer.studies.offline import PRESETS

    def same(preset: str, note_prefix: str, ignore: tuple[str, ...] = ()) -> None:
        got, rec = PRESETS[preset]().to_dict(), _recorded_config(note_prefix)
        for k in ignore:
            got.pop(k, None), rec.pop(k, None)
        assert {k: v for k, v in got.items() if k in rec} == rec, preset

    same("default", "the served config (--preset default = run 52) with --pairwise 40")  # run 59
    # runs 1 and 6 predate the arch / learn_temperature / logits_bf16 fields (they were at today's values)
    same("legacy", "sidecar TrainConfig + loss (fp32), 20 epochs max", ignore=("epochs",))
    same("tuned", "2048 uniform negatives + dropout 0.3", ignore=("epochs",))


def test_ema_epochs_validates_and_returns_the_weight_average():
    """The model returned (and validated) with ema_epochs is the average kept in the optimizer state, not the raw
    weights: the same seed trains the same raw trajectory with or without it."""
    from trainer.studies.offline_train import train_offline

    seqs = toy(n_users=40).items
    cfg = lambda tc: OfflineTrainConfig(train=tc, epochs=2, patience=0)
    raw = train_offline(seqs, 30, cfg(TrainConfig.tiny_debug(precision="fp32")), progress=lambda m: None)[0]
    avg = train_offline(seqs, 30, cfg(TrainConfig.tiny_debug(precision="fp32", ema_epochs=1.0)),
                        validate=lambda m: 0.5, progress=lambda m: None)[0]
    diffs = [float((a - b).abs().max()) for a, b in zip(raw.parameters(), avg.parameters())]
    assert max(diffs) > 1e-4  # averaged weights, not the last step's
    with pytest.raises(ValueError, match="ema_epochs"):
        TrainConfig(ema_epochs=-1.0)


def test_lr_decays_after_each_validation_that_is_not_the_best():
    from trainer.studies.offline_train import train_offline

    msgs: list[str] = []
    scores = iter([0.5, 0.4, 0.6, 0.3])
    tc = TrainConfig.tiny_debug(precision="fp32", lr=1e-3)
    train_offline(toy(n_users=12).items, 30, OfflineTrainConfig(train=tc, epochs=4, patience=0, lr_decay=0.5),
                  validate=lambda m: next(scores), progress=msgs.append)
    lrs = [m.split("lr -> ")[1] for m in msgs if "lr -> " in m]
    assert lrs == ["5.00e-04", "2.50e-04"]  # after epochs 2 and 4 only
    with pytest.raises(ValueError, match="lr_decay"):
        OfflineTrainConfig(lr_decay=0.0)
