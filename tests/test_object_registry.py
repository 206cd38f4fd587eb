"""The registry on object storage (contracts/object_registry.py) against a real S3 endpoint process: moto's server
mode, how s3fs and obstore themselves are tested (MinIO does not install here)."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from contracts.object_registry import ObjectRegistry, open_registry, s3_store
from contracts.registry import EngineCorrupt, Registry
from tests.conftest import running_server, server_config, wait_for

BUCKET = "engines"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free port; yields its endpoint URL. Credentials are dummies moto accepts."""
    import os
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_REGION="us-east-1")
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


_prefixes = iter(range(1_000_000))


@pytest.fixture
def url(s3) -> str:
    return f"s3://{BUCKET}/reg-{next(_prefixes)}?endpoint={s3}&region=us-east-1"


def copy_engine(src: Registry, version: int, dst: Registry) -> int:
    from contracts.registry import MANIFEST, manifest_from_json

    staging = dst.staging_dir()
    shutil.copytree(src.engine_dir(version), staging, dirs_exist_ok=True)
    manifest = manifest_from_json((staging / MANIFEST).read_text())
    (staging / MANIFEST).unlink()
    return dst.publish(staging, manifest)


def test_publish_download_verify_and_refuse_a_changed_object(trained_dir, url, tmp_path):
    import obstore as obs

    local = Registry(trained_dir / "registry")
    writer = ObjectRegistry(url, tmp_path / "writer-cache")
    assert writer.versions() == [] and copy_engine(local, 1, writer) == 1
    reader = open_registry(url, tmp_path / "reader")
    assert isinstance(reader, ObjectRegistry) and reader.versions() == [1]
    m = reader.verify(1)  # downloaded into the reader's cache, every file hashed
    assert m.version == 1 and (tmp_path / "reader" / "registry-cache" / "engines" / "1" / "items.npy").is_file()
    assert open_registry(None, tmp_path / "local").root == tmp_path / "local" / "registry"
    # a file changed in the bucket: a fresh reader downloads it and refuses it
    obs.put(writer.store, "engines/1/items.npy", b"not the engine")
    with pytest.raises(EngineCorrupt, match="items.npy"):
        ObjectRegistry(url, tmp_path / "third-cache").verify(1)


def test_readers_never_see_a_half_published_engine(trained_dir, url, tmp_path):
    import obstore as obs

    reg = ObjectRegistry(url, tmp_path / "cache")
    # what a publisher killed mid-upload leaves: a claim and some files, no manifest
    obs.put(reg.store, "claims/1", b"x")
    obs.put(reg.store, "engines/1/items.npy", b"partial")
    assert reg.versions() == []
    assert copy_engine(Registry(trained_dir / "registry"), 1, reg) == 2  # the dead claim is not reused
    assert reg.versions() == [2] and reg.verify(2).version == 2


def test_two_publishers_at_once_never_share_a_version(trained_dir, url, tmp_path):
    local = Registry(trained_dir / "registry")
    got: list[int] = []

    def publisher(i: int) -> None:
        reg = ObjectRegistry(url, tmp_path / f"cache-{i}")
        for _ in range(4):
            got.append(copy_engine(local, 1, reg))

    threads = [threading.Thread(target=publisher, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(got) == list(range(1, 13))  # 12 publishes, 12 distinct versions
    reader = ObjectRegistry(url, tmp_path / "reader")
    assert reader.versions() == list(range(1, 13))
    for v in reader.versions():
        assert reader.verify(v).version == v  # none torn


def test_rollout_updates_are_compare_and_swap(url, tmp_path):
    regs = [ObjectRegistry(url, tmp_path / f"c{i}") for i in range(3)]

    def bump(reg: ObjectRegistry) -> None:
        for n in range(10):
            reg.update_rollout(lambda st: st.record("policy", 0, "test", f"{id(reg)}-{n}"))

    threads = [threading.Thread(target=bump, args=(r,)) for r in regs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    history = regs[0].read_rollout().history
    assert len(history) == 30 and len({e.reason for e in history}) == 30  # no update lost
    salts = {r.canary_salt() for r in regs}
    assert len(salts) == 1  # made once, shared


def test_garbage_collection_deletes_the_objects(trained_dir, url, tmp_path):
    reg = ObjectRegistry(url, tmp_path / "cache")
    local = Registry(trained_dir / "registry")
    for _ in range(4):
        copy_engine(local, 1, reg)
    assert reg.collect_garbage(keep_newest=2) == [1, 2]
    assert ObjectRegistry(url, tmp_path / "other").versions() == [3, 4]
    assert not any(k.startswith(("engines/1/", "engines/2/")) for k in reg._keys("engines/"))


def test_bad_urls_say_what_is_wrong():
    for bad, words in (("s3://", "expected s3://BUCKET"), ("s3://b/p?colour=red", "unknown option")):
        with pytest.raises(ValueError, match=words):
            s3_store(bad)


def test_a_server_serves_from_the_bucket_and_keeps_serving_when_it_is_unreachable(trained_dir, url, tmp_path):
    """serve --registry s3://...: loads the engine from the bucket, takes a newly published one through the
    canary, and keeps answering from its cached engines while the bucket is unreachable."""
    from contracts.client import Client
    from contracts.rollout import CanaryPolicy

    bucket = ObjectRegistry(url, tmp_path / "publisher-cache")
    local = Registry(trained_dir / "registry")
    copy_engine(local, 1, bucket)
    data = tmp_path / "replica"
    data.mkdir()
    # latency ratios off: a test process's GIL makes a new engine's first requests slow (not what this tests)
    policy = CanaryPolicy(min_duration_s=0.2, max_duration_s=1.0, min_requests=5, shadow_samples=5, shadow_qps=200.0,
                          max_p99_ratio=1000.0)
    with running_server(server_config(data, registry=url, policy=policy)) as (server, port):
        wait_for(lambda: server.manager.stable is not None, 60, "engine 1 from the bucket")
        client = Client(f"127.0.0.1:{port}")
        assert client.recommend("user-1", k=5, history=["item-1"]).engine_version == 1
        assert (data / "registry-cache" / "engines" / "1").is_dir() and not (data / "registry").exists()
        copy_engine(local, 1, bucket)  # engine 2: canaried, then promoted, through rollout.json in the bucket

        def traffic_until_promoted() -> bool:
            for u in range(20):
                client.recommend(f"user-{u}", k=5, history=["item-1"])
            return bucket.read_rollout().stable == 2

        wait_for(traffic_until_promoted, 60, "engine 2 promoted", interval_s=0.1)
        assert [e.action for e in bucket.read_rollout().history][-2:] == ["canary", "promote"]
        server.manager.registry.store = s3_store("s3://engines/x?endpoint=http://127.0.0.1:9&region=us-east-1")
        time.sleep(1.0)  # ten failed polls
        for u in range(20):  # the bucket is gone (nothing listens on port 9): answers continue from the cache
            assert client.recommend(f"user-{u}", k=5, history=["item-1"]).engine_version == 2
        client.close()
