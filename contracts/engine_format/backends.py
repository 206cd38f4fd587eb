"""Load compiled user-tower engines and run them on numpy input.

Serve side of the engine pipeline (the build side is
``trainer/export/compile.py``, which this module must NOT import: the server
runs without the trainer or the model's source code). Imports only torch,
onnxruntime and numpy.

    runner = load_runner("onnx", Path(".../user_tower.onnx"), num_threads=2)
    emb_BD = runner(history_BT)   # (B, T) int64 -> (B, D) float32, C-contiguous

Backends and the file each loads:

* ``aoti``  -- ``user_tower.pt2`` AOTInductor package (its compiled library, via its C ABI)
* ``onnx``  -- ``user_tower.onnx`` run by onnxruntime's CPUExecutionProvider
* ``torch`` -- ``user_tower.ep.pt2`` (``torch.export.load(path).module()``),
  the eager reference path

Errors: an unknown backend raises ``ValueError``; a missing file raises
``EngineFileNotFound`` and an unreadable/corrupt one ``EngineLoadError`` (both
subclasses of ``EngineLoadError``, whose message names the path), so the caller
can refuse the engine and keep serving the old one. Every runner executes a
warm-up batch inside ``load_runner``, so a file that loads but cannot run is
refused at load time too. Bad input at call time raises ``ValueError``.

Threads:

* onnx: per-session ``intra_op_num_threads=num_threads``,
  ``inter_op_num_threads=1`` -- fully isolated per runner.
* aoti / torch: CPU kernels (AOTI-generated OpenMP loops and the aten/MKL
  kernels they call) use torch's intra-op pool, which is PROCESS-GLOBAL
  (``torch.set_num_threads``); the AOTI .so resolves ``libgomp.so.1`` to the
  copy torch already loaded, so it shares that setting. The OpenMP thread
  count is also a per-calling-thread ICV, so these runners call
  ``torch.set_num_threads(num_threads)`` at load time and, cheaply, again on
  each call from a thread whose ``torch.get_num_threads()`` differs (e.g. a
  fresh gRPC worker thread). Consequence: two torch-based runners with
  different ``num_threads`` in one process fight over the setting -- the one
  calling last wins. Use a single value per process. ``torch.set_num_interop_threads``
  is not touched (it may only be called once per process and the user tower
  does not use inter-op parallelism).

Thread safety: loading is independent per runner (no shared mutable state in
this module; the AOTI loader, ORT sessions and exported modules are each
private to their runner), so one thread may call a runner while another loads
a different one. ORT ``InferenceSession.run`` and AOTI's ``boxed_run`` are
safe to call concurrently; the AOTI container serialises its calls with a lock that waits with the
GIL released (aoti_abi.py); the torch runner runs a GraphModule without state.

GIL: ORT's run and the AOTI container's C-ABI calls (run, load, refit) release the GIL, so the
event loop keeps serving while a compute or loading thread runs the tower.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from contracts.registry import BACKENDS, META_HISTORY_LEN, META_MAX_BATCH
from contracts.engine_format.aoti_graphs import GRAPHS

__all__ = [
    "BACKENDS",
    "EngineFileNotFound",
    "EngineLoadError",
    "UserTowerRunner",
    "load_runner",
]

LIFTED_CONSTANT_PREFIX = "_tensor_constant"  # torch.export's name for literal tensors created in forward()


class EngineLoadError(RuntimeError):
    """An engine file could not be loaded (or failed its warm-up run)."""

    def __init__(self, backend: str, path: Path, reason: str) -> None:
        super().__init__(f"cannot load {backend} engine from {str(path)!r}: {reason}")
        self.backend = backend
        self.path = path


class EngineFileNotFound(EngineLoadError, FileNotFoundError):
    """The engine file does not exist (or is not a regular file)."""


@runtime_checkable
class UserTowerRunner(Protocol):
    """A loaded engine: ``(B, T) int64 -> (B, D) float32``, C-contiguous."""

    backend: str
    path: Path
    # Static history length T the engine was built for.
    history_len: int
    # Largest accepted batch (None: not recorded / not enforced by the engine).
    max_batch: int | None

    def __call__(self, history_BT: np.ndarray) -> np.ndarray: ...


def load_runner(backend: str, path: Path, *, num_threads: int = 1, weights: Path | None = None) -> UserTowerRunner:
    """Load the engine at ``path`` for ``backend`` and warm it up.

    ``weights`` (aoti only): a ``torch.save``d ``{constant fqn: tensor}`` loaded into this fresh
    runner of the compiled graph instead of the packaged weights (refit: no recompile). Every
    constant must be present, with its compiled shape and dtype.

    Raises ``ValueError`` for an unknown backend or bad ``num_threads``,
    ``EngineFileNotFound`` if ``path`` is missing, ``EngineLoadError`` if the
    file is corrupt, unreadable or fails a warm-up run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed values: {', '.join(BACKENDS)}")
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be an int >= 1, got {num_threads!r}")
    path = Path(path)
    if not path.is_file():
        raise EngineFileNotFound(backend, path, "no such file")
    if path.stat().st_size == 0:
        raise EngineLoadError(backend, path, "file is empty")

    if weights is not None and backend != "aoti":
        raise ValueError(f"weight refit is supported for the aoti backend only, not {backend!r}")
    cls = {"aoti": _AotiRunner, "onnx": _OnnxRunner, "torch": _TorchRunner}[backend]
    try:
        runner = cls(path, num_threads)
        if weights is not None:
            runner.load_weights(Path(weights))
    except EngineLoadError:
        raise
    except Exception as err:  # anything the loaders throw on a bad file
        raise EngineLoadError(backend, path, f"{type(err).__name__}: {err}") from err
    try:
        runner(np.zeros((1, runner.history_len), dtype=np.int64))
        if runner.max_batch is None or runner.max_batch >= 2:
            runner(np.zeros((2, runner.history_len), dtype=np.int64))
    except Exception as err:
        raise EngineLoadError(backend, path, f"warm-up run failed: {type(err).__name__}: {err}") from err
    return runner


# --------------------------------------------------------------------------- helpers


def _check_input(history_BT: np.ndarray, history_len: int, max_batch: int | None) -> np.ndarray:
    """Validate shape/dtype and return a C-contiguous int64 array (no copy if already so)."""
    if not isinstance(history_BT, np.ndarray):
        raise ValueError(f"history_BT must be a numpy array, got {type(history_BT).__name__}")
    if history_BT.dtype != np.int64:
        raise ValueError(f"history_BT must be int64, got {history_BT.dtype}")
    if history_BT.ndim != 2 or history_BT.shape[1] != history_len:
        raise ValueError(
            f"history_BT must have shape (B, {history_len}), got {tuple(history_BT.shape)}"
        )
    batch = history_BT.shape[0]
    if batch < 1 or (max_batch is not None and batch > max_batch):
        raise ValueError(f"batch size must be in [1, {max_batch}], got {batch}")
    return np.ascontiguousarray(history_BT)


def _to_output(out: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(out, torch.Tensor):
        # No detach() unless needed: a torch op releases the GIL, and on the compute thread every release is a wait
        # to get it back from a busy event loop (up to the switch interval).
        out = (out.detach() if out.requires_grad else out).numpy()
    return np.ascontiguousarray(out, dtype=np.float32)


class _TorchThreads:
    """Applies torch's (process-global, per-OpenMP-thread) intra-op thread count."""

    def __init__(self, num_threads: int) -> None:
        self.num_threads = num_threads
        torch.set_num_threads(num_threads)

    def ensure(self) -> None:
        # Cheap check; only calls set_num_threads from a thread whose OpenMP
        # ICV differs (fresh worker thread, or another runner changed it).
        if torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)


def _single_output(out: object) -> torch.Tensor:
    if isinstance(out, (list, tuple)):
        if len(out) != 1:
            raise RuntimeError(f"engine returned {len(out)} outputs, expected 1")
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise RuntimeError(f"engine returned {type(out).__name__}, expected a tensor")
    return out


# --------------------------------------------------------------------------- runners


class _AotiRunner:
    backend = "aoti"

    def __init__(self, path: Path, num_threads: int) -> None:
        self.path = path
        # Check the package before handing it to the C++ loader: a truncated zip is reported cleanly
        # here instead of deep inside libtorch. Once per package file: a refit's runner reuses an
        # opened graph, and re-reading its package (CRC of every member, with the GIL) stalled the
        # event loop ~3 ms per swap.
        if not GRAPHS.is_open(path):
            if not zipfile.is_zipfile(path):
                raise EngineLoadError(self.backend, path, "not a valid .pt2 (zip) package")
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
                if bad is not None:
                    raise EngineLoadError(self.backend, path, f"corrupt member {bad!r} in package")
        self._threads = _TorchThreads(num_threads)
        # A container of the package's compiled graph, driven through its C ABI so that runs and
        # loads release the GIL (aoti_abi.py); the library is opened once per process (aoti_graphs.py:
        # loading the package per engine leaked one .so mapping per load).
        self._container, meta = GRAPHS.container(path)
        if META_HISTORY_LEN not in meta:
            # Without T we cannot validate inputs, and AOTI does not: a wrong
            # shape would read out of bounds instead of raising.
            raise EngineLoadError(
                self.backend, path, f"package metadata lacks {META_HISTORY_LEN!r} (not built by compile_user_tower?)"
            )
        if self._container.num_inputs != 1 or self._container.num_outputs != 1:
            raise EngineLoadError(self.backend, path, f"expected 1 input and 1 output, got "
                                  f"{self._container.num_inputs} and {self._container.num_outputs}")
        self.history_len = int(meta[META_HISTORY_LEN])
        self.max_batch = int(meta[META_MAX_BATCH]) if META_MAX_BATCH in meta else None

    def load_weights(self, path: Path) -> None:
        """Refit: replace every constant of this runner with the tensors in ``path`` (by original fqn)."""
        if not path.is_file():
            raise EngineFileNotFound(self.backend, path, "refit weights file missing")
        # Not mmap=True: it holds the GIL for the whole load (~4 ms at 20k items); the plain load lets
        # other threads in between storages (longest hold ~1.5-2.7 ms)
        weights = torch.load(path, map_location="cpu", weights_only=True)
        name_to_fqn = self._container.constant_fqns()
        # Literal tensors the model code creates (lifted as _tensor_constantN) are the same for every
        # model of this architecture: they keep the compiled graph's values. Everything else must be given.
        want = {f for f in name_to_fqn.values() if not f.startswith(LIFTED_CONSTANT_PREFIX)}
        if not want <= set(weights) <= set(name_to_fqn.values()):
            missing, extra = sorted(want - set(weights)), sorted(set(weights) - set(name_to_fqn.values()))
            raise EngineLoadError(self.backend, path, f"refit weights do not match the compiled graph: "
                                  f"missing {missing[:5]}, unexpected {extra[:5]}")
        # This runner serves nothing yet: its active buffer is updated in place. Others keep their values.
        self._container.update_constants({n: weights[f] for n, f in name_to_fqn.items() if f in weights})

    def __call__(self, history_BT: np.ndarray) -> np.ndarray:
        x = _check_input(history_BT, self.history_len, self.max_batch)
        self._threads.ensure()
        (out,) = self._container.run([torch.from_numpy(x)])
        return _to_output(out)


class _OnnxRunner:
    backend = "onnx"

    def __init__(self, path: Path, num_threads: int) -> None:
        import onnxruntime as ort

        self.path = path
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = num_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Let ORT threads sleep between requests instead of spinning (the
        # server is latency- not throughput-bound and shares cores).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        inputs = self._session.get_inputs()
        outputs = self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise EngineLoadError(
                self.backend, path, f"expected 1 input and 1 output, got {len(inputs)} and {len(outputs)}"
            )
        self._input_name = inputs[0].name
        self._output_name = outputs[0].name
        shape = inputs[0].shape
        meta = self._session.get_modelmeta().custom_metadata_map
        if len(shape) != 2:
            raise EngineLoadError(self.backend, path, f"input {self._input_name!r} has rank {len(shape)}, expected 2")
        if isinstance(shape[1], int):
            self.history_len = shape[1]
        elif META_HISTORY_LEN in meta:
            self.history_len = int(meta[META_HISTORY_LEN])
        else:
            raise EngineLoadError(self.backend, path, "history length (input dim 1) is not static")
        self.max_batch = int(meta[META_MAX_BATCH]) if META_MAX_BATCH in meta else None

    def __call__(self, history_BT: np.ndarray) -> np.ndarray:
        x = _check_input(history_BT, self.history_len, self.max_batch)
        (out,) = self._session.run([self._output_name], {self._input_name: x})
        return _to_output(out)


class _TorchRunner:
    backend = "torch"

    def __init__(self, path: Path, num_threads: int) -> None:
        self.path = path
        self._threads = _TorchThreads(num_threads)
        ep = torch.export.load(str(path))
        placeholders = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs]
        if len(placeholders) != 1:
            raise EngineLoadError(self.backend, path, f"expected 1 user input, got {len(placeholders)}")
        val = placeholders[0].meta["val"]
        self.history_len = int(val.shape[1])
        self.max_batch = _upper_bound(ep, val.shape[0])
        self._module = ep.module()
        # The exported module is stateless at run time; no lock needed.

    def __call__(self, history_BT: np.ndarray) -> np.ndarray:
        x = _check_input(history_BT, self.history_len, self.max_batch)
        self._threads.ensure()
        with torch.inference_mode():
            out = self._module(torch.from_numpy(x))
        return _to_output(_single_output(out))


def _upper_bound(ep: torch.export.ExportedProgram, dim: object) -> int | None:
    """Upper bound of a (symbolic) batch dim from the program's range constraints."""
    if isinstance(dim, int):
        return dim
    try:
        expr = dim.node.expr  # type: ignore[attr-defined]
        upper = ep.range_constraints[expr].upper
        return int(upper)
    except Exception:  # unbounded (sympy oo) or unexpected structure
        return None
