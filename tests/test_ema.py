"""The weight average kept in the optimizer state (trainer/ema.py): update rule, swap, growth, and the sidecar
round publishing it."""

from __future__ import annotations

import torch

from contracts.eventlog import SqliteEventLog
from tests.conftest import SMALL_DATA, make_trainer
from trainer import ema
from trainer.data.synthetic import generate
from trainer.model import TwoTower
from trainer.model_config import ModelConfig
from trainer.training import grow_table, make_optimizer
from trainer.config import TrainConfig


def test_update_is_the_ema_of_the_steps():
    w = torch.nn.Parameter(torch.tensor([0.0, 0.0]))
    opt = torch.optim.SGD([w], lr=1.0)
    values = []
    for target in ([1.0, 2.0], [3.0, -1.0], [0.5, 0.5]):
        with torch.no_grad():
            w.copy_(torch.tensor(target))  # stand-in for opt.step()
        ema.update(opt, 0.75)
        values.append(torch.tensor(target))
    want = 0.75 * (0.75 * values[0] + 0.25 * values[1]) + 0.25 * values[2]  # starts at the first step's weights
    torch.testing.assert_close(opt.state[w][ema.EMA_KEY], want)
    assert ema.decay_for(0, 100) == 0.0 and abs(ema.decay_for(4.1, 244) - 0.999) < 1e-6


def test_swapped_in_restores_the_raw_weights_and_averaged_copies():
    model = TwoTower(ModelConfig.tiny_debug(), 64)
    opt = make_optimizer(model, TrainConfig.tiny_debug())
    assert ema.averaged(model, opt) is model  # no average yet
    ema.update(opt, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    avg = {n: opt.state[p][ema.EMA_KEY].clone() for n, p in model.named_parameters()}
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.swapped_in(model, opt):
        for n, p in model.named_parameters():
            assert torch.equal(p, avg[n]) and not torch.equal(p, raw[n])
    for n, p in model.named_parameters():
        assert torch.equal(p, raw[n])
    copy = ema.averaged(model, opt)
    assert copy is not model and torch.equal(copy.item_embedding.weight, avg["item_embedding.weight"])


def test_grown_rows_start_their_average_at_their_initial_value():
    model = TwoTower(ModelConfig.tiny_debug(), 64)
    opt = make_optimizer(model, TrainConfig.tiny_debug())
    model.item_embedding.weight.sum().backward()
    opt.step()
    ema.update(opt, 0.9)
    old_avg = opt.state[model.item_embedding.weight][ema.EMA_KEY].clone()
    grow_table(model, opt, 128)
    avg = opt.state[model.item_embedding.weight][ema.EMA_KEY]
    assert avg.shape == (128, old_avg.shape[1])
    assert torch.equal(avg[:64], old_avg) and torch.equal(avg[64:], model.item_embedding.weight.detach()[64:])


def test_a_round_gates_and_publishes_the_average_and_a_restart_keeps_it(tmp_path):
    log = SqliteEventLog(tmp_path / "events.sqlite")
    log.append(list(generate(SMALL_DATA)))
    log.close()
    t = make_trainer(tmp_path, ema_epochs=1.0, epochs_per_round=6)  # the average spans the last ~epoch
    r = t.run_round()
    assert r.published_version == 1
    published = t.state.published_models[1]
    avg = {n: t.opt.state[p][ema.EMA_KEY] for n, p in t.model.named_parameters()}
    raw = dict(t.model.named_parameters())
    assert all(torch.equal(published[n], avg[n]) for n in avg)
    assert any(not torch.equal(avg[n], raw[n]) for n in avg)  # the engine is not the raw weights
    t2 = make_trainer(tmp_path, ema_epochs=1.0, epochs_per_round=6)  # the average is checkpointed with the optimizer
    w = t2.model.item_embedding.weight
    assert torch.equal(t2.opt.state[w][ema.EMA_KEY], avg["item_embedding.weight"])


def test_a_two_worker_round_brings_the_average_back(tmp_path):
    """DDP workers update the average in their optimizer state; rank 0's comes back with it and is published."""
    from trainer.config import ElasticConfig

    log = SqliteEventLog(tmp_path / "events.sqlite")
    log.append(list(generate(SMALL_DATA)))
    log.close()
    t = make_trainer(tmp_path, precision="fp32", ema_epochs=1.0, epochs_per_round=6, pairwise_weight=1.0,
                     elastic=ElasticConfig(max_workers=2, events_per_worker=500, device="cpu"))
    t.devices = 2
    r = t.run_round()
    assert t.metrics.registry.get_sample_value("livetower_trainer_elastic_workers") == 2
    assert r.published_version == 1, r
    avg = {n: t.opt.state[p][ema.EMA_KEY] for n, p in t.model.named_parameters()}
    assert all(torch.equal(t.state.published_models[1][n], avg[n]) for n in avg)
    assert any(not torch.equal(avg[n], p) for n, p in t.model.named_parameters())
