"""The Triton retrieval kernel against its torch reference: on CPU under Triton's interpreter, or on
the GPU where there is one.

Modes (chosen at import, see MODE):
  "cuda":        torch sees a GPU and TRITON_INTERPRET is not "1": the compiled kernel on CUDA tensors.
  "interpreter": CPU. Triton decorates its own standard library (tl.zeros, tl.topk, ...) when it is
                 first imported, so TRITON_INTERPRET=1 must be set before the first `import triton` in
                 the process: this module sets it, imports triton and its own copy of
                 kernels/topk_triton.py (the regular module, if anything imported it, is untouched),
                 then restores the variable; an autouse fixture sets it again during each test, because
                 the interpreter also reads it while a kernel runs.
  "subprocess":  CPU, but triton was already imported in this process without the interpreter: a
                 single test reruns this file in a fresh process with TRITON_INTERPRET=1.
The interpreter runs `xor_sum` (used by `tl.topk`'s bitonic compare-and-swap) one element at a time in
Python; a module fixture gives it an exact numpy fast path (xor is associative), ~50x faster. The
kernel code is unchanged by this.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kernels.retrieval import MAX_K, topk_cosine_reference

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

KERNEL_FILE = Path(__file__).resolve().parents[1] / "kernels" / "topk_triton.py"


def _import_interpreted():
    """(module, True) if the interpreter could be switched on for this process, else (None, False)."""
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(tl.zeros, InterpretedFunction):  # triton came in earlier without it
            return None, False
        spec = importlib.util.spec_from_file_location("kernels._topk_triton_interpreted", KERNEL_FILE)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod, True
    finally:
        if prev is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = prev


if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    import kernels.topk_triton as kt

    MODE, DEVICE = "cuda", "cuda"
else:
    kt, ok = _import_interpreted()
    MODE, DEVICE = ("interpreter" if ok else "subprocess"), "cpu"

import triton.language as tl  # noqa: E402  (after the interpreter decision above)

# Item values are exact in fp32 whatever their storage dtype, and both sides accumulate in fp32
# (tf32x3 on the GPU), so the score tolerance is set by fp32 rounding (dot order, x/|x| vs x*(1/|x|)),
# not by the item dtype. Kept per dtype so that a future bf16-dot path can loosen its own entry.
ATOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _mode(request, monkeypatch):
    if MODE == "subprocess":
        if request.node.name != "test_rerun_in_a_fresh_process":
            pytest.skip("triton was imported without the interpreter; rerun in a fresh process")
        return
    if request.node.name == "test_rerun_in_a_fresh_process":
        pytest.skip("only when triton was imported before this module")
    if MODE == "interpreter":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        torch.set_num_threads(1)
        assert kt.interpreter_active()


@pytest.fixture(scope="module", autouse=True)
def _fast_xor_sum():
    if MODE != "interpreter":
        yield
        return
    from triton.runtime import interpreter as ti

    orig = ti.ReduceOps.apply_impl

    def apply_impl(self, input):
        if self.combine_fn is tl.standard._xor_combine and len(input) == 1 and self.axis is not None:
            x = input[0]
            out = np.bitwise_xor.reduce(x.handle.data, axis=self.axis, keepdims=self.keep_dims)
            return self.to_tensor(out, x.dtype)
        return orig(self, input)

    ti.ReduceOps.apply_impl = apply_impl
    yield
    ti.ReduceOps.apply_impl = orig


def test_rerun_in_a_fresh_process():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       cwd=KERNEL_FILE.parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]


def make(B, N, D, dtype, *, normalized=False, seed=0, qdtype=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, generator=g).to(qdtype or dtype)
    it = torch.randn(N, D, generator=g)
    if normalized:
        it = torch.nn.functional.normalize(it, dim=-1)
    return q, it.to(dtype)


def run(q, it, k, exclude_BN=None, **kw):
    """The kernel on DEVICE for CPU inputs; CPU outputs."""
    ex = None if exclude_BN is None else exclude_BN.to(DEVICE)
    s, i = kt.topk_cosine_triton(q.to(DEVICE), it.to(DEVICE), k, exclude_BN=ex, **kw)
    return s.cpu(), i.cpu()


def ref_scores_BN(q, it, normalized, exclude_BN=None):
    qn = torch.nn.functional.normalize(q.double(), dim=-1)
    itn = it.double() if normalized else torch.nn.functional.normalize(it.double(), dim=-1)
    s = qn @ itn.T
    return s if exclude_BN is None else s.masked_fill(exclude_BN, float("-inf"))


def assert_matches(out, ref, scores_BN, atol):
    """Same score vector as the reference; the kernel's indices are distinct and really have the
    scores it reports (so near-ties may come out in either order, but nothing wrong gets in)."""
    s, i = out
    rs, ri = ref
    assert s.shape == rs.shape and i.shape == ri.shape
    assert s.dtype == torch.float32 and i.dtype == torch.int64
    torch.testing.assert_close(s, rs.float(), atol=atol, rtol=0)
    torch.testing.assert_close(scores_BN.gather(1, i).float(), s, atol=atol, rtol=0)
    for row in i.tolist():
        assert len(set(row)) == len(row)
    assert torch.all(s[:, :-1] >= s[:, 1:])


SHAPES = [  # B, N, D, k
    (1, 1, 3, 1),
    (3, 7, 65, 5),
    (1, 1013, 64, 10),
    (32, 300, 65, 100),
    (33, 50, 8, 7),
    (2, 1013, 3, 5),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("B,N,D,k", SHAPES)
def test_parity_odd_shapes(B, N, D, k, dtype, normalized):
    q, it = make(B, N, D, dtype, normalized=normalized, seed=B * 7 + N)
    out = run(q, it, k, items_normalized=normalized)
    ref = topk_cosine_reference(q, it, k, items_normalized=normalized)
    assert_matches(out, ref, ref_scores_BN(q, it, normalized), ATOL[dtype])


@pytest.mark.parametrize("qdtype,dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                          (torch.bfloat16, torch.float32)])
def test_mixed_query_and_item_dtypes(qdtype, dtype):
    q, it = make(4, 200, 24, dtype, qdtype=qdtype)
    out = run(q, it, 20)
    ref = topk_cosine_reference(q, it, 20)
    assert_matches(out, ref, ref_scores_BN(q, it, False), ATOL[dtype])


@pytest.mark.parametrize("N,k,K", [(7, 1, 1), (7, 7, 7), (7, 50, 7), (1, MAX_K, 1), (1100, MAX_K, MAX_K)])
def test_k_edges(N, k, K):
    q, it = make(2, N, 16, torch.float16, seed=N)
    s, i = run(q, it, k)
    assert s.shape == i.shape == (2, K)
    assert_matches((s, i), topk_cosine_reference(q, it, k), ref_scores_BN(q, it, False), ATOL[torch.float16])


@pytest.mark.parametrize("k", [0, -1, MAX_K + 1])
def test_k_out_of_range_is_an_error(k):
    q, it = make(1, 10, 4, torch.float16)
    with pytest.raises(ValueError, match=r"k is .*1\.\.1000"):
        kt.topk_cosine_triton(q, it, k)


def test_empty_batch():
    q, it = make(0, 10, 4, torch.float16)
    s, i = run(q, it, 3)
    assert s.shape == i.shape == (0, 3)


def stable_oracle(q, it, k, normalized=False, exclude_BN=None):
    """Indices of the top-k by fp64 score, ties -> lower index first (the kernel's rule). Scores within 2^-40 are
    ties: two different rows with the same exact cosine can normalise one fp64 ulp apart (this machine's MKL did,
    2026-12-06), far below what fp32 or the kernel can tell apart."""
    s = torch.round(ref_scores_BN(q, it, normalized, exclude_BN) * 2.0**40)
    return torch.sort(s, dim=1, descending=True, stable=True).indices[:, :min(k, it.shape[0])]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_go_to_the_lower_index(dtype):
    g = torch.Generator().manual_seed(5)
    # Exact arithmetic, so copies of a row score bit-equal whatever the summation order of the BLAS behind the
    # interpreter's tl.dot (with random floats one machine's OpenBLAS rounded copies apart): integer items, and
    # queries of four +-1 entries (norm 2: normalised entries +-0.5 exactly).
    base = torch.randint(-3, 4, (40, 12), generator=g).float()
    rows = torch.randperm(120, generator=g) % 40  # every row three times, scattered over the matrix
    it = base[rows].to(dtype)
    signs = torch.randint(0, 2, (5, 12), generator=g).float() * 2 - 1
    q = (signs * (torch.rand(5, 12, generator=g).argsort(dim=1).argsort(dim=1) < 4)).to(dtype)
    s, i = run(q, it, 50, block_n=32, n_splits=2)  # ties across tiles and splits
    assert torch.equal(i, stable_oracle(q, it, 50))
    dup = rows[i]  # equal rows must report bit-equal scores
    for b in range(5):
        for r in set(dup[b].tolist()):
            assert len(set(s[b][dup[b] == r].tolist())) == 1


def test_zero_query_scores_zero_and_returns_the_first_items():
    q, it = make(2, 300, 9, torch.float16)
    q[1] = 0
    s, i = run(q, it, 10)
    assert torch.equal(s[1], torch.zeros(10)) and torch.equal(i[1], torch.arange(10))
    rs, _ = topk_cosine_reference(q, it, 10)
    assert torch.equal(rs[1], torch.zeros(10))  # the reference agrees: F.normalize(0) = 0


def test_zero_item_rows_score_zero():
    g = torch.Generator().manual_seed(2)
    it = torch.randn(64, 6, generator=g)
    it[10:20] = 0
    q = torch.randn(3, 6, generator=g)
    s, i = run(q, it, 64)
    sc = dict(zip(i[0].tolist(), s[0].tolist()))
    assert all(sc[j] == 0.0 for j in range(10, 20))
    assert torch.equal(i, stable_oracle(q, it, 64))  # the zero rows come out in index order


@pytest.mark.parametrize("normalized", [False, True])
def test_exclude_mask(normalized):
    q, it = make(3, 150, 16, torch.bfloat16, normalized=normalized, seed=9)
    g = torch.Generator().manual_seed(1)
    ex = torch.rand(3, 150, generator=g) < 0.5
    ex[2] = True  # nothing allowed: all -inf, indices 0.. in order
    ex[1, :145], ex[1, 145:] = True, False  # 5 allowed, k=20: the tail is -inf
    s, i = run(q, it, 20, items_normalized=normalized, exclude_BN=ex)
    rs, ri = topk_cosine_reference(q, it, 20, items_normalized=normalized, exclude_BN=ex)
    fin = torch.isfinite(rs)
    assert torch.equal(torch.isfinite(s), fin)
    torch.testing.assert_close(s[fin], rs[fin], atol=ATOL[torch.bfloat16], rtol=0)
    assert not ex.gather(1, i)[fin].any()
    assert torch.equal(i[2], torch.arange(20))
    assert torch.equal(i[1][5:], torch.arange(15))  # excluded tail: lower index first as well
    assert torch.equal(i, stable_oracle(q, it, 20, normalized, ex))


@pytest.mark.parametrize("kw", [dict(n_splits=1), dict(n_splits=3, block_n=32), dict(block_n=256),
                                dict(block_b=32), dict(n_splits=100)])
def test_launch_configs_give_identical_results(kw):
    """Tile size, split count and query block change the merge path, not the answer (scores may move
    by an ulp: a different tile shape is a different dot)."""
    q, it = make(5, 400, 20, torch.float16, seed=4)
    base = run(q, it, 9)
    other = run(q, it, 9, **kw)
    torch.testing.assert_close(other[0], base[0], atol=ATOL[torch.float16], rtol=0)
    assert torch.equal(base[1], stable_oracle(q, it, 9)) and torch.equal(other[1], base[1])


@pytest.mark.parametrize("args,msg", [
    (lambda: (torch.randn(3), torch.randn(4, 3).half(), 1), "queries must be"),
    (lambda: (torch.randn(1, 3), torch.randn(4, 5).half(), 1), "D=3 but items have D=5"),
    (lambda: (torch.randn(1, 3), torch.randint(0, 3, (4, 3)), 1), "items_ND dtype"),
    (lambda: (torch.randn(1, 3).double(), torch.randn(4, 3), 1), "queries_BD dtype"),
    (lambda: (torch.randn(1, 3), torch.randn(3, 4).half().T, 1), "items_ND must be contiguous"),
])
def test_launcher_errors(args, msg):
    q, it, k = args()
    with pytest.raises(ValueError, match=msg):
        kt.topk_cosine_triton(q, it, k)


def test_exclude_mask_checked():
    q, it = make(2, 10, 4, torch.float16)
    for bad in (torch.zeros(2, 9, dtype=torch.bool), torch.zeros(2, 10, dtype=torch.uint8)):
        with pytest.raises(ValueError, match="exclude_BN must be a bool tensor of shape"):
            kt.topk_cosine_triton(q, it, 3, exclude_BN=bad)


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    q, it = make(1, 10, 4, torch.float16)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        kt.topk_cosine_triton(q, it, 3)


def test_dispatcher():
    q, it = make(2, 100, 8, torch.float16)
    ref = topk_cosine_reference(q, it, 5)
    qd, itd = q.to(DEVICE), it.to(DEVICE)
    out = kt.topk_cosine(qd, itd, 5, backend="torch")
    torch.testing.assert_close((out[0].cpu(), out[1].cpu()), ref, atol=ATOL[torch.float16], rtol=0)
    auto = kt.topk_cosine(qd, itd, 5)  # CPU tensors: the reference; CUDA tensors: the kernel
    if MODE == "cuda":
        assert_matches((auto[0].cpu(), auto[1].cpu()), ref, ref_scores_BN(q, it, False), ATOL[torch.float16])
    else:
        assert torch.equal(auto[0], ref[0]) and torch.equal(auto[1], ref[1])
    out = kt.topk_cosine(qd, itd, 5, backend="triton")
    assert_matches((out[0].cpu(), out[1].cpu()), ref, ref_scores_BN(q, it, False), ATOL[torch.float16])
    with pytest.raises(ValueError, match="backend"):
        kt.topk_cosine(q, it, 5, backend="cuda")


def test_unpack_keys_round_trip():
    vals = torch.tensor([1.0, 0.5, 0.0, -1e-30, -0.25, -1.0, float("-inf")])
    bits = vals.view(torch.int32)
    key32 = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    idx = torch.tensor([0, 5, 7, 2, 1, 2**31 - 2, 3])
    keys = (key32 << 32) | (0xFFFFFFFF - idx)
    assert torch.equal(torch.sort(keys, descending=True).values, keys)  # order-preserving
    s, i = kt.unpack_keys(keys)
    assert torch.equal(s, vals) and torch.equal(i, idx)


COMPILE_SCRIPT = r"""
import triton, kernels.topk_triton as kt
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
fn = kt._topk_stage1_kernel
for arch, dt, norm, ex, KB, BLOCK_N in [(80, "bf16", False, True, 4, 16), (90, "fp16", True, False, 8, 32)]:
    sig = dict(q_ptr="*fp32", it_ptr="*" + dt, ex_ptr="*u8", cand_ptr="*i64", B="i32", N="i32", D="i32",
               tiles_per_split="i32", stride_qb="i32", stride_in="i32", stride_eb="i32", stride_cb="i32")
    consts = dict(ITEMS_NORMALIZED=norm, HAS_EXCLUDE=ex, BLOCK_B=16, BLOCK_N=BLOCK_N, BLOCK_D=16, KB=KB,
                  INPUT_PRECISION="tf32x3")
    sig.update({k: "constexpr" for k in consts})
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    c = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
    assert "cubin" in c.asm, list(c.asm)
    print("compiled", arch, dt)
"""


def test_compiles_for_gpus_without_one():
    """The interpreter runs the kernel's Python, not its GPU lowering: compile two small variants for
    sm_80 / sm_90 down to cubin (no GPU needed), in a fresh process without the interpreter. The big
    variants compile too (checked by hand: k=100 ~30 s, k=1000 ~6.5 min on 2 CPU cores), too slow here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], cwd=KERNEL_FILE.parents[1], env=env,
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and ("ptxas" in r.stderr.lower() and "not found" in r.stderr.lower()):
        pytest.skip("this triton install has no ptxas")
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("compiled") == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_benchmark_without_cuda(tmp_path, capsys):
    from benchmarks.kernels import main

    assert main(["--out", str(tmp_path / "gpu")]) == 2
    assert "no CUDA device: this benchmark measures GPU kernels; run it on a GPU host" in capsys.readouterr().err
    assert not (tmp_path / "gpu").exists()
    args = ["--cpu-smoke", "--smoke-items", "500", "--smoke-reps", "1", "--batch", "1", "--dtypes", "fp16",
            "--out", str(tmp_path / "smoke")]
    assert main(args) == 0
    assert "NOT a GPU measurement" in capsys.readouterr().out
    import json

    res = json.loads((tmp_path / "smoke" / "cpu_smoke.json").read_text())
    assert res["not_a_gpu_measurement"] is True and res["kind"] == "cpu-smoke"
