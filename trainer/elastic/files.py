"""A round's files without pickle: the data and state files hold tensors and plain containers only (read back
with `torch.load(weights_only=True)`, which runs no code from the file), and the RoundSpec is JSON.

numpy arrays are stored as tensors under a one-key marker dict and come back as numpy arrays.
"""

from __future__ import annotations

import dataclasses
import io
import json
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contracts.atomic import read_file, save_atomic, write_atomic

_NDARRAY = "__ndarray__"


def _pack(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return {_NDARRAY: torch.from_numpy(np.ascontiguousarray(obj))}
    if isinstance(obj, dict):
        return {k: _pack(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_pack(v) for v in obj)
    return obj


def _unpack(obj: Any) -> Any:
    if isinstance(obj, dict):
        if len(obj) == 1 and _NDARRAY in obj:
            return obj[_NDARRAY].numpy()
        return {k: _unpack(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_unpack(v) for v in obj)
    return obj


def save_tensors(path: Path, obj: dict) -> None:
    """Atomically write `obj` (tensors, numpy arrays, numbers, strings, None and lists/tuples/dicts of them)."""
    save_atomic(Path(path), lambda f: torch.save(_pack(obj), f))


def load_tensors(path: Path, map_location: str | None = "cpu") -> dict:
    return _unpack(torch.load(io.BytesIO(read_file(path)), map_location=map_location, weights_only=True))


# ---- dataclass <-> JSON (RoundSpec and the configs inside it)

def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _typed(hint: Any, value: Any) -> Any:
    """`value` (from JSON) as the annotated type: dataclasses, Optional, tuples, Path; the rest as is."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        return _typed(arms[0], value) if len(arms) == 1 else value
    if dataclasses.is_dataclass(hint):
        return from_plain(hint, value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_typed(args[0], v) for v in value)
        return tuple(_typed(a, v) for a, v in zip(args, value)) if args else tuple(value)
    if hint is Path:
        return Path(value)
    return value


def from_plain(cls: type, d: dict) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(sorted(unknown))}")
    return cls(**{k: _typed(hints[k], v) for k, v in d.items()})


def save_spec(path: Path, spec: Any) -> None:
    write_atomic(Path(path), json.dumps(_plain(spec), indent=1).encode())


def load_spec(path: Path, cls: type) -> Any:
    return from_plain(cls, json.loads(Path(path).read_text()))
