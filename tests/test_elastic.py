"""Elastic, distributed training rounds on 2 gloo workers (CPU): a round, DDP gradients, a scale change
1 -> 2 -> 1, a killed worker; precision modes' loss curves; the worker-count policy.

Launches are the expensive part (the first starts the forkserver and imports torch there, ~3-6 s; later ones
fork warm, < 1 s), so the 1 -> 2 -> 1 sequence is run once and several tests read it.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from benchmarks.train_bench import RoundData, fresh_model, make_round_data
from trainer.config import ElasticConfig, TrainConfig
from prometheus_client import CollectorRegistry

from trainer.elastic import (ElasticMetrics, FaultInjection, RoundFailed, choose_workers, record_choice,
                             run_distributed_round, train_windows_elastic)
from trainer.elastic.worker import GRADS_FILE
from trainer.training import (Shard, WindowLoss, epoch_batches, global_batches, local_share, make_grad_scaler,
                              rank_generator, train_epochs, train_windows, window_loss)

EPOCHS = 2
CFG = TrainConfig.tiny_debug(precision="fp32", elastic=ElasticConfig(max_workers=2, device="cpu"))


@pytest.fixture(scope="module")
def data() -> RoundData:
    return make_round_data(CFG.model, n_users=120, events_per_user=20, n_items=300, seed=3)


def _states(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _adam_steps(opt_state: dict) -> int:
    return int(next(iter(opt_state["state"].values()))["step"])


def _round(model, opt, data: RoundData, workers: int, seed: int, cfg: TrainConfig = CFG, **kw):
    return train_windows_elastic(model, opt, data.inputs_WT, data.targets_WT, data.mask_WT,
                                 item_prob_R=data.item_prob_R, n_items=data.n_items, cfg=cfg, epochs=EPOCHS,
                                 generator=torch.Generator().manual_seed(seed), workers=workers, **kw)


@pytest.fixture(scope="module")
def scale_sequence(data):
    """Rounds W=1 (in process) -> W=2 (2 gloo workers, gradients of step 0 recorded) -> W=1 on one model."""
    model, opt = fresh_model(CFG, data)
    s0 = _states(model, opt)
    r1 = _round(model, opt, data, 1, seed=1)
    s1 = _states(model, opt)
    out = run_distributed_round(s1[0], s1[1], model_config=CFG.model.to_dict(), inputs_WT=data.inputs_WT,
                                targets_WT=data.targets_WT, mask_WT=data.mask_WT, item_prob_R=data.item_prob_R,
                                n_items=data.n_items, cfg=CFG, epochs=EPOCHS, seed=2, workers=2,
                                record_grads_step=0, keep_dir=True)
    grads = torch.load(out.stats.round_dir + "/" + GRADS_FILE)
    model.load_state_dict(out.model_state)
    opt.load_state_dict(out.optimizer_state)
    s2 = _states(model, opt)
    r3 = _round(model, opt, data, 1, seed=3)
    s3 = _states(model, opt)
    return {"states": [s0, s1, s2, s3], "stats": [r1, out.stats, r3], "grads": grads}


def test_round_on_two_workers(scale_sequence, data):
    (m1, o1), (m2, o2) = scale_sequence["states"][1:3]
    st = scale_sequence["stats"][1]
    assert st.workers == 2 and not st.in_process and [a.outcome for a in st.attempts] == ["ok"]
    assert len(st.losses) == EPOCHS and all(np.isfinite(st.losses))
    assert m2.keys() == m1.keys() and all(m2[k].shape == m1[k].shape for k in m1)
    assert _max_diff(m1, m2) > 1e-3  # the model moved
    assert not torch.equal(m1["stack.layers.0.mlp.gate.e_score_correction_bias"],
                           m2["stack.layers.0.mlp.gate.e_score_correction_bias"])  # expert balancing ran
    n_steps = len(global_batches(np.arange(data.inputs_WT.shape[0]), CFG.batch_size))
    assert _adam_steps(o2) == _adam_steps(o1) + EPOCHS * n_steps  # one optimiser step per global batch
    assert (st.window_epochs_N == EPOCHS).all()  # every window trained once per epoch, across the two ranks
    assert st.events_per_s_per_worker > 0 and st.startup_seconds < 60


def test_ddp_gradients_equal_single_process_on_the_same_shards(scale_sequence, data):
    """The all-reduced gradient of step 0 = the gradient of the target-weighted mean of both ranks' losses,
    computed here in one process with the same shards and negative samplers."""
    m1, _ = scale_sequence["states"][1]
    model, _ = fresh_model(CFG, data)
    model.load_state_dict(m1)
    model.train()
    batch_B = epoch_batches(data.inputs_WT.shape[0], CFG.batch_size, 2, 0)[0]
    for rank in range(2):
        mine, weight = local_share(batch_B, data.mask_WT, rank, 2)
        loss = WindowLoss(model)(torch.from_numpy(data.inputs_WT[mine]), torch.from_numpy(data.targets_WT[mine]),
                                 torch.from_numpy(data.mask_WT[mine]), item_prob_R=data.item_prob_R,
                                 n_items=data.n_items, n_random=CFG.n_random_negatives,
                                 temperature=CFG.model.temperature, generator=rank_generator(2, 0, rank),
                                 in_batch=CFG.in_batch_negatives, logq=CFG.logq_correction,
                                 pairwise_weight=CFG.pairwise_weight)
        (loss * weight / 2).backward()
    ddp = scale_sequence["grads"]
    assert set(ddp) == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        scale = float(p.grad.abs().max()) + 1e-12
        assert float((ddp[name] - p.grad).abs().max()) <= 1e-4 * scale + 1e-7, name


def test_scale_change_1_2_1_continues_from_the_previous_state(scale_sequence, data):
    states, stats = scale_sequence["states"], scale_sequence["stats"]
    assert [s.workers for s in stats] == [1, 2, 1] and [s.in_process for s in stats] == [True, False, True]
    steps = [_adam_steps(o) for _, o in states[1:]]
    n_steps = len(global_batches(np.arange(data.inputs_WT.shape[0]), CFG.batch_size))
    assert steps == [EPOCHS * n_steps * k for k in (1, 2, 3)]  # the optimizer state is carried through W changes
    for (a, _), (b, _) in zip(states, states[1:]):
        assert _max_diff(a, b) > 1e-3
    # Training went on rather than restarting: the last round starts where the loss had got to.
    assert stats[2].losses[0] < stats[0].losses[0]


def test_killed_worker_round_retries_on_the_remaining_worker_from_the_epoch_checkpoint(data):
    model, opt = fresh_model(CFG, data)
    n_steps = len(global_batches(np.arange(data.inputs_WT.shape[0]), CFG.batch_size))
    kill = FaultInjection(rank=1, at_step=n_steps + n_steps // 2)  # rank 1 dies in the middle of epoch 2
    registry = CollectorRegistry()
    st = _round(model, opt, data, 2, seed=4, fault=kill, metrics=ElasticMetrics(registry))
    assert [(a.workers, a.start_epoch, a.outcome) for a in st.attempts] == [(2, 0, "failed"), (1, 1, "ok")]
    assert st.workers == 1 and len(st.losses) == EPOCHS and all(np.isfinite(st.losses))
    assert (st.window_epochs_N == EPOCHS).all()  # epoch 1 on 2 workers + epoch 2 on the survivor: nothing lost
    assert _adam_steps(opt.state_dict()) == EPOCHS * n_steps
    assert st.recovery_seconds is not None and st.recovery_seconds <= 10.0
    assert st.failure_detect_seconds is not None and st.failure_detect_seconds <= 5.0
    for outcome in ("failed", "ok"):
        assert registry.get_sample_value("livetower_trainer_elastic_attempts_total", {"outcome": outcome}) == 1
    assert registry.get_sample_value("livetower_trainer_elastic_recovery_seconds") == st.recovery_seconds


def test_a_round_that_fails_every_attempt_leaves_the_model_unchanged(data):
    model, opt = fresh_model(CFG, data)
    before = _states(model, opt)
    cfg = CFG.replace(elastic=CFG.elastic.replace(max_round_retries=0))
    with pytest.raises(RoundFailed, match="state is unchanged"):
        _round(model, opt, data, 2, seed=5, cfg=cfg, fault=FaultInjection(rank=0, at_step=1))
    assert _max_diff(before[0], model.state_dict()) == 0.0


def test_precision_modes_loss_curves_agree(data):
    """bf16 autocast, fp16 + GradScaler and fp32 on the same data and seed: epoch losses within 3 %."""
    curves = {}
    for precision in ("fp32", "bf16", "fp16"):
        cfg = CFG.replace(precision=precision)
        model, opt = fresh_model(cfg, data)
        res = train_epochs(model, opt, window_loss(WindowLoss(model), cfg, data.item_prob_R, data.n_items),
                           data.inputs_WT, data.targets_WT, data.mask_WT, cfg=cfg, epochs=3, seed=7,
                           scaler=make_grad_scaler(precision, "cpu", cfg.fp16_init_scale))
        curves[precision] = res.losses
    ref = curves["fp32"]
    assert ref[-1] < 0.8 * ref[0]  # it learns
    for precision, losses in curves.items():
        rel = [abs(a - b) / b for a, b in zip(losses, ref)]
        assert max(rel) < 0.03, (precision, losses, ref)


def test_train_windows_fp16_uses_a_grad_scaler_and_learns(data):
    cfg = CFG.replace(precision="fp16")
    model, opt = fresh_model(cfg, data)
    scaler = make_grad_scaler("fp16", "cpu", cfg.fp16_init_scale)
    losses = train_windows(model, opt, data.inputs_WT, data.targets_WT, data.mask_WT, item_prob_R=data.item_prob_R,
                           n_items=data.n_items, cfg=cfg, epochs=2, generator=torch.Generator().manual_seed(0),
                           scaler=scaler)
    assert all(np.isfinite(losses)) and losses[1] < losses[0]
    assert scaler.get_scale() >= cfg.fp16_init_scale / 2  # at most one overflow-skipped step


def test_policy_choice_and_reason():
    ec = ElasticConfig(min_workers=1, max_workers=4, events_per_worker=1000, freshness_target_s=10.0)
    c = choose_workers(2500, ec, devices=8)
    assert (c.workers, c.reason) == (3, "backlog") and "2500" in c.detail
    c = choose_workers(2500, ec, devices=8, events_per_s_per_worker=50.0)  # 2500 events at 50/s in 10 s -> 5
    assert (c.workers, c.reason) == (4, "max_workers")
    c = choose_workers(900, ec, devices=8, events_per_s_per_worker=45.0)
    assert (c.workers, c.reason) == (2, "freshness")
    assert choose_workers(0, ec, devices=8).workers == 1
    c = choose_workers(10_000, ec, devices=2)
    assert (c.workers, c.reason) == (2, "devices")
    c = choose_workers(10, ElasticConfig(min_workers=3, max_workers=4), devices=2)
    assert (c.workers, c.reason) == (2, "devices") and "below min_workers" in c.detail
    assert choose_workers(10, ElasticConfig(min_workers=2, max_workers=4), devices=8).reason == "min_workers"
    registry = CollectorRegistry()
    record_choice(c, ElasticMetrics(registry))
    assert registry.get_sample_value("livetower_trainer_elastic_workers") == 2
    assert registry.get_sample_value("livetower_trainer_elastic_choices_total", {"reason": "devices"}) == 1


@pytest.mark.parametrize("field, value", [("min_workers", 0), ("max_workers", 0), ("device", "tpu"),
                                          ("start_method", "thread"), ("freshness_target_s", 0.0),
                                          ("max_round_retries", -1)])
def test_elastic_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"ElasticConfig.{field}"):
        ElasticConfig(**{field: value})


def test_train_config_precisions():
    assert TrainConfig.tiny_debug(precision="fp16").precision == "fp16"
    with pytest.raises(ValueError, match="TrainConfig.precision"):
        TrainConfig.tiny_debug(precision="fp8")
    with pytest.raises(ValueError, match="TrainConfig.fp16_init_scale"):
        TrainConfig.tiny_debug(fp16_init_scale=0.0)
    assert dataclasses.fields(TrainConfig)  # frozen, typed


def test_torchrun_entry_point_resumes_a_round_from_its_epoch_checkpoint(scale_sequence, tmp_path):
    """`torchrun -m trainer.elastic ROUND_DIR/spec.pt` (the multi-node path, deploy/k8s/) on 2 local workers:
    with the last epoch's checkpoint gone, it trains only that epoch again and writes it."""
    import shutil
    import subprocess
    import sys

    from trainer.elastic.files import load_spec, load_tensors, save_spec
    from trainer.elastic.launcher import free_port
    from trainer.elastic.worker import SPEC_FILE, RoundSpec, checkpoint_path

    src = scale_sequence["stats"][1].round_dir
    round_dir = tmp_path / "round"
    shutil.copytree(src, round_dir)
    spec = load_spec(round_dir / SPEC_FILE, RoundSpec)
    assert spec.cfg == CFG  # the JSON spec carries the whole config back
    save_spec(round_dir / SPEC_FILE, dataclasses.replace(spec, out_dir=str(round_dir),
                                                         state_path=str(round_dir / "state_input.pt"),
                                                         record_grads_step=None))
    for f in round_dir.glob("*.pt"):  # every round file the launcher and workers wrote: no pickle
        torch.load(f, weights_only=True)
    checkpoint_path(round_dir, EPOCHS).unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--max-restarts", "0",
           "-m", "trainer.elastic", str(round_dir / SPEC_FILE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = load_tensors(checkpoint_path(round_dir, EPOCHS))  # weights_only=True: no pickle in round files
    before = load_tensors(checkpoint_path(round_dir, EPOCHS - 1))
    assert len(final["losses"]) == EPOCHS and final["losses"][0] == before["losses"][0]  # epoch 1 was not redone
    assert (final["window_epochs_N"] == EPOCHS).all()


def test_local_share_weights_and_stand_in():
    mask_WT = np.zeros((4, 3), bool)
    mask_WT[0, :] = True       # 3 targets (rank 0's share: windows 0 and 2)
    mask_WT[2, 2] = True       # 1 target
    batch_B = np.arange(4)     # rank 1's share (windows 1, 3) has no target
    mine, w = local_share(batch_B, mask_WT, 0, 2)
    assert list(mine) == [0, 2] and w == 2 * 4 / 4
    mine, w = local_share(batch_B, mask_WT, 1, 2)
    assert w == 0.0 and mask_WT[mine].any()  # trains a stand-in with weight 0, so the all-reduce still happens


def test_the_epoch_plan_is_one_seeded_permutation_and_ranks_train_disjoint_shards_of_it():
    n, bs = 1000, 32
    plan = epoch_batches(n, bs, seed=5, epoch=3)
    assert [len(b) for b in plan] == [bs] * (n // bs) + [n % bs]
    assert sorted(np.concatenate(plan)) == list(range(n))  # every window once
    assert all(np.array_equal(a, b) for a, b in zip(plan, epoch_batches(n, bs, seed=5, epoch=3)))  # (seed, epoch)
    assert not np.array_equal(plan[0], epoch_batches(n, bs, seed=5, epoch=4)[0])
    assert not np.array_equal(plan[0], epoch_batches(n, bs, seed=6, epoch=3)[0])
    for world in (2, 3):
        for batch_B in plan:
            shards = [batch_B[r::world] for r in range(world)]
            assert sorted(np.concatenate(shards)) == sorted(batch_B)  # disjoint, and together the whole batch


def test_length_bucketing_keeps_every_window_once_and_sorts_within_chunks():
    rng = np.random.default_rng(0)
    n, bs = 5000, 16
    lengths_W = rng.integers(1, 50, n)
    plan = epoch_batches(n, bs, seed=1, epoch=0, lengths_W=lengths_W)
    assert sorted(np.concatenate(plan)) == list(range(n))
    spread = np.mean([np.ptp(lengths_W[b]) for b in plan])
    assert spread < 0.2 * np.mean([np.ptp(lengths_W[b]) for b in epoch_batches(n, bs, seed=1, epoch=0)])
    assert not np.array_equal(plan[0], epoch_batches(n, bs, seed=1, epoch=1, lengths_W=lengths_W)[0])


def test_train_windows_is_the_in_process_round_and_on_epoch_end_can_stop(data):
    """The sidecar's train_windows and the elastic W = 1 in-process path run the same loop on the same seed."""
    a, opt_a = fresh_model(CFG, data)
    b, opt_b = fresh_model(CFG, data)
    losses = train_windows(a, opt_a, data.inputs_WT, data.targets_WT, data.mask_WT, item_prob_R=data.item_prob_R,
                           n_items=data.n_items, cfg=CFG, epochs=EPOCHS, generator=torch.Generator().manual_seed(9))
    st = _round(b, opt_b, data, 1, seed=9)
    assert st.in_process and st.losses == losses
    assert _max_diff(a.state_dict(), b.state_dict()) == 0.0
    seen = []
    res = train_epochs(a, opt_a, window_loss(WindowLoss(a), CFG, data.item_prob_R, data.n_items), data.inputs_WT,
                       data.targets_WT, data.mask_WT, cfg=CFG, epochs=5, seed=1,
                       on_epoch_end=lambda e, l, c: seen.append((e, len(l), int(c.min()))) or e == 2)
    assert seen == [(1, 1, 1), (2, 2, 2)] and len(res.losses) == 2 and not a.training


def test_shard_needs_an_all_reduce_beyond_one_rank():
    with pytest.raises(ValueError, match="all_reduce"):
        Shard(rank=0, world=2)
    with pytest.raises(ValueError, match="rank"):
        Shard(rank=2, world=2, all_reduce=lambda t: None)


def test_round_files_hold_no_pickle(tmp_path):
    """Data, state and checkpoint files load with weights_only=True (numpy arrays come back as numpy); the spec
    is JSON and comes back equal; a file holding any other object is refused, not run."""
    import pickle

    from trainer.elastic.files import load_spec, load_tensors, save_spec, save_tensors
    from trainer.elastic.worker import FaultInjection, RoundSpec

    mask = np.array([[True, False], [False, True]])
    save_tensors(tmp_path / "d.pt", {"mask_WT": mask, "p": torch.arange(3.0), "n": 7, "opt": {"state": {0: {}},
                                     "param_groups": [{"betas": (0.9, 0.99), "foreach": None}]}})
    back = load_tensors(tmp_path / "d.pt")
    assert isinstance(back["mask_WT"], np.ndarray) and (back["mask_WT"] == mask).all()
    assert back["n"] == 7 and back["opt"]["param_groups"][0]["betas"] == (0.9, 0.99)
    spec = RoundSpec(out_dir="/r", state_path="/r/s.pt", cfg=CFG, model_config=CFG.model.to_dict(), epochs=2,
                     start_epoch=0, seed=5, attempt=1, device="cpu", fault=FaultInjection(rank=1, at_step=3))
    save_spec(tmp_path / "spec.json", spec)
    assert load_spec(tmp_path / "spec.json", RoundSpec) == spec
    torch.save({"spec": spec}, tmp_path / "evil.pt")  # an object a pickle would rebuild (and could run code for)
    with pytest.raises(pickle.UnpicklingError):
        load_tensors(tmp_path / "evil.pt")
