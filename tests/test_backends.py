"""Compile a small user tower with every backend and check the runners against eager.

The AOTInductor compile dominates the run time (~15-40 s on 2 cores), so each
backend is compiled once per module via a module-scoped fixture.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contracts.engine_format.backends import (
    BACKENDS,
    EngineFileNotFound,
    EngineLoadError,
    load_runner,
)
from trainer.export.compile import (
    BACKENDS as BUILD_BACKENDS,
    FILENAMES,
    CompileOptions,
    compile_user_tower,
)

N_ITEMS, DIM, T, MAX_BATCH = 1000, 32, 12, 32
TOL = {"aoti": 1e-5, "torch": 1e-5, "onnx": 1e-4}


# --------------------------------------------------------------------------- small representative tower


class _DenseMoE(nn.Module):
    """Top-2-of-4 MoE computed densely: topk -> scatter into (B,T,E) weights -> einsum."""

    def __init__(self, d: int, n_experts: int = 4, k: int = 2) -> None:
        super().__init__()
        self.k = k
        self.gate = nn.Linear(d, n_experts, bias=False)
        self.w_in_EDH = nn.Parameter(torch.randn(n_experts, d, 2 * d) * d**-0.5)
        self.w_out_EHD = nn.Parameter(torch.randn(n_experts, 2 * d, d) * (2 * d) ** -0.5)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        probs_BTE = F.softmax(self.gate(x_BTD), dim=-1)
        top_v, top_i = torch.topk(probs_BTE, self.k, dim=-1)
        top_v = top_v / top_v.sum(-1, keepdim=True)
        dense_BTE = torch.zeros_like(probs_BTE).scatter(-1, top_i, top_v)
        h_BTEH = F.silu(torch.einsum("btd,edh->bteh", x_BTD, self.w_in_EDH))
        y_BTED = torch.einsum("bteh,ehd->bted", h_BTEH, self.w_out_EHD)
        return torch.einsum("bted,bte->btd", y_BTED, dense_BTE)


class _Block(nn.Module):
    def __init__(self, d: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.moe = _DenseMoE(d)

    def forward(self, x_BTD: torch.Tensor, mask_BTT: torch.Tensor) -> torch.Tensor:
        B, T_, D = x_BTD.shape
        hd = D // self.heads
        q, k, v = self.qkv(self.norm1(x_BTD)).view(B, T_, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) * torch.rsqrt(torch.tensor(float(hd)))
        scores = scores.masked_fill(~mask_BTT[:, None], -1e9)
        attn = (F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T_, D)
        x_BTD = x_BTD + self.proj(attn)
        return x_BTD + self.moe(self.norm2(x_BTD))


class SmallTower(nn.Module):
    def __init__(self, n_items: int = N_ITEMS, d: int = DIM, t: int = T, layers: int = 1) -> None:
        super().__init__()
        self.emb = nn.Embedding(n_items, d, padding_idx=0)
        self.pos_TD = nn.Parameter(torch.randn(t, d) * 0.02)
        # Non-persistent buffer: absent from state_dict(), must still be packaged.
        self.register_buffer("causal_TT", torch.tril(torch.ones(t, t, dtype=torch.bool)), persistent=False)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(layers))
        self.out = nn.Linear(d, d)

    def forward(self, history_BT: torch.Tensor) -> torch.Tensor:
        x_BTD = self.emb(history_BT) + self.pos_TD
        valid_BT = history_BT != 0
        mask_BTT = self.causal_TT[None] & valid_BT[:, None, :]
        # Always let a position see itself, so all-padding rows stay finite.
        mask_BTT = mask_BTT | torch.eye(history_BT.shape[1], dtype=torch.bool)[None]
        for block in self.blocks:
            x_BTD = block(x_BTD, mask_BTT)
        return F.normalize(self.out(x_BTD[:, -1]), dim=-1)


def _history(batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(1, N_ITEMS, (batch, T), generator=g)
    lengths = torch.randint(0, T + 1, (batch,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        h[i, : T - n] = 0  # left padding
    return h


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tower() -> SmallTower:
    torch.manual_seed(0)
    return SmallTower().eval()


@pytest.fixture(scope="module")
def engines(tower, tmp_path_factory) -> dict[str, Path]:
    """Compile every backend once; returns backend -> engine path."""
    root = tmp_path_factory.mktemp("engines")
    example = _history(1)  # batch 1 on purpose: compile must avoid 0/1 specialisation
    paths: dict[str, Path] = {}
    for backend in BUILD_BACKENDS:
        messages: list[str] = []
        written = compile_user_tower(
            tower,
            example,
            root / backend,
            CompileOptions(backend=backend, max_batch=MAX_BATCH, inductor_cache_dir=str(root / "inductor_cache")),
            progress=messages.append,
        )
        assert len(written) == 1 and written[0].is_absolute()
        assert written[0] == root / backend / FILENAMES[backend]
        assert messages and messages[0].startswith("exporting")
        paths[backend] = written[0]
    assert not tower.training
    return paths


@pytest.fixture(scope="module")
def runners(engines) -> dict[str, object]:
    return {b: load_runner(b, p, num_threads=1) for b, p in engines.items()}


# --------------------------------------------------------------------------- tests


def test_backend_lists_agree():
    assert BACKENDS is BUILD_BACKENDS and BACKENDS == ("aoti", "onnx", "torch")  # one definition


@pytest.mark.parametrize("backend", BACKENDS)
def test_runner_matches_eager(backend, tower, runners):
    runner = runners[backend]
    assert runner.backend == backend
    assert runner.history_len == T and runner.max_batch == MAX_BATCH
    history = _history(17, seed=7)
    for batch in (1, 3, 17):
        x = history[:batch]
        with torch.no_grad():
            expected = tower(x).numpy()
        got = runner(x.numpy())
        assert got.shape == (batch, DIM) and got.dtype == np.float32 and got.flags.c_contiguous
        diff = float(np.abs(got - expected).max())
        assert diff < TOL[backend], f"{backend} batch {batch}: max abs diff {diff}"
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_runner_rejects_bad_input(backend, runners):
    runner = runners[backend]
    with pytest.raises(ValueError, match="shape"):
        runner(np.zeros((2, T + 1), dtype=np.int64))
    with pytest.raises(ValueError, match="int64"):
        runner(np.zeros((2, T), dtype=np.int32))
    with pytest.raises(ValueError, match="batch"):
        runner(np.zeros((MAX_BATCH + 1, T), dtype=np.int64))
    # Max batch itself and a non-contiguous view are fine.
    assert runner(np.zeros((MAX_BATCH, T), dtype=np.int64)).shape == (MAX_BATCH, DIM)
    assert runner(np.zeros((4, 2 * T), dtype=np.int64)[:, ::2]).shape == (4, DIM)


def test_onnx_is_single_file_with_inline_weights(engines):
    import onnx

    path = engines["onnx"]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    model = onnx.load(str(path), load_external_data=False)
    assert model.graph.initializer
    assert all(i.data_location != onnx.TensorProto.EXTERNAL for i in model.graph.initializer)


def test_unknown_backend_raises(engines):
    with pytest.raises(ValueError, match=r"backend.*aoti, onnx, torch"):
        load_runner("tensorrt", engines["torch"])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"backend": "tensorrt"}, "backend"),
        ({"max_batch": 1}, "max_batch"),
        ({"max_batch": "256"}, "max_batch"),
        ({"inductor_cache_dir": ""}, "inductor_cache_dir"),
    ],
)
def test_compile_options_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CompileOptions(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_file_raises(backend, tmp_path):
    missing = tmp_path / "nope.bin"
    with pytest.raises(EngineFileNotFound, match="nope.bin"):
        load_runner(backend, missing)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_raises(backend, damage, engines, tmp_path):
    data = engines[backend].read_bytes()
    bad = tmp_path / f"bad_{engines[backend].name}"
    if damage == "truncate":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(b"\x00not an engine\xff" * 64)
    else:
        bad.write_bytes(b"")
    with pytest.raises(EngineLoadError, match=bad.name):
        load_runner(backend, bad)


def test_call_while_another_runner_loads(engines, runners, tower):
    """A serving thread keeps getting correct answers while a new engine loads."""
    x = _history(3, seed=3)
    with torch.no_grad():
        expected = tower(x).numpy()
    errors: list[BaseException] = []
    stop = threading.Event()

    def serve() -> None:
        try:
            while not stop.is_set():
                for backend in ("onnx", "aoti"):
                    got = runners[backend](x.numpy())
                    assert np.abs(got - expected).max() < 1e-4
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        for backend in BACKENDS:
            fresh = load_runner(backend, engines[backend], num_threads=1)
            assert np.abs(fresh(x.numpy()) - expected).max() < TOL[backend]
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors


def test_aoti_inputs_cross_as_views_with_no_python_owner(engines, monkeypatch):
    """A run's input handles view the inputs' memory (libtorch's C shim): unlike a handle of the Python tensor, they
    hold no reference to its Python object, so the run frees them mid-call without taking the GIL
    (contracts/engine_format/aoti_abi.py). The answers are those of handles of the Python tensors."""
    from contracts.engine_format import aoti_abi

    assert aoti_abi._TENSOR_SHIM is not None, "libtorch's C shim did not load"
    x = torch.arange(24, dtype=torch.int64).view(4, 6)[:, 1:]  # strided, not contiguous
    before = sys.getrefcount(x)
    owned = aoti_abi._new_handles([x])
    assert sys.getrefcount(x) == before + 1  # the old way: the handle keeps the Python object alive
    aoti_abi._steal_handles(owned)
    view = aoti_abi._TENSOR_SHIM.view_handle(x)
    assert sys.getrefcount(x) == before
    (seen,) = aoti_abi._steal_handles([view])
    assert seen.data_ptr() == x.data_ptr() and seen.stride() == x.stride() and torch.equal(seen, x)

    base = torch.zeros(10, 10, dtype=torch.float32)  # an output aliasing an input is copied: the span test
    col, row = aoti_abi._extent(base[:, 3]), aoti_abi._extent(base[4])
    assert col == (base.data_ptr() + 3 * 4, base.data_ptr() + (3 + 9 * 10 + 1) * 4)
    assert aoti_abi._overlaps(row, [col]) and not aoti_abi._overlaps(aoti_abi._extent(torch.zeros(3)), [col, row])

    runner = load_runner("aoti", engines["aoti"])
    hist = _history(5, seed=13).numpy()
    via_views = runner(hist)
    monkeypatch.setattr(aoti_abi, "_TENSOR_SHIM", None)  # a libtorch without the shim: handles of the tensors
    assert np.array_equal(runner(hist), via_views)


def test_server_side_imports_no_trainer_or_grpc():
    code = (
        "import sys, contracts.engine_format.backends, server.engine.manager; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('trainer', 'grpc')]; "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=120)


def test_aoti_refit_runs_new_weights_on_the_compiled_graph(engines, tower, tmp_path):
    """Refit: a fresh runner of the compiled package with another model's weights (same architecture)."""
    torch.manual_seed(7)
    other = SmallTower().eval()
    fqns = [f for f in torch._inductor.aoti_load_package(str(engines["aoti"])).get_constant_fqns()
            if not f.startswith("_tensor_constant")]  # literal tensors stay the graph's own
    tensors = {**dict(other.named_parameters()), **dict(other.named_buffers())}
    weights = tmp_path / "weights.pt"
    torch.save({f: tensors[f].detach() for f in fqns}, weights)
    x = _history(5, seed=11)
    refit = load_runner("aoti", engines["aoti"], weights=weights)
    with torch.no_grad():
        want, old = other(x).numpy(), tower(x).numpy()
    assert np.abs(refit(x.numpy()) - want).max() < TOL["aoti"]
    assert np.abs(load_runner("aoti", engines["aoti"])(x.numpy()) - old).max() < TOL["aoti"]  # package untouched
    partial = tmp_path / "partial.pt"
    torch.save({f: tensors[f].detach() for f in fqns[1:]}, partial)
    with pytest.raises(EngineLoadError, match="do not match the compiled graph"):
        load_runner("aoti", engines["aoti"], weights=partial)
    with pytest.raises(EngineLoadError, match="refit weights file missing"):
        load_runner("aoti", engines["aoti"], weights=tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="aoti backend only"):
        load_runner("onnx", engines["onnx"], weights=weights)
