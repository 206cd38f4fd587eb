import os

import numpy as np
import pytest
import torch

from trainer.checkpoint import CHECKPOINT_FILE, FORMAT_VERSION, TrainerState, load_checkpoint, save_checkpoint
from trainer.model import TwoTower
from trainer.model_config import ModelConfig


def make_state(seed=0, step=3):
    torch.manual_seed(seed)
    cfg = ModelConfig.tiny_debug()
    model = TwoTower(cfg, num_rows=9)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.encode_users(torch.tensor([[0, 1, 2]])).sum().backward()
    opt.step()
    return TrainerState(
        model_config=cfg.to_dict(), model=model.state_dict(), optimizer=opt.state_dict(),
        vocab=[f"item-{i}" for i in range(8)], item_counts=np.arange(9, dtype=np.int64) * 7,
        user_seqs={"u1": [1, 2, 3], "u2": []}, offsets={"sqlite": 2**40 + 5}, step=step,
        trained_events=12_345, watermark_ms=1_767_225_600_123, published_version=4,
        history=[{"round": 1, "recall@10": 0.25, "decision": "publish"}])


def assert_states_equal(a, b):
    assert a.model_config == b.model_config
    assert a.model.keys() == b.model.keys()
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    assert a.optimizer["param_groups"] == b.optimizer["param_groups"]
    for pid, st in a.optimizer["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b.optimizer["state"][pid][k])
    np.testing.assert_array_equal(a.item_counts, b.item_counts)
    assert a.item_counts.dtype == b.item_counts.dtype
    for f in ("vocab", "user_seqs", "offsets", "step", "trained_events", "watermark_ms", "published_version",
              "history"):
        assert getattr(a, f) == getattr(b, f), f


def test_missing_checkpoint_is_none(tmp_path):
    assert load_checkpoint(tmp_path) is None
    assert load_checkpoint(tmp_path / "does-not-exist") is None


def test_round_trip(tmp_path):
    st = make_state()
    path = save_checkpoint(tmp_path / "ckpt", st)  # directory is created
    assert path == tmp_path / "ckpt" / CHECKPOINT_FILE and path.is_file()
    back = load_checkpoint(tmp_path / "ckpt")
    assert isinstance(back, TrainerState)
    assert_states_equal(st, back)
    # the loaded weights rebuild a working model
    model = TwoTower(ModelConfig.from_dict(back.model_config), num_rows=9)
    model.load_state_dict(back.model)
    ref = TwoTower(ModelConfig.tiny_debug(), num_rows=9)
    ref.load_state_dict(st.model)
    h = torch.tensor([[0, 3, 4, 5]])
    assert torch.equal(model.eval().encode_users(h), ref.eval().encode_users(h))


def test_defaults_round_trip(tmp_path):
    st = TrainerState(model_config={}, model={}, optimizer={}, vocab=[], item_counts=np.zeros(1, np.int64),
                      user_seqs={}, offsets={})
    save_checkpoint(tmp_path, st)
    back = load_checkpoint(tmp_path)
    assert (back.step, back.trained_events, back.watermark_ms, back.published_version, back.history) == \
        (0, 0, 0, 0, [])


def test_second_save_replaces_without_leftovers(tmp_path):
    save_checkpoint(tmp_path, make_state(step=1))
    save_checkpoint(tmp_path, make_state(seed=1, step=2))
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]
    assert load_checkpoint(tmp_path).step == 2


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    old = make_state(step=1)
    save_checkpoint(tmp_path, old)
    before = (tmp_path / CHECKPOINT_FILE).read_bytes()

    def crash(*a, **k):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path, make_state(seed=1, step=2))
    monkeypatch.undo()
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]  # temp file cleaned up
    assert_states_equal(old, load_checkpoint(tmp_path))


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    def crash(*a, **k):
        raise OSError("boom")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, make_state())
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    assert load_checkpoint(tmp_path) is None


def test_wrong_format_version_is_actionable(tmp_path):
    st = make_state()
    save_checkpoint(tmp_path, st)
    d = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)
    assert d["format"] == FORMAT_VERSION
    d["format"] = FORMAT_VERSION + 1
    torch.save(d, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(ValueError) as ei:
        load_checkpoint(tmp_path)
    msg = str(ei.value)
    assert str(tmp_path / CHECKPOINT_FILE) in msg
    assert f"format {FORMAT_VERSION + 1} is not {FORMAT_VERSION}" in msg
    assert "move it away" in msg
    del d["format"]
    torch.save(d, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(ValueError, match="format None"):
        load_checkpoint(tmp_path)


class _Boom:
    """Unpickling this would run os.system: a crafted checkpoint must not get that far."""

    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


def test_checkpoint_is_read_without_pickle(tmp_path):
    state = make_state()
    state.item_last_seen_ms = np.arange(9, dtype=np.int64)
    state.admission_sketch = np.ones((4, 16), np.int32)
    save_checkpoint(tmp_path, state)
    torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)  # tensors and plain containers only
    back = load_checkpoint(tmp_path)
    assert_states_equal(state, back)
    np.testing.assert_array_equal(back.item_last_seen_ms, state.item_last_seen_ms)
    np.testing.assert_array_equal(back.admission_sketch, state.admission_sketch)

    crafted = tmp_path / "crafted"
    crafted.mkdir()
    torch.save({"format": FORMAT_VERSION, "model": _Boom()}, crafted / CHECKPOINT_FILE)
    cwd = os.getcwd()
    os.chdir(crafted)
    try:
        with pytest.raises(ValueError, match="not a format 2 checkpoint"):
            load_checkpoint(crafted)
    finally:
        os.chdir(cwd)
    assert not (crafted / "pwned-by-checkpoint").exists()


def test_format_1_pickled_checkpoint_is_refused_with_advice(tmp_path):
    torch.save({"format": 1, "item_counts": np.zeros(3, np.int64)}, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(ValueError, match="start fresh"):
        load_checkpoint(tmp_path)
