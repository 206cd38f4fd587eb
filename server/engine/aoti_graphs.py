"""Compiled AOTInductor graphs, opened once per process and shared by every runner of that graph.

Why: `aoti_load_package` extracts the package and dlopens a fresh copy of its .so on every call and
never unmaps it: +5 MB RSS per load of the same 6.8 MB package, measured over 40 loads, so a
server swapping engines grew without bound (452 -> 1394 MB over 190 swaps). Runners built with
`AOTIModelContainerRunnerCpu` from one extracted .so path share one mapping (+0 MB over 40 runners);
each runner owns its constants, so a refit runner and the runner it replaces are independent.
"""

from __future__ import annotations

import atexit
import hashlib
import shutil
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True, slots=True)
class CompiledGraph:
    so_path: str               # extracted shared library (do not delete while runners exist)
    metadata: dict[str, str]   # the package's aot_inductor.metadata


class CompiledGraphs:
    """Package file -> CompiledGraph, extracted into one temp dir removed at process exit.
    Keyed by path, size and mtime: published engine files are never modified in place."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._graphs: dict[tuple, CompiledGraph] = {}
        self._dir: Path | None = None

    def open(self, package: Path) -> CompiledGraph:
        st = package.stat()
        key = (str(package.resolve()), st.st_size, st.st_mtime_ns)
        with self._lock:
            graph = self._graphs.get(key)
            if graph is None:
                graph = self._graphs[key] = self._extract(package, key)
            return graph

    def runner(self, package: Path) -> tuple[object, dict[str, str]]:
        """A fresh runner (own constants, one model instance) of the package's compiled graph."""
        graph = self.open(package)
        return torch._C._aoti.AOTIModelContainerRunnerCpu(graph.so_path, 1), graph.metadata

    def _extract(self, package: Path, key: tuple) -> CompiledGraph:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="livetower-aoti-"))
            atexit.register(shutil.rmtree, self._dir, True)
        with zipfile.ZipFile(package) as zf:
            libs = [n for n in zf.namelist() if n.endswith(".so")]
            if len(libs) != 1:
                raise ValueError(f"expected one compiled library in the package, found {len(libs)}: {libs[:3]}")
            out = self._dir / hashlib.sha256(repr(key).encode()).hexdigest()[:16]
            so_path = zf.extract(libs[0], out)
        # Metadata comes from the package loader (one mapping per distinct graph, not per runner).
        metadata = dict(torch._inductor.aoti_load_package(str(package)).get_metadata())
        return CompiledGraph(so_path=so_path, metadata=metadata)


GRAPHS = CompiledGraphs()  # process-wide on purpose: a mapped library is a process-wide resource
