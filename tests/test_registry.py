import hashlib
import json
import os
import time

import pytest

from contracts.registry import (
    MANIFEST, EngineCorrupt, Registry, RolloutState, manifest_from_json, manifest_to_json, sha256_file,
)
from contracts.rollout import HISTORY_KEPT, CanaryPolicy
from proto import livetower_v1_pb2 as pb

# Every file the loader opens for a torch engine (contracts/registry.py required_files), and one more.
FILES = {"items.npy": b"\x93NUMPY" + bytes(range(200)), "item_ids.json": b'["a", "b"]',
         "user_tower.ep.pt2": b"graph" * 1000, "popularity.json": b"{}", "empty.bin": b""}


def stage(reg, files=FILES):
    d = reg.staging_dir()
    for rel, data in files.items():
        (d / rel).write_bytes(data)
    return d


def publish(reg, **kw):
    return reg.publish(stage(reg), pb.EngineManifest(backend="torch", item_count=2, **kw))


def test_sha256_file(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"hello" * 300_000)  # > 1 MiB chunk
    assert sha256_file(p) == hashlib.sha256(b"hello" * 300_000).hexdigest()


def test_publish_gives_consecutive_versions_and_full_manifest(tmp_path):
    reg = Registry(tmp_path)
    assert reg.versions() == [] and reg.latest() == 0
    assert [publish(reg) for _ in range(3)] == [1, 2, 3]
    assert reg.versions() == [1, 2, 3] and reg.latest() == 3
    m = reg.read_manifest(2)
    assert m.version == 2 and m.backend == "torch" and m.item_count == 2
    assert m.created_ms > 1_600_000_000_000
    got = {f.path: (f.sha256, f.size) for f in m.files}
    assert got == {rel: (hashlib.sha256(d).hexdigest(), len(d)) for rel, d in FILES.items()}
    assert MANIFEST not in got
    assert reg.verify(2) == m


def test_publish_replaces_stale_file_list_and_skips_staged_manifest(tmp_path):
    reg = Registry(tmp_path)
    d = stage(reg)
    (d / MANIFEST).write_text("stale")
    m = pb.EngineManifest(backend="torch")
    m.files.add(path="ghost", sha256="0" * 64, size=3)
    v = reg.publish(d, m)
    assert [f.path for f in reg.read_manifest(v).files] == sorted(FILES)
    reg.verify(v)


def test_published_dir_has_no_leftover_files(tmp_path):
    reg = Registry(tmp_path)
    v = publish(reg)
    root = reg.engine_dir(v)
    on_disk = {str(p.relative_to(root)) for p in root.rglob("*")}
    assert on_disk == set(FILES) | {MANIFEST}
    # the staging dir was renamed, not copied
    assert [p.name for p in reg.engines_dir.iterdir()] == ["1"]


def test_staging_and_manifestless_dirs_are_not_versions(tmp_path):
    reg = Registry(tmp_path)
    publish(reg)
    stage(reg)  # a build in progress
    (reg.engines_dir / "9").mkdir()  # no manifest
    (reg.engines_dir / "notes").mkdir()
    assert reg.versions() == [1]
    assert reg.latest() == 1


def test_remove_stale_staging(tmp_path):
    reg = Registry(tmp_path)
    publish(reg)
    s1, s2 = stage(reg), reg.staging_dir()
    assert s1.name.startswith(".tmp-") and s2.name.startswith(".tmp-")
    assert reg.remove_stale_staging() == 2
    assert not s1.exists() and not s2.exists()
    assert [p.name for p in reg.engines_dir.iterdir()] == ["1"]
    reg.verify(1)
    assert reg.remove_stale_staging() == 0


def test_verify_flipped_byte(tmp_path):
    reg = Registry(tmp_path)
    v = publish(reg)
    p = reg.engine_dir(v) / "items.npy"
    b = bytearray(p.read_bytes())
    b[50] ^= 0x01
    p.write_bytes(bytes(b))
    with pytest.raises(EngineCorrupt, match="items.npy sha256 mismatch"):
        reg.verify(v)


def test_verify_missing_file(tmp_path):
    reg = Registry(tmp_path)
    v = publish(reg)
    (reg.engine_dir(v) / "user_tower.ep.pt2").unlink()
    with pytest.raises(EngineCorrupt, match="missing file user_tower.ep.pt2"):
        reg.verify(v)


def test_verify_truncated_file(tmp_path):
    reg = Registry(tmp_path)
    v = publish(reg)
    p = reg.engine_dir(v) / "user_tower.ep.pt2"
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(EngineCorrupt, match="is 4999 bytes, manifest says 5000"):
        reg.verify(v)


def test_verify_bad_manifest(tmp_path):
    reg = Registry(tmp_path)
    v = publish(reg)
    (reg.engine_dir(v) / MANIFEST).write_text("{not json")
    with pytest.raises(EngineCorrupt, match="unreadable manifest"):
        reg.verify(v)
    with pytest.raises(EngineCorrupt, match="not a directory"):
        reg.verify(42)  # no such version


def test_verify_version_mismatch(tmp_path):
    reg = Registry(tmp_path)
    publish(reg)
    v = publish(reg)
    (reg.engine_dir(v) / MANIFEST).write_text((reg.engine_dir(1) / MANIFEST).read_text())
    with pytest.raises(EngineCorrupt, match="manifest says version 1"):
        reg.verify(v)


def test_rollout_roundtrip(tmp_path):
    reg = Registry(tmp_path)
    assert reg.read_rollout() == RolloutState()
    st = RolloutState(stable=3, canary=5, canary_fraction=0.25, canary_started_ms=17,
                      policy=CanaryPolicy(mode="manual", min_topk_overlap=0.4),
                      refused={4: "parity 0.3 > 1e-3", 2: "corrupt"}, rolled_back={6: "p99 ratio 3.1 > 1.5"})
    st.record("canary", 5, "operator", "try it")
    reg.write_rollout(st)
    assert reg.read_rollout() == st
    assert RolloutState.from_json(st.to_json()) == st
    assert json.loads(reg.rollout_path.read_text())["refused"] == {"4": "parity 0.3 > 1e-3", "2": "corrupt"}
    # a fresh Registry (restarted server) reads the same
    assert Registry(tmp_path).read_rollout() == st
    assert RolloutState.from_json("{}") == RolloutState()


def test_rollout_history_is_bounded():
    st = RolloutState()
    for i in range(HISTORY_KEPT + 20):
        st.record("promote", i, "auto", f"r{i}")
    assert len(st.history) == HISTORY_KEPT and st.history[-1].version == HISTORY_KEPT + 19
    assert RolloutState.from_json(st.to_json()).history == st.history


@pytest.mark.parametrize("field,value,msg", [
    ("mode", "yolo", "mode must be one of auto, manual"), ("fraction", 1.0, "fraction must be in"),
    ("min_requests", 0, "min_requests must be >= 1"), ("max_p99_ratio", 0.9, "max_p99_ratio must be >= 1"),
    ("min_topk_overlap", 1.5, "min_topk_overlap must be in"), ("max_duration_s", 1.0, "max_duration_s must be >="),
])
def test_canary_policy_validation_names_the_field(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        CanaryPolicy(**{field: value})


def test_canary_policy_from_partial_fields():
    assert CanaryPolicy.from_fields({"mode": "manual", "fraction": 0.0}) == CanaryPolicy(mode="manual")
    with pytest.raises(ValueError, match="unknown policy field"):
        CanaryPolicy.from_fields({"nope": 1})


def test_rollout_write_is_atomic(tmp_path, monkeypatch):
    reg = Registry(tmp_path)
    old = RolloutState(stable=1)
    reg.write_rollout(old)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        reg.write_rollout(RolloutState(stable=2, canary=3, refused={9: "x" * 10_000}))
    monkeypatch.undo()
    assert reg.read_rollout() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines", "rollout.json"]
    for i in range(5):  # repeated rewrites: always parses, no temp files accumulate
        reg.write_rollout(RolloutState(stable=i))
        assert reg.read_rollout().stable == i
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines", "rollout.json"]


def test_manifest_json_roundtrip_preserves_fields():
    m = pb.EngineManifest(version=7, parent=6, architecture_hash="abc123", backend="aoti", item_count=2**40,
                          dim=64, max_history=50, watermark_ms=1_767_225_600_123, parity_max_abs_diff=1.5e-6,
                          build_seconds=12.25, created_ms=1_767_225_600_999, model_config_json='{"dim": 64}',
                          trained_events=2**62 + 1)
    m.files.add(path="items.npy", sha256="f" * 64, size=2**33 + 1)
    m.stream_offsets["sqlite"] = 2**53 + 1  # not exactly representable as a double
    m.eval_metrics["recall@10"] = 0.123456789
    m.golden.batch = 2
    m.golden.history_rows.extend([0, 1, 2**40])
    m.golden.user_embeddings.extend([0.5, -0.25])
    text = manifest_to_json(m)
    back = manifest_from_json(text)
    assert back == m
    assert back.trained_events == 2**62 + 1
    assert back.stream_offsets["sqlite"] == 2**53 + 1
    assert back.files[0].size == 2**33 + 1
    assert json.loads(text)["backend"] == "aoti"  # proto field names are kept


def test_published_manifest_keeps_caller_fields(tmp_path):
    reg = Registry(tmp_path)
    m = pb.EngineManifest(backend="torch", parent=4, trained_events=2**40, watermark_ms=123)
    m.stream_offsets["sqlite"] = 99
    v = reg.publish(stage(reg), m)
    back = reg.verify(v)
    assert (back.parent, back.trained_events, back.watermark_ms, dict(back.stream_offsets)) == \
        (4, 2**40, 123, {"sqlite": 99})
    assert m.version == v  # publish fills in the caller's message


def test_publish_skips_stray_numbered_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # the failing path retries 100 times; keep it fast
    reg = Registry(tmp_path)
    publish(reg)
    (reg.engine_dir(2)).mkdir()
    (reg.engine_dir(2) / "junk").write_bytes(b"x")
    v = publish(reg)
    assert v > 2 and reg.verify(v).version == v


def test_verify_rehashes_only_files_written_since(tmp_path, monkeypatch):
    import contracts.registry as registry_mod

    reg = Registry(tmp_path)
    v = publish(reg)
    hashed = []
    real = registry_mod.sha256_file
    monkeypatch.setattr(registry_mod, "sha256_file", lambda p, *a: hashed.append(p.name) or real(p, *a))
    reg.verify(v)
    n_files = len(hashed)
    reg.verify(v)
    assert len(hashed) == n_files  # unchanged files: not hashed again
    p = reg.engine_dir(v) / "items.npy"
    b = bytearray(p.read_bytes())
    b[50] ^= 0x01
    time.sleep(0.01)  # a new mtime even on coarse clocks
    p.write_bytes(bytes(b))
    with pytest.raises(EngineCorrupt, match="items.npy sha256 mismatch"):
        reg.verify(v)
    assert hashed[n_files:] == ["items.npy"]
