"""Triton retrieval kernel: fused L2-normalise + dot product + top-k over an item matrix.

Same contract as `kernels.retrieval.topk_cosine_reference` (the plain-torch reference and CPU path):
scores are cosine similarities computed in fp32, results best first, K = min(k, N) columns, excluded
items score -inf. One addition: the order is fully defined. Ties (equal fp32 scores) go to the lower
item index first, in both stages. (The reference uses `torch.topk`, whose tie order is unspecified;
the tests check the kernel's rule against a stable sort of fp64 scores.)

Two stages:
  1. `_topk_stage1_kernel`, grid (ceil(B / BLOCK_B), n_splits). A program owns BLOCK_B queries and one
     contiguous split of the items, walks it BLOCK_N rows at a time, and keeps a running top-KB per
     query in registers (KB = next power of two >= K). Per tile: load the item rows (fp16 / bf16 /
     fp32) once for all BLOCK_B queries, upcast to fp32, `tl.dot` with the L2-normalised queries
     (fp32 accumulate; "tf32x3" on sm80+, so the result is fp32-accurate: fp16/bf16 item values are
     exact in tf32 and the query is split hi/lo), divide by the item norms unless the items are
     pre-normalised, pack each (score, index) into one int64 key (see `_pack`), and merge into the
     running top-KB with a bitonic `tl.topk` -- only when some key in the tile beats the current
     KB-th best. Output: KB candidate keys per (query, split).
     Cost model (unmeasured): with items in random order, one query's top-KB changes in about
     KB * (1 + ln(T / KB)) of a split's T tiles (all of them while T <= KB), and a block merges when
     any of its queries changes. So the skip pays off for small k and long splits; at k=100 over 10M
     items in 528 splits (148 tiles each) nearly every tile merges, and the sort (~36 compare-swap
     passes over 16 x 256 int64 per 128 items) rather than the memory scan may bound the kernel.
     That is the first thing to measure on a GPU (knobs: n_splits, block_n).
  2. Merge in torch: `torch.topk` over the B x (n_splits * KB) candidate keys, then unpack. Stage 1
     cuts the data from N scores per query to n_splits * KB keys (10M items, k=100, 132 SMs -> 528
     splits: 67,584 candidates, 148x less); keys are unique, so the merge is deterministic.

Why keys: `tl.topk` returns values, not positions. The high 32 bits hold the fp32 score mapped to an
order-preserving int32 (negative floats have their low 31 bits flipped; -0.0 is first made +0.0),
the low 32 bits hold 0xFFFFFFFF - index, so a larger key means a higher score, then a lower index.
Padding (rows past N, queries past B) is INT64_MIN, below every real key, -inf included.

Interpreter (TRITON_INTERPRET=1, CPU tensors; checked with triton 3.9 + torch 2.13 CPU): fp32, fp16
and bf16 items all run. Items are upcast to fp32 *before* `tl.dot` on purpose: the interpreter's dot
is `np.matmul` on the raw storage, and bf16 is stored there as uint16, so a bf16 `tl.dot` gives wrong
numbers under the interpreter. `input_precision` is ignored there (numpy fp32 matmul).
Not supported: NaN inputs (the order of NaN keys is undefined), N >= 2**31.
"""

from __future__ import annotations

import math

import torch

from kernels.retrieval import MAX_K, check_topk_args, topk_cosine_reference

try:  # triton is optional: without it the dispatcher uses the reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on hosts without triton
    triton = None
    tl = None

ITEM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
QUERY_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_N = 2**31 - 1 - 4096  # int32 item offsets inside a tile, plus room for the last tile
PAD_KEY = -(2**63)
_LOW32 = 0xFFFFFFFF


if triton is not None:
    _PAD: tl.constexpr = tl.constexpr(PAD_KEY)

    @triton.jit
    def _pack(s, offs_n):
        """(fp32 score, int32 index) -> int64 key; larger key = higher score, then lower index."""
        s = tl.where(s == 0.0, 0.0, s)  # -0.0 -> +0.0 so that they tie
        bits = s.to(tl.int32, bitcast=True)
        key32 = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        return (key32.to(tl.int64) << 32) | (4294967295 - offs_n.to(tl.int64))

    @triton.jit
    def _topk_stage1_kernel(q_ptr, it_ptr, ex_ptr, cand_ptr,
                            B, N, D, tiles_per_split,
                            stride_qb, stride_in, stride_eb, stride_cb,
                            ITEMS_NORMALIZED: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
                            BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            KB: tl.constexpr, INPUT_PRECISION: tl.constexpr):
        pid_b = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,)
        b_ok = offs_b < B
        offs_d = tl.arange(0, BLOCK_D)
        q_row = offs_b.to(tl.int64)[:, None] * stride_qb

        # Query norms (queries are tiny: every program recomputes them).
        q_sumsq_B = tl.zeros([BLOCK_B], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_ok = (d0 + offs_d) < D
            q_BD = tl.load(q_ptr + q_row + (d0 + offs_d)[None, :], mask=b_ok[:, None] & d_ok[None, :],
                           other=0.0).to(tl.float32)
            q_sumsq_B += tl.sum(q_BD * q_BD, axis=1)
        inv_q_B = 1.0 / tl.maximum(tl.sqrt(q_sumsq_B), 1e-12)  # F.normalize: x / max(|x|, eps)

        buf_BK = tl.full([BLOCK_B, KB], _PAD, dtype=tl.int64)  # running top-KB keys, best first
        t0 = pid_s * tiles_per_split
        for t in range(t0, t0 + tiles_per_split):
            offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
            n_ok = offs_n < N
            it_row = offs_n.to(tl.int64)[:, None] * stride_in
            acc_BN = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
            it_sumsq_N = tl.zeros([BLOCK_N], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d_ok = (d0 + offs_d) < D
                q_BD = tl.load(q_ptr + q_row + (d0 + offs_d)[None, :], mask=b_ok[:, None] & d_ok[None, :],
                               other=0.0).to(tl.float32) * inv_q_B[:, None]
                it_ND = tl.load(it_ptr + it_row + (d0 + offs_d)[None, :], mask=n_ok[:, None] & d_ok[None, :],
                                other=0.0).to(tl.float32)
                acc_BN = tl.dot(q_BD, tl.trans(it_ND), acc_BN, input_precision=INPUT_PRECISION)
                if not ITEMS_NORMALIZED:
                    it_sumsq_N += tl.sum(it_ND * it_ND, axis=1)
            if not ITEMS_NORMALIZED:
                acc_BN = acc_BN * (1.0 / tl.maximum(tl.sqrt(it_sumsq_N), 1e-12))[None, :]
            if HAS_EXCLUDE:
                ex_BN = tl.load(ex_ptr + offs_b.to(tl.int64)[:, None] * stride_eb + offs_n[None, :],
                                mask=b_ok[:, None] & n_ok[None, :], other=0)
                acc_BN = tl.where(ex_BN != 0, float("-inf"), acc_BN)
            key_BN = _pack(acc_BN, offs_n[None, :])
            key_BN = tl.where(b_ok[:, None] & n_ok[None, :], key_BN, _PAD)

            # Merge only if some key beats the KB-th best of its query.
            thr_B = tl.min(buf_BK, axis=1)
            if tl.max(tl.where(key_BN > thr_B[:, None], 1, 0)) > 0:
                if BLOCK_N > KB:
                    cand_BK = tl.topk(key_BN, KB)
                else:
                    cand_BK = key_BN
                both = tl.reshape(tl.join(buf_BK, cand_BK), [BLOCK_B, 2 * KB])
                buf_BK = tl.topk(both, KB)

        offs_k = tl.arange(0, KB)
        tl.store(cand_ptr + offs_b.to(tl.int64)[:, None] * stride_cb + pid_s * KB + offs_k[None, :], buf_BK,
                 mask=b_ok[:, None])


def _next_pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


def interpreter_active() -> bool:
    """True when this module's kernel was built for Triton's CPU interpreter (TRITON_INTERPRET=1 was
    set before the import) and the interpreter is still switched on."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_topk_stage1_kernel, InterpretedFunction) and bool(triton.knobs.runtime.interpret)


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 keys (see `_pack`) -> (fp32 scores, int64 indices)."""
    key32 = (keys >> 32).to(torch.int32)
    bits = torch.where(key32 < 0, key32 ^ 0x7FFFFFFF, key32)
    return bits.view(torch.float32), _LOW32 - (keys & _LOW32)


def launch_plan(B: int, N: int, D: int, k: int, device: torch.device | str, *, n_splits: int | None = None,
                block_n: int | None = None, block_b: int | None = None) -> dict:
    """Block sizes and grid of `topk_cosine_triton` for these shapes (also used by the benchmark to
    count the bytes stage 1 writes: B * n_splits * KB int64 keys)."""
    device = torch.device(device)
    K = min(k, N)
    KB = _next_pow2(K)
    BLOCK_N = max(KB, _next_pow2(block_n) if block_n else 128)
    BLOCK_B = _next_pow2(block_b) if block_b else (16 if B <= 16 else 32)
    if BLOCK_B < 16:
        raise ValueError(f"block_b is {block_b}; tl.dot needs at least 16")
    BLOCK_D = max(16, min(64, _next_pow2(D)))
    n_tiles = -(-N // BLOCK_N)
    n_bblocks = -(-B // BLOCK_B)
    on_cuda = device.type == "cuda"
    if n_splits is None:
        if on_cuda:  # ~4 programs per SM
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            n_splits = max(1, (4 * sms) // n_bblocks)
        else:  # interpreter: programs run one after another; fewer splits, fewer merges
            n_splits = 4
    n_splits = max(1, min(n_splits, n_tiles, 65535))  # grid dim 1 limit on CUDA
    tiles_per_split = -(-n_tiles // n_splits)
    n_splits = -(-n_tiles // tiles_per_split)  # no empty splits
    precision = "tf32x3" if on_cuda and torch.cuda.get_device_capability(device) >= (8, 0) else "ieee"
    return dict(K=K, KB=KB, BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, n_bblocks=n_bblocks,
                n_splits=n_splits, tiles_per_split=tiles_per_split, input_precision=precision,
                num_warps=4 if KB <= 128 else 8)


def check_triton_args(queries_BD: torch.Tensor, items_ND: torch.Tensor, k: int,
                      exclude_BN: torch.Tensor | None) -> None:
    """Shapes, dtypes, devices and layout the kernel needs; ValueError naming the argument and limit."""
    check_topk_args(queries_BD, items_ND, k)
    if items_ND.dtype not in ITEM_DTYPES:
        raise ValueError(f"items_ND dtype is {items_ND.dtype}; the kernel takes {', '.join(map(str, ITEM_DTYPES))}")
    if queries_BD.dtype not in QUERY_DTYPES:
        raise ValueError(f"queries_BD dtype is {queries_BD.dtype}; the kernel takes "
                         f"{', '.join(map(str, QUERY_DTYPES))}")
    if items_ND.shape[0] > MAX_N:
        raise ValueError(f"items_ND has N={items_ND.shape[0]} rows; the kernel takes at most {MAX_N}")
    if queries_BD.device != items_ND.device:
        raise ValueError(f"queries_BD is on {queries_BD.device} but items_ND is on {items_ND.device}")
    for name, t in (("queries_BD", queries_BD), ("items_ND", items_ND)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (row-major); got strides {t.stride()}")
    if exclude_BN is not None:
        want = (queries_BD.shape[0], items_ND.shape[0])
        if exclude_BN.dtype != torch.bool or tuple(exclude_BN.shape) != want:
            raise ValueError(f"exclude_BN must be a bool tensor of shape {want}; got {exclude_BN.dtype} "
                             f"{tuple(exclude_BN.shape)}")
        if exclude_BN.device != items_ND.device or not exclude_BN.is_contiguous():
            raise ValueError(f"exclude_BN must be contiguous and on {items_ND.device}")
    if items_ND.device.type == "cuda":
        return
    if items_ND.device.type == "cpu" and interpreter_active():
        return
    raise ValueError(f"the Triton kernel needs CUDA tensors (got {items_ND.device}); CPU tensors run only "
                     "under Triton's interpreter: TRITON_INTERPRET=1 set before importing kernels.topk_triton")


def topk_cosine_triton(queries_BD: torch.Tensor, items_ND: torch.Tensor, k: int, *,
                       items_normalized: bool = False, exclude_BN: torch.Tensor | None = None,
                       n_splits: int | None = None, block_n: int | None = None,
                       block_b: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k items by cosine similarity per query with the Triton kernel.

    queries_BD: (B, D) fp32/fp16/bf16; items_ND: (N, D) fp16/bf16/fp32, rows L2-normalised already if
    items_normalized; exclude_BN: optional (B, N) bool, True = never return. Returns (scores_BK fp32,
    indices_BK int64), best first, K = min(k, N); ties -> lower index first; excluded items that have
    to fill the tail score -inf. n_splits / block_n / block_b override the launch heuristics (tests).
    """
    if triton is None:
        raise RuntimeError("triton is not installed; use kernels.topk_triton.topk_cosine (falls back to torch)")
    check_triton_args(queries_BD, items_ND, k, exclude_BN)
    B, D = queries_BD.shape
    N = items_ND.shape[0]
    K = min(k, N)
    dev = items_ND.device
    if B == 0 or K == 0:
        return (torch.empty(B, K, dtype=torch.float32, device=dev), torch.empty(B, K, dtype=torch.int64, device=dev))

    plan = launch_plan(B, N, D, k, dev, n_splits=n_splits, block_n=block_n, block_b=block_b)
    KB, n_splits = plan["KB"], plan["n_splits"]
    cand_BC = torch.empty(B, n_splits * KB, dtype=torch.int64, device=dev)
    ex = exclude_BN.view(torch.uint8) if exclude_BN is not None else cand_BC  # dummy pointer if unused
    _topk_stage1_kernel[(plan["n_bblocks"], n_splits)](
        queries_BD, items_ND, ex, cand_BC,
        B, N, D, plan["tiles_per_split"],
        queries_BD.stride(0), items_ND.stride(0), ex.stride(0), cand_BC.stride(0),
        ITEMS_NORMALIZED=bool(items_normalized), HAS_EXCLUDE=exclude_BN is not None,
        BLOCK_B=plan["BLOCK_B"], BLOCK_N=plan["BLOCK_N"], BLOCK_D=plan["BLOCK_D"], KB=KB,
        INPUT_PRECISION=plan["input_precision"], num_warps=plan["num_warps"],
    )
    keys_BK = torch.topk(cand_BC, K, dim=1, largest=True, sorted=True).values  # stage 2
    return unpack_keys(keys_BK)


def topk_cosine(queries_BD: torch.Tensor, items_ND: torch.Tensor, k: int, *, items_normalized: bool = False,
                exclude_BN: torch.Tensor | None = None,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatcher. backend="auto": the Triton kernel for CUDA tensors when triton is installed, else the
    torch reference (also on CUDA without triton). "torch": the reference. "triton": the kernel (CUDA
    tensors, or CPU tensors under Triton's interpreter; whether that is on is decided by the caller
    at its entry point, through TRITON_INTERPRET=1 before the import, never read here)."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend is {backend!r}; it must be 'auto', 'torch' or 'triton'")
    if backend == "triton" or (backend == "auto" and triton is not None and items_ND.is_cuda
                               and items_ND.dtype in ITEM_DTYPES):
        return topk_cosine_triton(queries_BD, items_ND, k, items_normalized=items_normalized,
                                  exclude_BN=exclude_BN)
    return topk_cosine_reference(queries_BD, items_ND, k, items_normalized=items_normalized,
                                 exclude_BN=exclude_BN)


__all__ = ["MAX_K", "check_triton_args", "interpreter_active", "launch_plan", "topk_cosine", "topk_cosine_triton",
           "unpack_keys"]
