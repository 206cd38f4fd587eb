"""A registry that cannot be tricked: manifests list every file the loader opens under plain names, nothing
unlisted or linked sits in an engine, Ed25519 signatures when required, key files kept private, a tampered
parent never lends its files to a build, and garbage collection keeps what serving needs."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from contracts.registry import (ITEMS_FILE, MANIFEST, SIGNATURE, EngineCorrupt, Registry, manifest_from_json,
                                manifest_to_json)
from contracts.rollout import RolloutState
from contracts.signing import KeyFileError, ManifestTrust, generate_keypair, load_private_key, load_public_keys, sign
from proto import livetower_v1_pb2 as pb
from tests.test_registry import FILES, publish, stage


def rewrite_manifest(reg: Registry, v: int, change) -> None:
    """What a publisher with write access to the registry could do: edit a published manifest."""
    m = reg.read_manifest(v)
    change(m)
    (reg.engine_dir(v) / MANIFEST).write_text(manifest_to_json(m))


@pytest.fixture
def keys(tmp_path):
    """(private key path, public key path) of a fresh key pair, and a second, foreign pair."""
    d = tmp_path / "keys"
    d.mkdir()
    generate_keypair(d / "signer.pem", d / "signer.pub")
    generate_keypair(d / "other.pem", d / "other.pub")
    return d


# ---------------------------------------------------------------- the listing

def test_empty_file_list_is_refused(tmp_path):
    reg = Registry(tmp_path)
    v = publish(reg)
    rewrite_manifest(reg, v, lambda m: m.ClearField("files"))
    with pytest.raises(EngineCorrupt, match="does not list user_tower.ep.pt2, items.npy, item_ids.json, popularity"):
        reg.verify(v)


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "a\\b", "..", ".", "", ".hidden", MANIFEST, "x\0y"])
def test_manifest_paths_must_be_plain_names(tmp_path, name):
    reg = Registry(tmp_path)
    v = publish(reg)
    (tmp_path / "x").write_bytes(b"outside the engine")  # what ../x would reach
    rewrite_manifest(reg, v, lambda m: m.files.add(path=name, sha256="0" * 64, size=18))
    with pytest.raises(EngineCorrupt, match=re.escape(f"manifest path {name!r} is not a plain file name")):
        reg.verify(v)


def test_a_required_file_missing_from_the_list_is_refused_even_with_the_file_on_disk(tmp_path):
    reg = Registry(tmp_path)
    v = publish(reg)
    rewrite_manifest(reg, v, lambda m: [m.files.remove(f) for f in list(m.files) if f.path == ITEMS_FILE])
    with pytest.raises(EngineCorrupt, match="does not list items.npy"):
        reg.verify(v)


def test_unlisted_file_on_disk_is_refused(tmp_path):
    reg = Registry(tmp_path)
    v = publish(reg)
    reg.verify(v)
    (reg.engine_dir(v) / "items.index").write_bytes(b"an index nobody hashed")
    with pytest.raises(EngineCorrupt, match="file 'items.index' is not listed in the manifest"):
        reg.verify(v)


def test_symlinks_and_subdirectories_are_refused(tmp_path):
    reg = Registry(tmp_path)
    v = publish(reg)
    target = tmp_path / "elsewhere"
    target.write_bytes(FILES["items.npy"])
    p = reg.engine_dir(v) / "items.npy"
    p.unlink()
    p.symlink_to(target)  # same bytes, so only the link itself is wrong
    with pytest.raises(EngineCorrupt, match="'items.npy' is a symlink"):
        reg.verify(v)
    p.unlink()
    p.write_bytes(FILES["items.npy"])
    reg.verify(v)
    (reg.engine_dir(v) / "sub").mkdir()
    with pytest.raises(EngineCorrupt, match="'sub' is not a regular file"):
        reg.verify(v)
    os.rmdir(reg.engine_dir(v) / "sub")
    link = reg.engines_dir / "77"
    link.symlink_to(reg.engine_dir(v))  # a version that is a link to another engine's dir
    with pytest.raises(EngineCorrupt, match="not a directory"):
        reg.verify(77)


def test_publish_refuses_a_staging_dir_that_is_not_flat(tmp_path):
    reg = Registry(tmp_path)
    d = stage(reg)
    (d / "sub").mkdir()
    with pytest.raises(ValueError, match="'sub' is not a regular file"):
        reg.publish(d, pb.EngineManifest(backend="torch"))


# ---------------------------------------------------------------- signatures

def test_signed_publish_verifies_and_tampering_is_refused(tmp_path, keys):
    reg = Registry(tmp_path / "reg")
    key = load_private_key(keys / "signer.pem")
    v = reg.publish(stage(reg), pb.EngineManifest(backend="torch"), signing_key=key)
    trusted = ManifestTrust.from_files(keys / "signer.pub", required=True)
    assert reg.verify(v, trust=trusted).version == v  # good signature: accepted
    foreign = ManifestTrust.from_files(keys / "other.pub", required=True)
    with pytest.raises(EngineCorrupt, match="does not verify with any trusted key"):
        reg.verify(v, trust=foreign)
    # An edited manifest (here: one more item) keeps the old signature: refused, also where signatures are optional.
    rewrite_manifest(reg, v, lambda m: setattr(m, "item_count", m.item_count + 1))
    with pytest.raises(EngineCorrupt, match="does not verify"):
        reg.verify(v, trust=ManifestTrust.from_files(keys / "signer.pub", required=False))


def test_unsigned_engine_refused_only_when_required(tmp_path, keys):
    reg = Registry(tmp_path / "reg")
    v = publish(reg)
    assert not (reg.engine_dir(v) / SIGNATURE).exists()
    reg.verify(v, trust=ManifestTrust.from_files(keys / "signer.pub", required=False))
    with pytest.raises(EngineCorrupt, match="no manifest signature"):
        reg.verify(v, trust=ManifestTrust.from_files(keys / "signer.pub", required=True))
    (reg.engine_dir(v) / SIGNATURE).write_bytes(b"\0" * 64)  # a signature file of the right size, made up
    with pytest.raises(EngineCorrupt, match="does not verify"):
        reg.verify(v, trust=ManifestTrust.from_files(keys / "signer.pub", required=True))
    with pytest.raises(ValueError, match="at least one trusted public key"):
        ManifestTrust((), required=True)


def test_key_files(tmp_path, keys):
    raw = tmp_path / "raw.key"
    raw.write_bytes(os.urandom(32))
    raw.chmod(0o600)
    key = load_private_key(raw)  # raw 32 bytes
    (keys / "signer.pem").chmod(0o640)
    with pytest.raises(KeyFileError, match="readable by group or others .* chmod 600"):
        load_private_key(keys / "signer.pem")
    raw.chmod(0o604)
    with pytest.raises(KeyFileError, match="readable by group or others"):
        load_private_key(raw)
    # A public key file of several keys (rotation): PEM and hex lines; each signer's manifests verify.
    from contracts.signing import public_key_hex

    both = tmp_path / "trusted"
    both.write_text((keys / "other.pub").read_text() + "# the raw key\n" + public_key_hex(key.public_key()) + "\n")
    assert len(load_public_keys(both)) == 2
    assert ManifestTrust.from_files(both, True).check(b"m", sign(key, b"m")) is None
    (tmp_path / "junk").write_text("not a key\n")
    with pytest.raises(KeyFileError, match="trusted keys"):
        load_public_keys(tmp_path / "junk")
    with pytest.raises(FileExistsError):
        generate_keypair(keys / "signer.pem", tmp_path / "x.pub")  # never overwrites a private key


# ---------------------------------------------------------------- garbage collection

def test_gc_keeps_newest_stable_canary_previous_stable_and_graph_versions(tmp_path):
    reg = Registry(tmp_path)
    for parent in range(9):
        publish(reg, parent=parent)  # v1..v9, each the parent of the next (the live loop's lineage)
    rewrite_manifest(reg, 6, lambda m: setattr(m, "graph_version", 1))  # canary 6 is a refit of 1's graph
    st = RolloutState(stable=3, canary=6)  # promote 3 -> 4: recorded with stable_version 3
    st.record("promote", 4, "auto", "ok")
    st.stable = 4
    reg.write_rollout(st)
    removed = reg.collect_garbage(keep_newest=2)
    # kept: newest 2 (8, 9), stable 4, previous stable 3, canary 6 and its graph version 1; parents pin nothing
    assert sorted(removed) == [2, 5, 7]
    assert reg.versions() == [1, 3, 4, 6, 8, 9]
    assert not [p for p in reg.engines_dir.iterdir() if not p.name.isdigit()]  # nothing left half-deleted
    assert reg.collect_garbage(keep_newest=2, protected={3}) == []
    with pytest.raises(ValueError, match="keep_newest must be >= 1"):
        reg.collect_garbage(keep_newest=0)


def test_gc_rename_first_keeps_an_open_reader_whole(tmp_path):
    reg = Registry(tmp_path)
    publish(reg)
    publish(reg)
    f = open(reg.engine_dir(1) / "items.npy", "rb")  # a server reading engine 1's files as it goes away
    assert reg.collect_garbage(keep_newest=1) == [1]
    assert f.read() == FILES["items.npy"]
    f.close()
    assert reg.versions() == [2] and reg.verify(2).version == 2


# ---------------------------------------------------------------- a tampered parent (real AOTI engines)

N_ITEMS = 300


def _build(reg: Registry, parent: int, key, progress=None, seed: int = 0):
    import numpy as np
    import torch

    from trainer.config import TrainConfig
    from trainer.export.build import BuildInfo, build_engine
    from trainer.export.compile import CompileOptions
    from trainer.model import TwoTower

    torch.manual_seed(seed)
    model = TwoTower(TrainConfig.tiny_debug().model, N_ITEMS + 1).eval()
    info = BuildInfo(parent=parent, stream_offsets={}, watermark_ms=0, trained_events=0, eval_metrics={})
    options = CompileOptions(backend="aoti", inductor_cache_dir=str(reg.root.parent / "inductor-cache"))
    return build_engine(model, [f"item-{i}" for i in range(1, N_ITEMS + 1)], np.ones(N_ITEMS + 1), reg, info,
                        options, parity_tolerance=1e-4, signing_key=key, progress=progress or (lambda m: None))


def flip_byte(path, at: int = 100) -> None:
    b = bytearray(path.read_bytes())
    b[at] ^= 0x01
    path.write_bytes(bytes(b))


@pytest.fixture(scope="module")
def aoti_lineage(tmp_path_factory):
    """A signed registry: engine 1 (AOTI, compiled) and engine 2 (a refit of 1's graph). Copy before mutating."""
    root = tmp_path_factory.mktemp("aoti")
    (root / "keys").mkdir()
    generate_keypair(root / "keys" / "signer.pem", root / "keys" / "signer.pub")
    generate_keypair(root / "keys" / "other.pem", root / "keys" / "other.pub")
    reg = Registry(root / "registry")
    assert _build(reg, 0, root / "keys" / "signer.pem").graph_version == 0
    assert _build(reg, 1, root / "keys" / "signer.pem", seed=1).graph_version == 1  # parent verifies: refit
    return root


def test_refit_never_reuses_a_tampered_parent(aoti_lineage, tmp_path):
    from server.engine.loading import load_from_registry
    from server.engine.manager import EngineManagerConfig
    from trainer.export.build import trusted_parent

    shutil.copytree(aoti_lineage, tmp_path, dirs_exist_ok=True)
    reg, key = Registry(tmp_path / "registry"), tmp_path / "keys" / "signer.pem"
    assert (reg.engine_dir(2) / SIGNATURE).is_file() and "user_tower.pt2" not in {f.path for f in reg.read_manifest(2).files}
    flip_byte(reg.engine_dir(1) / "user_tower.pt2")  # the compiled graph engine 2 runs, changed after publishing
    said: list[str] = []
    m = _build(reg, 2, key, progress=said.append, seed=2)
    assert m.graph_version == 0 and "user_tower.pt2" in {f.path for f in m.files}  # compiled afresh, not refit
    assert any("parent engine 2 failed verification" in s and "user_tower.pt2 sha256 mismatch" in s for s in said)
    # The server refuses the refit engine whose graph was tampered with, naming both.
    config = EngineManagerConfig(trusted_keys=tmp_path / "keys" / "signer.pub", require_signature=True)
    with pytest.raises(EngineCorrupt, match="runs the graph of engine 1, which is refused.*sha256 mismatch"):
        load_from_registry(reg, 2, config)
    # An unsigned parent (its signature removed) lends nothing either when the trainer signs.
    (reg.engine_dir(m.version) / SIGNATURE).unlink()
    assert trusted_parent(reg, m.version, ManifestTrust.of_signer(load_private_key(key)), said.append) == 0
    assert "no manifest signature" in said[-1]


# ---------------------------------------------------------------- refusals on a live server

def _plant(reg: Registry, src, version: int, key_path, change=lambda m: None) -> None:
    """Put a copy of engine dir `src` into the registry as `version`, manifest changed and signed with key_path."""
    d = reg.engine_dir(version)
    shutil.copytree(src, d)
    (d / SIGNATURE).unlink(missing_ok=True)
    m = manifest_from_json((d / MANIFEST).read_text())
    m.version = version
    change(m)
    raw = manifest_to_json(m).encode()
    (d / MANIFEST).write_bytes(raw)
    (d / SIGNATURE).write_bytes(sign(load_private_key(key_path), raw))


def test_live_server_refuses_each_bad_engine_with_its_reason_and_keeps_serving(trained_dir, aoti_lineage):
    import time

    from contracts.client import Client
    from server.engine.manager import EngineManagerConfig
    from tests.conftest import FAST_POLICY, running_server, server_config, wait_for

    keys = aoti_lineage / "keys"
    reg = Registry(trained_dir / "registry")
    good = reg.engine_dir(1)
    raw = (good / MANIFEST).read_bytes()
    (good / SIGNATURE).write_bytes(sign(load_private_key(keys / "signer.pem"), raw))  # the good engine, signed
    src = Registry(aoti_lineage / "registry")
    _plant(reg, src.engine_dir(1), 2, keys / "signer.pem")        # an AOTI graph engine ...
    flip_byte(reg.engine_dir(2) / "user_tower.pt2")               # ... tampered with after publishing
    _plant(reg, src.engine_dir(2), 3, keys / "signer.pem", lambda m: setattr(m, "graph_version", 2))  # its refit
    _plant(reg, good, 4, keys / "signer.pem", lambda m: m.ClearField("files"))                      # files: []
    (trained_dir / "registry" / "x").write_bytes(b"outside")
    _plant(reg, good, 5, keys / "signer.pem", lambda m: m.files.add(path="../x", sha256="0" * 64, size=7))
    _plant(reg, good, 6, keys / "other.pem")                      # signed, by a key the server does not trust
    (trained_dir / "registry" / "rollout.json").write_text(RolloutState(stable=1).to_json())
    engines = EngineManagerConfig(poll_interval_s=0.1, analysis_interval_s=0.05, warmup_calls=2,
                                  default_policy=FAST_POLICY, trusted_keys=keys / "signer.pub", require_signature=True)
    with running_server(server_config(trained_dir, engines=engines)) as (server, port):
        c = Client(f"127.0.0.1:{port}", timeout_s=10)
        answers = []
        deadline = time.monotonic() + 60
        while set(server.manager.rollout.refused) != {2, 3, 4, 5, 6} and time.monotonic() < deadline:
            if server.manager.stable is not None:
                r = c.recommend("user-1", k=5, history=["item-1", "item-2"])
                answers.append((r.engine_version, len(r.item_ids)))
            time.sleep(0.05)
        wait_for(lambda: set(server.manager.rollout.refused) == {2, 3, 4, 5, 6}, 5, "every bad engine refused")
        r = c.recommend("user-1", k=5, history=["item-1", "item-2"])
        assert r.engine_version == 1 and len(r.item_ids) == 5
        assert answers and all(a == (1, 5) for a in answers), answers[:5]
        st = Registry(trained_dir / "registry").read_rollout()
        c.close()
    assert st.stable == 1 and st.canary == 0
    refusals = {e.version: e.reason for e in st.history if e.action == "refuse"}
    assert set(refusals) == {2, 3, 4, 5, 6} and refusals == st.refused
    assert "user_tower.pt2 sha256 mismatch" in refusals[2]
    assert "runs the graph of engine 2, which is refused" in refusals[3]
    assert "manifest does not list user_tower.ep.pt2, items.npy, item_ids.json, popularity.json" in refusals[4]
    assert "manifest path '../x' is not a plain file name" in refusals[5]
    assert "manifest signature does not verify with any trusted key" in refusals[6]
    print(f"\nRecommend answers during the refusals: {len(answers)}, all from engine 1")
    for v, why in sorted(refusals.items()):
        print(f"refused engine {v}: {why}")


def test_registry_commands_keygen_and_gc(tmp_path, capsys):
    import argparse

    from livetower.cli_signing import add_registry_parser

    parser = argparse.ArgumentParser()
    add_registry_parser(parser.add_subparsers())
    run = lambda *argv: (a := parser.parse_args(list(argv))).func(a)  # noqa: E731
    assert run("registry", "keygen", "--private-key", str(tmp_path / "k.pem"), "--public-key", str(tmp_path / "k.pub")) == 0
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    reg = Registry(tmp_path / "reg")
    v = reg.publish(stage(reg), pb.EngineManifest(backend="torch"), signing_key=load_private_key(tmp_path / "k.pem"))
    reg.verify(v, trust=ManifestTrust.from_files(tmp_path / "k.pub", required=True))
    with pytest.raises(SystemExit, match="not overwriting"):
        run("registry", "keygen", "--private-key", str(tmp_path / "k.pem"), "--public-key", str(tmp_path / "x.pub"))
    for _ in range(3):
        publish(reg)
    assert run("registry", "gc", "--registry", str(tmp_path / "reg"), "--keep", "2") == 0
    assert "removed 2 engine(s): 1, 2" in capsys.readouterr().out and reg.versions() == [3, 4]
