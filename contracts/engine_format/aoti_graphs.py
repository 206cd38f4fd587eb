"""Compiled AOTInductor graphs, opened once per process and shared by every runner of that graph.

Why: `aoti_load_package` extracts the package and dlopens a fresh copy of its .so on every call and
never unmaps it: +5 MB RSS per load of the same 6.8 MB package, measured over 40 loads, so a
server swapping engines grew without bound (452 -> 1394 MB over 190 swaps). Containers created
from one extracted .so share one mapping (+0 MB over 40 runners); each container owns its
constants, so a refit runner and the runner it replaces are independent. The package's metadata is
read from its JSON member: `aoti_load_package` just for the metadata took 5.7 s for a 100k-item
tower and held the GIL for up to 214 ms at a time (the event loop stalled on every full load).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

from contracts.engine_format.aoti_abi import AotiContainer, AotiLibrary

METADATA_SUFFIX = "_metadata.json"  # beside `<name>.so` in the package: `<name>_metadata.json`


@dataclass(frozen=True, slots=True)
class CompiledGraph:
    library: AotiLibrary       # the extracted shared library, mapped once (never unloaded)
    metadata: dict[str, str]   # the package's aot_inductor.metadata

    @property
    def so_path(self) -> str:
        return self.library.path


class CompiledGraphs:
    """Package file -> CompiledGraph, extracted into one temp dir removed at process exit.
    Keyed by path, size and mtime: published engine files are never modified in place."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._graphs: dict[tuple, CompiledGraph] = {}
        self._dir: Path | None = None

    @staticmethod
    def _key(package: Path) -> tuple[str, int, int]:
        st = package.stat()
        return str(package.resolve()), st.st_size, st.st_mtime_ns

    def open(self, package: Path) -> CompiledGraph:
        key = self._key(package)
        with self._lock:
            graph = self._graphs.get(key)
            if graph is None:
                graph = self._graphs[key] = self._extract(package, key)
            return graph

    def is_open(self, package: Path) -> bool:
        """Was this package file (same path, size and mtime) opened already (and so checked)?"""
        key = self._key(package)
        with self._lock:
            return key in self._graphs

    def container(self, package: Path) -> tuple[AotiContainer, dict[str, str]]:
        """A fresh container (own constants, one model instance) of the package's compiled graph."""
        graph = self.open(package)
        return AotiContainer(graph.library), graph.metadata

    def _extract(self, package: Path, key: tuple) -> CompiledGraph:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="livetower-aoti-"))
            atexit.register(shutil.rmtree, self._dir, True)
        with zipfile.ZipFile(package) as zf:
            names = zf.namelist()
            libs = [n for n in names if n.endswith(".so")]
            if len(libs) != 1:
                raise ValueError(f"expected one compiled library in the package, found {len(libs)}: {libs[:3]}")
            # The container loads its constants from the .so: a package with separate weight files
            # (package_constants_in_so=False) would run on unloaded constants, which segfaults.
            weights = [n for n in names if "/data/weights/" in n or "/data/constants/" in n]
            if weights:
                raise ValueError(f"the package stores weights outside its library ({weights[0]}); "
                                 "build it with the constants in the .so")
            meta_name = libs[0].removesuffix(".so") + METADATA_SUFFIX
            metadata = json.loads(zf.read(meta_name)) if meta_name in names else {}
            out = self._dir / hashlib.sha256(repr(key).encode()).hexdigest()[:16]
            so_path = zf.extract(libs[0], out)
        return CompiledGraph(library=AotiLibrary(so_path), metadata={str(k): str(v) for k, v in metadata.items()})


GRAPHS = CompiledGraphs()  # process-wide on purpose: a mapped library is a process-wide resource
