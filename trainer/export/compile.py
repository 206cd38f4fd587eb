"""Compile the user tower into a self-contained serving engine.

This is the build side of the engine pipeline: it takes the trained user tower
(an ``nn.Module`` whose forward maps ``history_BT`` (int64, ``(B, T)``) to
L2-normalised ``(B, D)`` float32 embeddings), exports it with
``torch.export`` using a dynamic batch dimension, and writes one file per
backend into ``out_dir``:

* ``aoti``  -> ``user_tower.pt2``     AOTInductor package (weights packaged inside)
* ``onnx``  -> ``user_tower.onnx``    single-file ONNX model (weights inline)
* ``torch`` -> ``user_tower.ep.pt2``  ``torch.export.save`` of the ExportedProgram

The serve side (``contracts/engine_format/backends.py``) loads these files without the
model's source code. Nothing here imports grpc or anything from ``server``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from contracts.registry import BACKENDS, META_HISTORY_LEN, META_MAX_BATCH, USER_TOWER_FILE

__all__ = [
    "AOTI_FILENAME",
    "BACKENDS",
    "CompileOptions",
    "FILENAMES",
    "ONNX_FILENAME",
    "META_HISTORY_LEN",
    "META_MAX_BATCH",
    "TORCH_FILENAME",
    "compile_user_tower",
]

# Output file name for each backend: the engine layout contract shared with the serve side.
FILENAMES = USER_TOWER_FILE
AOTI_FILENAME, ONNX_FILENAME, TORCH_FILENAME = (FILENAMES[b] for b in BACKENDS)

# protobuf refuses to serialise a message above 2 GiB, which is the only reason
# ONNX would need external data; we keep weights inline and refuse beyond that.
_ONNX_PROTOBUF_LIMIT = 2**31 - 1

# Names of the graph input/output (ONNX input/output names, and the name of the
# dynamic dimension). The serve side discovers names from the session, so these
# are for readability only.
_INPUT_NAME = "history_BT"
_OUTPUT_NAME = "user_emb_BD"



@dataclass(kw_only=True, frozen=True, slots=True)
class CompileOptions:
    """How to compile the user tower. Validated on construction."""

    # Which engine to build: one of BACKENDS ("aoti", "onnx", "torch").
    backend: str = "aoti"
    # Largest batch size the engine must accept. The batch dimension is
    # exported as dynamic over [1, max_batch]; AOTI guards it at run time, so a
    # bigger batch is rejected by the engine. Must be >= 2 (a dynamic range
    # needs at least two sizes) -- in practice e.g. 256.
    max_batch: int = 256
    # Directory for TorchInductor's on-disk cache (only used by "aoti"). When
    # given it is exported as TORCHINDUCTOR_CACHE_DIR for the duration of the
    # compile (see compile_user_tower for why an env var). None leaves
    # inductor's default (a per-user dir under /tmp) in place.
    inductor_cache_dir: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if (
            isinstance(self.max_batch, bool)
            or not isinstance(self.max_batch, int)
            or self.max_batch < 2
        ):
            raise ValueError(f"max_batch must be an int >= 2, got {self.max_batch!r}")
        if self.inductor_cache_dir is not None and (
            not isinstance(self.inductor_cache_dir, (str, os.PathLike))
            or not str(self.inductor_cache_dir)
        ):
            raise ValueError(
                "inductor_cache_dir must be a non-empty path string or None, "
                f"got {self.inductor_cache_dir!r}"
            )


def compile_user_tower(
    module: nn.Module,
    example_history_BT: torch.Tensor,
    out_dir: Path,
    options: CompileOptions,
    progress: Callable[[str], None] | None = None,
) -> list[Path]:
    """Export ``module`` with a dynamic batch dim and write the backend's file(s).

    The module is put in eval mode and exported under ``torch.no_grad()``; its
    previous training/eval mode is restored afterwards. ``example_history_BT``
    is an int64 ``(B, T)`` tensor; only its dtype, ``T`` and values matter (T is
    static in the engine, B is dynamic in ``[1, options.max_batch]``). If the
    example has B == 1 (or B > max_batch) it is tiled/trimmed to B == 2 first:
    torch.export specialises a dimension whose example size is 0 or 1, which
    would silently produce a batch-1-only engine.

    Writes into ``out_dir`` (created if missing):
      aoti -> ``user_tower.pt2``, onnx -> ``user_tower.onnx`` (weights inline,
      no external-data file), torch -> ``user_tower.ep.pt2``.

    Returns the written files as ABSOLUTE paths. ``progress`` (if given) is
    called with a short human-readable message at each phase.
    """
    if not isinstance(options, CompileOptions):
        raise TypeError(f"options must be a CompileOptions, got {type(options).__name__}")
    report = progress if progress is not None else (lambda _msg: None)
    example = _prepare_example(example_history_BT, options.max_batch)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            report(f"exporting user tower with torch.export (batch dynamic 1..{options.max_batch})…")
            ep = _export(module, example, options.max_batch)
            if options.backend == "aoti":
                path = _write_aoti(ep, out_dir / AOTI_FILENAME, options, report)
            elif options.backend == "onnx":
                path = _write_onnx(module, ep, example, out_dir / ONNX_FILENAME, options, report)
            else:  # "torch" (validated by CompileOptions)
                path = out_dir / TORCH_FILENAME
                report(f"saving ExportedProgram to {path.name}…")
                torch.export.save(ep, str(path))
    finally:
        module.train(was_training)
    report(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return [path]


def _prepare_example(example_history_BT: torch.Tensor, max_batch: int) -> torch.Tensor:
    if not isinstance(example_history_BT, torch.Tensor):
        raise TypeError("example_history_BT must be a torch.Tensor")
    if example_history_BT.dim() != 2 or example_history_BT.shape[0] < 1:
        raise ValueError(
            f"example_history_BT must have shape (B>=1, T), got {tuple(example_history_BT.shape)}"
        )
    if example_history_BT.dtype != torch.int64:
        raise ValueError(f"example_history_BT must be int64, got {example_history_BT.dtype}")
    ex = example_history_BT.detach().cpu()
    if ex.shape[0] == 1:
        # Avoid the 0/1 specialisation of torch.export's symbolic shapes.
        ex = ex.repeat(2, 1)
    if ex.shape[0] > max_batch:
        ex = ex[:max_batch]
    return ex.contiguous()


def _export(module: nn.Module, example: torch.Tensor, max_batch: int) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    # Pass the input positionally and describe dynamic shapes positionally too,
    # so the module's forward argument name does not matter.
    return torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)


def ep_history_len(ep: torch.export.ExportedProgram) -> int:
    """The static history length T of the exported program's single input."""
    user_inputs = ep.graph_signature.user_inputs
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name == user_inputs[0]:
            return int(node.meta["val"].shape[1])
    raise ValueError("exported program has no user input")


def _write_aoti(
    ep: torch.export.ExportedProgram,
    path: Path,
    options: CompileOptions,
    report: Callable[[str], None],
) -> Path:
    # TorchInductor reads its cache location from the TORCHINDUCTOR_CACHE_DIR
    # environment variable (there is no per-call argument for it), and it looks
    # the variable up lazily while compiling. So we set it only for the
    # duration of this compile -- and only if the caller asked for a dir -- and
    # restore the previous value afterwards so the rest of the process is not
    # affected. (Being process-global, it is not safe to run two compiles with
    # different cache dirs concurrently in one process.)
    key = "TORCHINDUCTOR_CACHE_DIR"
    previous = os.environ.get(key)
    if options.inductor_cache_dir is not None:
        cache_dir = Path(options.inductor_cache_dir).resolve()
        cache_dir.mkdir(parents=True, exist_ok=True)
        os.environ[key] = str(cache_dir)
    try:
        report("compiling AOTInductor package (C++ codegen + compile; this can take minutes)…")
        if path.exists():
            path.unlink()
        # Constants (parameters AND buffers, including non-persistent ones) are
        # packaged into the .pt2, so the loaded model is ready to run: we never
        # rely on load_constants(state_dict()) at serve time, because
        # state_dict() omits non-persistent buffers and running an AOTI model
        # with any constant missing segfaults.
        metadata = {
            META_HISTORY_LEN: str(int(ep_history_len(ep))),
            META_MAX_BATCH: str(options.max_batch),
        }
        out = torch._inductor.aoti_compile_and_package(
            ep,
            package_path=str(path),
            # Keep every tensor as a named constant: Inductor would otherwise inline small ones (e.g.
            # the MoE router's 8-element e_score_correction_bias) into the code, where a weight refit
            # (load_constants) cannot reach them and the refit engine would silently be wrong.
            inductor_configs={"aot_inductor.metadata": metadata, "always_keep_tensor_constants": True},
        )
    finally:
        if options.inductor_cache_dir is not None:
            if previous is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = previous
    return Path(out).resolve()


def _write_onnx(
    module: nn.Module,
    ep: torch.export.ExportedProgram,
    example: torch.Tensor,
    path: Path,
    options: CompileOptions,
    report: Callable[[str], None],
) -> Path:
    import onnx

    for stale in (path, path.with_name(path.name + ".data")):
        if stale.exists():
            stale.unlink()
    report("converting ExportedProgram to ONNX (dynamo exporter)…")
    # The dynamo exporter (torch.onnx.export(..., dynamo=True)) accepts the
    # already-exported program directly, so the dynamic batch dim carries over.
    # external_data=False keeps every initializer inside the single .onnx file
    # (the default, True, writes a side "<name>.data" file).
    # Verified with torch 2.13 + onnxscript 0.7: dynamo=True exports the user
    # tower (embedding, masked attention, topk/scatter/einsum MoE, normalize)
    # with a symbolic batch dim; the dynamo=False fallback below is only a
    # safety net for an op the dynamo exporter cannot translate.
    try:
        onnx_program = torch.onnx.export(
            ep,
            (example,),
            dynamo=True,
            external_data=False,
            input_names=[_INPUT_NAME],
            output_names=[_OUTPUT_NAME],
            optimize=True,
            verbose=False,
        )
        model_proto = onnx_program.model_proto
    except Exception as dynamo_err:  # pragma: no cover - fallback path
        report(f"dynamo ONNX export failed ({type(dynamo_err).__name__}: {dynamo_err}); "
               "falling back to the TorchScript exporter (dynamo=False)…")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            input_names=[_INPUT_NAME],
            output_names=[_OUTPUT_NAME],
            dynamic_axes={_INPUT_NAME: {0: "batch"}, _OUTPUT_NAME: {0: "batch"}},
            opset_version=18,
            do_constant_folding=True,
        )
        model_proto = onnx.load(str(path), load_external_data=True)

    size = model_proto.ByteSize()
    if size > _ONNX_PROTOBUF_LIMIT:
        raise ValueError(
            f"ONNX model is {size / 2**30:.2f} GiB, above protobuf's 2 GiB limit; "
            "a single-file engine needs a smaller model"
        )
    report(f"writing {path.name} ({size / 1e6:.1f} MB, weights inline)…")
    _assert_inline(model_proto)
    for key, value in (
        (META_HISTORY_LEN, str(int(example.shape[1]))),
        (META_MAX_BATCH, str(options.max_batch)),
    ):
        prop = model_proto.metadata_props.add()
        prop.key, prop.value = key, value
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(model_proto.SerializeToString())
    os.replace(tmp, path)
    onnx.checker.check_model(str(path))
    return path.resolve()


def _assert_inline(model_proto) -> None:
    """Fail loudly if any initializer still points at external data."""
    from onnx import TensorProto

    for init in model_proto.graph.initializer:
        if init.data_location == TensorProto.EXTERNAL:
            raise ValueError(f"ONNX initializer {init.name!r} uses external data; expected inline weights")
