"""KServe v2 tensors: model/tensor specs, the BYTES raw encoding, and request input parsing.

grpc-free apart from the status code an error maps onto; used by server/kserve.py.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import grpc
import numpy as np

from proto import grpc_service_pb2 as kpb

_LEN = struct.Struct("<I")


class KServeError(Exception):
    """Becomes the RPC's status: `code` and a message that names the tensor / field and the limit."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> KServeError:
    return KServeError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str               # "BYTES" | "FP32" | "INT32"
    shape: tuple[int, ...]      # full shape, batch dim included; -1 variable; "D" = engine dim
    optional: bool = False

    def resolved(self, dim: int) -> list[int]:
        return [dim if d == "D" else d for d in self.shape]


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int  # > 0: the first dim is the batch dim (left out of ModelConfig dims, Triton-style)
    description: str

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)


def decode_bytes_tensor(raw: bytes, count: int, name: str) -> list[bytes]:
    """BYTES raw encoding: per element a 4-byte little-endian length, then that many bytes."""
    out: list[bytes] = []
    pos, n = 0, len(raw)
    mv = memoryview(raw)
    while pos < n:
        if pos + 4 > n:
            raise invalid(f"input '{name}': raw BYTES content is truncated in the length prefix of "
                           f"element {len(out)}")
        (length,) = _LEN.unpack_from(raw, pos)
        pos += 4
        if pos + length > n:
            raise invalid(f"input '{name}': raw BYTES element {len(out)} declares {length} bytes but only "
                           f"{n - pos} remain")
        out.append(bytes(mv[pos:pos + length]))
        pos += length
    if len(out) != count:
        raise invalid(f"input '{name}': raw content holds {len(out)} BYTES elements; its shape needs {count}")
    return out


def encode_bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(_LEN.pack(len(b)) + b for b in items)


def shape_str(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


@dataclass(slots=True)
class Inputs:
    values: dict[str, object] = field(default_factory=dict)  # name -> list[bytes] | np.ndarray
    shapes: dict[str, list[int]] = field(default_factory=dict)
    raw: bool = False


def read_inputs(request: kpb.ModelInferRequest, spec: ModelSpec) -> Inputs:
    inputs = Inputs(raw=len(request.raw_input_contents) > 0)
    if inputs.raw and len(request.raw_input_contents) != len(request.inputs):
        raise invalid(f"raw_input_contents has {len(request.raw_input_contents)} entries but the request has "
                       f"{len(request.inputs)} inputs; they must match one to one")
    for i, tensor in enumerate(request.inputs):
        want = spec.input(tensor.name)
        if want is None:
            raise invalid(f"unexpected inference input '{tensor.name}' for model '{spec.name}'; it takes "
                           f"{', '.join(t.name for t in spec.inputs)}")
        if tensor.name in inputs.values:
            raise invalid(f"input '{tensor.name}' is given more than once")
        if tensor.datatype != want.datatype:
            raise invalid(f"inference input '{tensor.name}' data-type is '{tensor.datatype}', but model "
                           f"'{spec.name}' expects '{want.datatype}'")
        shape = list(tensor.shape)
        if len(shape) != len(want.shape) or any(d < 0 or (w != -1 and d != w) for d, w in zip(shape, want.shape)):
            raise invalid(f"unexpected shape for input '{tensor.name}' for model '{spec.name}'. Expected "
                           f"{shape_str(want.shape)}, got {shape_str(shape)}")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if inputs.raw and tensor.HasField("contents"):
            raise invalid(f"input '{tensor.name}' has contents while the request uses raw_input_contents; "
                           "use one or the other for all inputs")
        if want.datatype == "BYTES":
            if inputs.raw:
                value: object = decode_bytes_tensor(request.raw_input_contents[i], count, tensor.name)
            else:
                value = list(tensor.contents.bytes_contents)
                if len(value) != count:
                    raise invalid(f"input '{tensor.name}': contents.bytes_contents has {len(value)} elements; "
                                   f"shape {shape_str(shape)} needs {count}")
        elif want.datatype == "INT32":
            if inputs.raw:
                raw = request.raw_input_contents[i]
                if len(raw) != 4 * count:
                    raise invalid(f"input '{tensor.name}': raw content is {len(raw)} bytes; shape "
                                   f"{shape_str(shape)} of INT32 needs {4 * count}")
                value = np.frombuffer(raw, dtype="<i4")
            else:
                value = np.asarray(tensor.contents.int_contents, dtype=np.int32)
                if value.size != count:
                    raise invalid(f"input '{tensor.name}': contents.int_contents has {value.size} elements; "
                                   f"shape {shape_str(shape)} needs {count}")
        else:  # pragma: no cover - no model takes another input type
            raise invalid(f"input '{tensor.name}': datatype {want.datatype} is not supported")
        inputs.values[tensor.name] = value
        inputs.shapes[tensor.name] = shape
    missing = [t.name for t in spec.inputs if not t.optional and t.name not in inputs.values]
    if missing:
        raise invalid(f"model '{spec.name}' expects input '{missing[0]}' but the request does not have it")
    return inputs
