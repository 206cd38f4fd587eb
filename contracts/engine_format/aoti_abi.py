"""An AOTInductor model container driven through the compiled library's C ABI (ctypes).

Why not torch's pybind runner (`torch._C._aoti.AOTIModelContainerRunnerCpu`): it holds the GIL
while the model runs and while a container loads its constants. In the server that stalls the
gRPC event loop: measured on 2 cores, a Python thread kept 52% of its throughput while another
thread ran the user tower through the pybind runner and 75% through this one, and creating a
container of the 100k-item tower blocked every other thread for ~35 ms. ctypes releases the GIL
for the whole foreign call, so runs, container creation and constant updates run beside the
event loop instead of in front of it.

Only the C-ABI-safe entry points of `torch/csrc/inductor/aoti_runtime/interface.h` are used
(tensors cross as AtenTensorHandle; constants as {name, handle} pairs), so no C++ type crosses
the boundary. A run's inputs cross as handles viewing their memory (libtorch's C shim, `_TensorShim`: freeing
them needs no GIL); outputs and constants go back and forth through `torch._C._aoti`'s handle helpers.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import torch

_H = ctypes.c_void_p  # every opaque handle: container, tensor, stream, proxy executor
_SIZE_P = ctypes.POINTER(ctypes.c_size_t)
_STR_P = ctypes.POINTER(ctypes.c_char_p)


class _Pair(ctypes.Structure):  # AOTInductorConstantMapEntry
    _fields_ = [("name", ctypes.c_char_p), ("handle", _H)]


_SIGNATURES = {
    "AOTInductorModelContainerCreateWithDevice": [ctypes.POINTER(_H), ctypes.c_size_t, ctypes.c_char_p,
                                                  ctypes.c_char_p],
    "AOTInductorModelContainerDelete": [_H],
    "AOTInductorModelContainerRun": [_H, ctypes.POINTER(_H), ctypes.c_size_t, ctypes.POINTER(_H), ctypes.c_size_t,
                                     _H, _H],
    "AOTInductorModelContainerGetNumInputs": [_H, _SIZE_P],
    "AOTInductorModelContainerGetNumOutputs": [_H, _SIZE_P],
    "AOTInductorModelContainerGetNumConstants": [_H, _SIZE_P],
    "AOTInductorModelContainerGetConstantName": [_H, ctypes.c_size_t, _STR_P],
    "AOTInductorModelContainerGetConstantOriginalFQN": [_H, ctypes.c_size_t, _STR_P],
    "AOTInductorModelContainerGetConstantFromFolded": [_H, ctypes.c_size_t, ctypes.POINTER(ctypes.c_bool)],
    "AOTInductorModelContainerUpdateConstantBufferPairs": [_H, ctypes.POINTER(_Pair), ctypes.c_size_t,
                                                           ctypes.c_bool, ctypes.c_bool],
    "AOTInductorGetLastError": [_STR_P],
}

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype, _capsule_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype, _capsule_new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class AotiError(RuntimeError):
    """A call into the compiled model failed; the message carries the runtime's own error."""


def _new_handles(tensors: list[torch.Tensor]) -> list[int]:
    """Owning AtenTensorHandles for `tensors` (each holds a reference to its tensor)."""
    return [_capsule_pointer(c, None) for c in torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(tensors)]


class _TensorShim:
    """libtorch's C shim for a tensor handle that views memory it does not own (aoti_torch_create_tensor_from_blob).

    Why: a run steals its input handles and frees each once the graph is done with it, mid-run, with the GIL
    released. A handle of a tensor made in Python holds a reference to that tensor's Python object, and freeing it
    takes the GIL to drop that reference (torch's PyObject preservation): one more GIL hand-off inside every run.
    With another thread busy in Python (the server's event loop), a tower call at batch 1 took 2.63 ms instead of
    1.45 ms (a thread spinning in Python, 1 ms switch interval; 0.25 ms alone): a whole switch interval more. A
    handle from a blob has no Python owner, so freeing it needs no GIL. Called through PyDLL: these calls take
    microseconds, and releasing the GIL around them would make hand-offs of their own."""

    _DTYPES = ("int64", "int32", "float32", "float64", "bool", "bfloat16", "float16")

    def __init__(self, lib_path: Path) -> None:
        lib = ctypes.PyDLL(str(lib_path))
        self._from_blob = lib.aoti_torch_create_tensor_from_blob
        self._from_blob.restype = ctypes.c_int32
        self._from_blob.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64),
                                    ctypes.POINTER(ctypes.c_int64), ctypes.c_int64, ctypes.c_int32, ctypes.c_int32,
                                    ctypes.c_int32, ctypes.POINTER(_H)]
        self._dtype_code = {}
        for name in self._DTYPES:
            fn = getattr(lib, f"aoti_torch_dtype_{name}")
            fn.restype = ctypes.c_int32
            self._dtype_code[getattr(torch, name)] = fn()
        lib.aoti_torch_device_type_cpu.restype = ctypes.c_int32
        self._cpu = lib.aoti_torch_device_type_cpu()

    def supports(self, t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and t.dtype in self._dtype_code and not t.requires_grad

    def view_handle(self, t: torch.Tensor) -> int:
        """An owning handle of a new tensor viewing t's memory (shape, strides, dtype of t): t must outlive it."""
        n = t.dim()
        sizes, strides = (ctypes.c_int64 * n)(*t.shape), (ctypes.c_int64 * n)(*t.stride())
        handle = _H()
        rc = self._from_blob(t.data_ptr(), n, sizes, strides, 0, self._dtype_code[t.dtype], self._cpu, 0,
                             ctypes.byref(handle))
        if rc != 0:
            raise AotiError(f"aoti_torch_create_tensor_from_blob failed for a {t.dtype} tensor of shape "
                            f"{tuple(t.shape)}")
        return handle.value


def _load_tensor_shim() -> _TensorShim | None:
    """The shim of the libtorch this process imported; None where it cannot be opened (runs then hand the model
    handles of the Python tensors themselves: correct, one GIL hand-off more a run)."""
    found = sorted((Path(torch.__file__).parent / "lib").glob("libtorch_cpu.*"))
    try:
        return _TensorShim(found[0]) if found else None
    except (OSError, AttributeError):
        return None


_TENSOR_SHIM = _load_tensor_shim()


def _input_handles(tensors: list[torch.Tensor]) -> tuple[list[int], bool]:
    """Handles for a run's inputs, and whether they view the tensors' memory (the caller keeps the tensors alive
    through the run and copies any output that aliases them)."""
    if _TENSOR_SHIM is not None and all(_TENSOR_SHIM.supports(t) for t in tensors):
        handles: list[int] = []
        try:
            for t in tensors:
                handles.append(_TENSOR_SHIM.view_handle(t))
        except BaseException:
            _steal_handles(handles)  # free the ones made
            raise
        return handles, True
    return _new_handles(tensors), False


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[first, end) byte addresses a (possibly strided) tensor's elements lie in; empty for no elements."""
    if not t.numel():
        return t.data_ptr(), t.data_ptr()
    last = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _overlaps(span: tuple[int, int], others: list[tuple[int, int]]) -> bool:
    a, b = span
    return any(a < f and e < b for e, f in others)


def _steal_handles(handles: list[int]) -> list[torch.Tensor]:
    """Tensors from owning handles; the handles are freed."""
    return torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs([_capsule_new(h, None, None) for h in handles])


class AotiLibrary:
    """One compiled model library (.so), opened once per process and never unloaded: containers
    of the same graph share its one mapping."""

    def __init__(self, so_path: str | Path) -> None:
        self.path = str(so_path)
        self._lib = ctypes.CDLL(self.path)  # CDLL, not PyDLL: every call releases the GIL
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(self._lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int32
            setattr(self, name.removeprefix("AOTInductor"), fn)

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            msg = ctypes.c_char_p()
            self.GetLastError(ctypes.byref(msg))
            detail = (msg.value or b"").decode(errors="replace").strip() or "no message (see stderr)"
            raise AotiError(f"{what} failed in {Path(self.path).name}: {detail}")


class AotiContainer:
    """A model container of one AotiLibrary: its own constants, one model instance (calls are
    serialised by a lock that waits with the GIL released)."""

    def __init__(self, library: AotiLibrary, device: str = "cpu") -> None:
        self.library = library
        handle = _H()
        library.check(library.ModelContainerCreateWithDevice(ctypes.byref(handle), 1, device.encode(), None),
                      "creating the model container")
        self._handle = handle
        self._lock = threading.Lock()
        self.num_inputs = self._count(library.ModelContainerGetNumInputs)
        self.num_outputs = self._count(library.ModelContainerGetNumOutputs)

    def _count(self, fn) -> int:
        n = ctypes.c_size_t()
        self.library.check(fn(self._handle, ctypes.byref(n)), fn.__name__)
        return n.value

    def constant_fqns(self) -> dict[str, str]:
        """Internal constant name -> original module fqn, for every constant not produced by folding."""
        lib, out = self.library, {}
        for i in range(self._count(lib.ModelContainerGetNumConstants)):
            folded = ctypes.c_bool()
            lib.check(lib.ModelContainerGetConstantFromFolded(self._handle, i, ctypes.byref(folded)), "constant info")
            if folded.value:
                continue
            name, fqn = ctypes.c_char_p(), ctypes.c_char_p()
            lib.check(lib.ModelContainerGetConstantName(self._handle, i, ctypes.byref(name)), "constant name")
            lib.check(lib.ModelContainerGetConstantOriginalFQN(self._handle, i, ctypes.byref(fqn)), "constant fqn")
            out[name.value.decode()] = fqn.value.decode()
        return out

    def update_constants(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy `tensors` (by internal constant name) into the active constant buffer. Only for a
        container that serves nothing yet: a concurrent run would read half-updated weights."""
        names = list(tensors)
        handles = _new_handles([tensors[n].contiguous() for n in names])
        try:
            pairs = (_Pair * len(names))(*(_Pair(n.encode(), h) for n, h in zip(names, handles)))
            with self._lock:
                self.library.check(self.library.ModelContainerUpdateConstantBufferPairs(
                    self._handle, pairs, len(names), False, False), "updating constants")
        finally:
            _steal_handles(handles)  # the container copied the data: release our references

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(inputs) != self.num_inputs:
            raise ValueError(f"the model takes {self.num_inputs} inputs, got {len(inputs)}")
        handles, views = _input_handles(inputs)
        ins = (_H * len(inputs))(*handles)  # stolen by the run, even when it fails
        outs = (_H * self.num_outputs)()
        with self._lock:
            rc = self.library.ModelContainerRun(self._handle, ins, len(inputs), outs, self.num_outputs, None, None)
        self.library.check(rc, "running the model")
        results = _steal_handles([outs[i] for i in range(self.num_outputs)])
        if views:  # an output that aliases an input would outlive the memory it views: give it its own
            spans = [_extent(t) for t in inputs]
            results = [r.clone() if _overlaps(_extent(r), spans) else r for r in results]
        return results

    def close(self) -> None:
        handle, self._handle = getattr(self, "_handle", None), None
        if handle:
            self.library.ModelContainerDelete(handle)

    def __del__(self) -> None:  # frees the constants (tens of MB) with the last reference
        self.close()
