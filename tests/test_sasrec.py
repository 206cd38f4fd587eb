"""The SASRec reference tower: causal, padding-blind, and trainable through the eval pipeline."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from trainer.config import TrainConfig
from trainer.model_config import ModelConfig
from trainer.studies.offline import run_eval
from trainer.studies.offline_train import OfflineTrainConfig
from trainer.studies.sasrec import SASRec
from tests.test_eval_protocols import toy


def tiny() -> SASRec:
    torch.manual_seed(0)
    cfg = dataclasses.replace(ModelConfig.tiny_debug(), dropout=0.0)
    return SASRec(cfg, num_rows=31).eval()


def test_states_are_causal_and_unit_length():
    model = tiny()
    T = model.cfg.max_history
    h = torch.randint(1, 31, (3, T))
    later = h.clone()
    later[:, -1] = (h[:, -1] % 30) + 1  # change only the newest item
    a, b = model.user_states(h), model.user_states(later)
    assert torch.allclose(a[:, :-1], b[:, :-1], atol=1e-6)  # earlier positions cannot see it
    assert not torch.allclose(a[:, -1], b[:, -1], atol=1e-4)
    assert torch.allclose(a.norm(dim=-1), torch.ones(3, T), atol=1e-5)
    assert torch.allclose(model.encode_users(h), a[:, -1])


def test_left_padding_does_not_change_the_user_vector():
    model = tiny()
    T = model.cfg.max_history
    items = torch.tensor([[4, 9, 2]])
    short = torch.zeros(1, T, dtype=torch.long)
    short[0, -3:] = items
    pad_more = short.clone()  # the same history, cropped to its length: positions count from the newest item
    assert torch.allclose(model.encode_users(short), model.encode_users(pad_more[:, -3:]), atol=1e-5)


def test_sasrec_trains_through_run_eval_and_is_recorded():
    cfg = OfflineTrainConfig(train=TrainConfig.tiny_debug(precision="fp32", in_batch_negatives=False,
                                                          logq_correction=False), arch="sasrec", epochs=2, patience=0)
    r = run_eval(toy(), ["sasrec", "full"], cfg, n_negatives=10, progress=lambda m: None)
    assert r["config"]["arch"] == "sasrec" and r["train"]["epochs_run"] == 2
    assert 0 <= r["model"]["test"]["sasrec_hr@10"] <= 1
    assert r["train"]["epoch_loss"][-1] < r["train"]["epoch_loss"][0]


def test_arch_is_validated():
    with pytest.raises(ValueError, match="arch"):
        OfflineTrainConfig(arch="gru4rec")
