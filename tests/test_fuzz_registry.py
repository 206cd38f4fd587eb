"""Fuzzing Registry.verify and the server's engine loading path with mutated manifests and engine files.

Each input is a copy of the trained engine with one mutation: the manifest edited at the JSON level
(entries dropped, duplicated or renamed to path tricks, sizes and hashes changed, fields of the wrong
type, version mismatch, random bytes), or an engine file truncated, flipped, emptied, replaced or
removed (with the manifest left stale, or re-hashed to match so the loader itself meets the bad bytes).

Properties: Registry.verify returns the manifest or raises EngineCorrupt; EngineManager.load_verified
(verify, load, golden parity, index recall, warm-up: what the server runs before an engine takes
traffic) returns an engine or raises EngineRejected / EngineCorrupt - the two it refuses an engine
with (anything else escapes to the watcher, which retries forever); no file outside the engine
directory is opened (sentinel copies of every engine file lie just outside it, an audit hook records
every open); and an engine that loads had every file the loader opened listed in its manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.registry import MANIFEST, EngineCorrupt, Registry, sha256_file
from server.engine.engine import EngineRejected
from server.engine.manager import EngineManager, EngineManagerConfig
from tests.fuzz_support import INT64, NASTY_STRINGS, Tally, budget, ints, mutated, texts

VERSION = 1
REFUSALS = (EngineRejected, EngineCorrupt)
PATH_TRICKS = ("../{f}", "../../{f}", "../../../secret", "/etc/passwd", "{sandbox}/secret", "./{f}", "{f}/",
               "a/{f}", "{f}\x00", ".{f}", "..", ".", "", "x" * 300, "ñ{f}", "{f}" + "\u202e")
CONFIG = EngineManagerConfig(warmup_calls=1, verify_pause_s=0.0, load_nice=0, compute_process=False)  # files, not compute


# ---------------------------------------------------------------- which files get opened

class _Opens:
    """Paths opened by this thread while recording (sys.addaudithook cannot be removed: one per process)."""

    def __init__(self) -> None:
        self.paths: list[str] | None = None
        self.thread = None

    def hook(self, event: str, args) -> None:
        if event == "open" and self.paths is not None and threading.get_ident() == self.thread:
            path = args[0]
            if isinstance(path, (str, bytes, os.PathLike)):
                self.paths.append(os.path.abspath(os.fsdecode(path)))

    def start(self) -> None:
        self.paths, self.thread = [], threading.get_ident()

    def stop(self) -> list[str]:
        paths, self.paths = self.paths or [], None
        return paths


OPENS = _Opens()
sys.addaudithook(OPENS.hook)


@pytest.fixture(scope="module")
def engine_template(trained_dir_template) -> Path:
    return trained_dir_template / "registry" / "engines" / str(VERSION)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_registry")


def _sandbox(scratch: Path, template: Path) -> tuple[Path, Path]:
    """sandbox/registry/engines/1 = the engine; copies of each of its files (and a manifest) lie outside it,
    one and two levels up, and sandbox/secret: a loader that reads them sees plausible bytes."""
    sandbox = Path(tempfile.mkdtemp(dir=scratch))
    engine = sandbox / "registry" / "engines" / str(VERSION)
    shutil.copytree(template, engine)
    for name in os.listdir(engine):
        shutil.copy(engine / name, engine.parent / name)
        shutil.copy(engine / name, sandbox / "registry" / name)
    shutil.copy(engine / "items.npy", sandbox / "secret")
    return sandbox, engine


def _entry_for(path: Path, name: str) -> dict:
    return {"path": name, "sha256": sha256_file(path), "size": str(path.stat().st_size)}


# ---------------------------------------------------------------- mutations

@st.composite
def manifest_mutations(draw, original: bytes):
    """A function (manifest dict, sandbox, engine dir) -> manifest text. original: the manifest's bytes."""
    op = draw(st.sampled_from(("drop", "drop_all", "duplicate", "rename", "size", "sha", "field", "wrong_type",
                               "unknown_field", "version", "text_bytes", "random_bytes", "extra_file")))
    index = draw(st.integers(0, 50))
    trick = draw(st.sampled_from(PATH_TRICKS))
    name = draw(texts())
    rehash = draw(st.booleans())  # point size/sha at what the trick path really holds: verify cannot tell
    number = draw(ints(*INT64))
    field_name = draw(st.sampled_from(("backend", "dim", "item_count", "max_history", "graph_version", "parent",
                                       "golden", "architecture_hash", "retrieval_json", "model_config_json",
                                       "stream_offsets", "eval_metrics", "files")))
    value = draw(st.one_of(st.sampled_from(NASTY_STRINGS), ints(*INT64).map(str), st.just(None), st.just([]),
                           st.just({}), st.floats(allow_nan=True), st.booleans()))
    raw = draw(st.binary(max_size=256))
    text_mutation = draw(mutated(original, max_ops=6))
    use_trick = draw(st.booleans())  # else a random name

    def apply(m: dict, sandbox: Path, engine: Path) -> bytes:
        files = m.setdefault("files", [])
        i = index % max(1, len(files))
        if op == "drop" and files:
            files.pop(i)
        elif op == "drop_all":
            m["files"] = []
        elif op == "duplicate" and files:
            files.append(dict(files[i]))
        elif op == "rename" and files:
            target = trick.format(f=files[i]["path"], sandbox=sandbox)
            files[i]["path"] = target if use_trick else name
            where = (engine / files[i]["path"]) if files[i]["path"] else None
            if rehash and where is not None and where.is_file():
                files[i].update(_entry_for(where, files[i]["path"]))
        elif op == "size" and files:
            files[i]["size"] = str(number)
        elif op == "sha" and files:
            files[i]["sha256"] = name
        elif op == "field":
            m[field_name] = value
        elif op == "wrong_type":
            m[field_name] = {"nested": value} if not isinstance(value, dict) else [value]
        elif op == "unknown_field":
            m[name or "x"] = value
        elif op == "version":
            m["version"] = str(number)
        elif op == "extra_file":  # an unlisted file next to the listed ones
            (engine / (name.replace("/", "_").replace("\x00", "_")[:100] or "extra")).write_bytes(raw)
        if op == "random_bytes":
            return raw
        if op == "text_bytes":
            return text_mutation
        return json.dumps(m, indent=1).encode()

    apply.description = f"manifest {op}"
    return apply


@st.composite
def file_mutations(draw):
    """A function (manifest dict, sandbox, engine dir) -> manifest text, after damaging one engine file."""
    which = draw(st.integers(0, 50))
    op = draw(st.sampled_from(("truncate", "flip", "empty", "random", "delete", "append")))
    rehash = draw(st.booleans())
    cut = draw(st.integers(0, 10_000))
    raw = draw(st.binary(max_size=512))
    flips = draw(mutated(b"\x00" * 32, max_ops=4))

    def apply(m: dict, sandbox: Path, engine: Path) -> bytes:
        files = m.get("files", [])
        if not files:
            return json.dumps(m).encode()
        entry = files[which % len(files)]
        p = engine / entry["path"]
        data = p.read_bytes()
        if op == "truncate":
            data = data[:cut % max(1, len(data))]
        elif op == "flip":
            data = bytearray(data)
            for j, b in enumerate(flips):  # xor the pattern in at a spot chosen by `cut`
                if b and data:
                    data[(cut + j) % len(data)] ^= b
            data = bytes(data)
        elif op == "empty":
            data = b""
        elif op == "random":
            data = raw
        elif op == "append":
            data = data + raw
        if op == "delete":
            p.unlink()
        else:
            p.write_bytes(data)
            if rehash:
                entry.update(_entry_for(p, entry["path"]))
        return json.dumps(m, indent=1).encode()

    apply.description = f"file {op}{' rehashed' if rehash else ''}"
    return apply


# ---------------------------------------------------------------- the property

def _check(mutation, scratch: Path, template: Path, tally: Tally) -> bool:
    """Apply `mutation` to a fresh copy of the engine, verify and load it, check the properties; loaded?"""
    sandbox, engine = _sandbox(scratch, template)
    try:
        manifest = json.loads((engine / MANIFEST).read_text())
        (engine / MANIFEST).write_bytes(mutation(manifest, sandbox, engine))
        registry = Registry(sandbox / "registry")
        OPENS.start()
        try:
            try:
                registry.verify(VERSION)
                verified = True
            except EngineCorrupt:
                verified = False
            try:
                loaded = EngineManager(registry, CONFIG).load_verified(VERSION)
            except REFUSALS:
                loaded = None
        finally:
            opened = OPENS.stop()
        # Never outside the engine dir: not the sentinel copies, not absolute paths from the manifest.
        outside = [p for p in opened
                   if (p.startswith(str(sandbox)) and not p.startswith(str(engine) + os.sep)) or p == "/etc/passwd"]
        assert not outside, f"{mutation.description}: opened outside the engine dir: {outside}"
        if loaded is not None:
            listed = {f.path for f in registry.read_manifest(VERSION).files} | {MANIFEST}
            unlisted = sorted({os.path.relpath(p, engine) for p in opened if p.startswith(str(engine) + os.sep)}
                              - listed)
            assert not unlisted, f"{mutation.description}: loaded, reading files the manifest does not list: {unlisted}"
        tally.add(f"{mutation.description}: {'loaded' if loaded is not None else 'refused'}"
                  f"{'' if verified or loaded is None else ' (verify refused, load took it?)'}")
        assert verified or loaded is None, f"{mutation.description}: verify refused it but the loader took it"
        return loaded is not None
    finally:
        shutil.rmtree(sandbox, ignore_errors=True)


def test_mutated_manifests(engine_template, scratch):
    tally = Tally("Registry.verify + EngineManager.load_verified (mutated manifest)")

    @budget(0.5)
    @given(mutation=manifest_mutations((engine_template / MANIFEST).read_bytes()))
    def fuzz(mutation):
        _check(mutation, scratch, engine_template, tally)

    try:
        fuzz()
    finally:
        tally.report()


def test_mutated_engine_files(engine_template, scratch):
    tally = Tally("Registry.verify + EngineManager.load_verified (mutated engine file)")

    @budget(0.5)
    @given(mutation=file_mutations())
    def fuzz(mutation):
        _check(mutation, scratch, engine_template, tally)

    try:
        fuzz()
    finally:
        tally.report()


def test_unmutated_engine_loads(engine_template, scratch):
    """The fuzz's harness itself: the trained engine, untouched, verifies and loads (so refusals mean something)."""
    def unchanged(m: dict, sandbox: Path, engine: Path) -> bytes:
        return (engine / MANIFEST).read_bytes()

    unchanged.description = "unchanged"
    assert _check(unchanged, scratch, engine_template, Tally("harness check"))


def _named(description: str, edit):
    """A mutation from `edit(manifest dict, sandbox, engine dir)`, which changes the dict in place."""
    def apply(m: dict, sandbox: Path, engine: Path) -> bytes:
        edit(m, sandbox, engine)
        return json.dumps(m, indent=1).encode()

    apply.description = description
    return apply


def _point_at(target: str, remove_own: bool):
    """Rename the items.npy entry to `target` (formatted with sandbox), with the size and hash of what lies there."""
    def edit(m: dict, sandbox: Path, engine: Path) -> None:
        entry = next(f for f in m["files"] if f["path"] == "items.npy")
        name = target.format(sandbox=sandbox)
        where = engine / name
        if where.is_file():
            entry.update(_entry_for(where, name))
        else:
            entry["path"] = name
        if remove_own:
            (engine / "items.npy").unlink()
    return edit


# The cases issue 22 names, always tried (a random run may miss one): each must be refused without any read
# outside the engine dir.
@pytest.mark.parametrize("mutation", [
    _named("files: []", lambda m, sandbox, engine: m.update(files=[])),
    _named("items.npy unlisted", lambda m, sandbox, engine: m.update(
        files=[f for f in m["files"] if f["path"] != "items.npy"])),
    _named("../items.npy listed (a valid copy), own file removed", _point_at("../items.npy", True)),
    _named("../items.npy listed (a valid copy), own file kept", _point_at("../items.npy", False)),
    _named("absolute path to a valid copy", _point_at("{sandbox}/secret", True)),
    _named("/etc/passwd listed", _point_at("/etc/passwd", False)),
    _named("a/b listed", _point_at("a/b", False)),
    _named("version mismatch", lambda m, sandbox, engine: m.update(version="2")),
], ids=lambda m: m.description)
def test_named_manifest_attacks(mutation, engine_template, scratch):
    assert not _check(mutation, scratch, engine_template, Tally(mutation.description)), \
        f"{mutation.description}: the engine loaded"
