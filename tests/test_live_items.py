"""New items served by their features without a new engine (issue 23 item 3, the engine side): an engine built
from a feature model carries its item feature encoder (parity-checked at build and load); upserted items are
encoded and retrieved beside the build-time items, deleted ones are no longer served."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from contracts.catalog import CatalogRecord
from contracts.engine_format.item_features import FeatureConfig, featurize
from contracts.registry import ITEM_ENCODER_FILE, Registry
from server.engine.engine import Engine
from server.engine.live_items import LiveItems
from trainer.export.build import BuildInfo, build_engine
from trainer.export.compile import CompileOptions
from trainer.features import FeatureTwoTower
from trainer.model_config import ModelConfig

GENRES = ("Comedy", "Drama", "Horror", "Action")


def record(i: int) -> CatalogRecord:
    return CatalogRecord(id=f"item-{i}", categorical={"genre": (GENRES[i % 4],)}, text={"title": f"film number {i}"},
                         numeric={"year": 1980.0 + i % 30})


def publish_feature_engine(reg: Registry, n: int = 40) -> int:
    mcfg = ModelConfig.tiny_debug()
    fcfg = FeatureConfig(dim=mcfg.dim, cat_buckets=64, text_buckets=256, numeric=("year",))
    torch.manual_seed(0)
    model = FeatureTwoTower(mcfg, n + 1, fcfg, featurize([None, *map(record, range(n))], fcfg), torch.ones(n + 1))
    return build_engine(model, [f"item-{i}" for i in range(n)], np.arange(n + 1, dtype=np.float64), reg,
                        BuildInfo(parent=0, stream_offsets={}, watermark_ms=0, trained_events=0, eval_metrics={}),
                        CompileOptions(backend="torch"), parity_tolerance=1e-4, progress=lambda line: None).version


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    reg = Registry(tmp_path_factory.mktemp("reg"))
    m = reg.verify(publish_feature_engine(reg))
    assert ITEM_ENCODER_FILE in {f.path for f in m.files}
    e = Engine.load(reg.engine_dir(m.version), m)
    assert e.encoder is not None and e.golden_max_abs_diff() <= 1e-4
    return e


def brute_force(e: Engine, history: list[str], k: int) -> list[str]:
    """The top k over every served item (build-time less deleted, plus live), history excluded."""
    u_D = torch.from_numpy(e.runner(e.history_rows(history)[None, :]))[0]
    live = e.live.current
    scored = [(float(e.items_ND[i] @ u_D), e.vocab.ids[i]) for i in range(e.n_items) if i not in live.deleted]
    scored += [(float(live.vecs_MD[r] @ u_D), x) for r, x in enumerate(live.ids)]
    return [x for _, x in sorted((p for p in scored if p[1] not in history), key=lambda p: -p[0])[:k]]


def test_upserted_items_are_retrieved_and_deleted_ones_are_not(engine):
    history = ["item-1", "item-5", "item-9"]
    new = [record(100 + i) for i in range(6)]
    assert engine.apply_catalog([(r.id, r) for r in new]) == 6
    # the new items' vectors are the encoder's: the same as the build's feature-only vectors for these records
    got = engine.recommend(history, k=50, exclude_seen=True)
    assert got.item_ids == brute_force(engine, history, 50)
    assert {r.id for r in new} <= set(got.item_ids)  # k covers every item: all six are served
    top = engine.recommend(history, k=5, exclude_seen=True)
    assert top.item_ids == brute_force(engine, history, 5) and top.scores == sorted(top.scores, reverse=True)
    # delete a live item and a build-time item: neither comes back, and Score says they are unknown
    engine.apply_catalog([("item-101", None), ("item-3", None), ("no-such-item", None)])
    got = engine.recommend(history, k=60, exclude_seen=True)
    assert "item-101" not in got.item_ids and "item-3" not in got.item_ids
    assert got.item_ids == brute_force(engine, history, 60)
    scores, unknown, source = engine.score(history, ["item-100", "item-3", "item-7"])
    assert unknown == ["item-3"] and np.isnan(scores[1]) and source == "model"
    u_D = torch.from_numpy(engine.runner(engine.history_rows(history)[None, :]))[0]
    assert scores[0] == pytest.approx(float(torch.from_numpy(engine.encoder([new[0]])[0]) @ u_D), abs=1e-5)
    # a build-time id upserted again (after its delete) is served from its trained row again, once
    engine.apply_catalog([("item-3", record(3))])
    assert "item-3" not in engine.live.current.ids and not engine.live.current.deleted
    assert engine.recommend(history, k=60, exclude_seen=True).item_ids.count("item-3") == 1


def test_an_id_only_engine_serves_deletions_but_not_new_items(trained_dir):
    reg = Registry(trained_dir / "registry")
    e = Engine.load(reg.engine_dir(1), reg.verify(1))
    assert e.encoder is None
    known = e.vocab.ids[0]
    assert e.apply_catalog([("brand-new", record(1)), (known, None)]) == 0
    assert known not in e.recommend(list(e.vocab.ids[1:4]), k=e.n_items, exclude_seen=False).item_ids


def test_live_items_are_bounded_and_checked():
    live = LiveItems(4, lambda x: None, max_items=3)
    live.upsert(["a", "b"], np.eye(4, dtype=np.float32)[:2])
    with pytest.raises(ValueError, match="limit is 3"):
        live.upsert(["c", "d"], np.eye(4, dtype=np.float32)[2:])
    assert live.current.ids == ("a", "b")  # a refused change changes nothing
    with pytest.raises(ValueError, match="distinct"):
        live.upsert(["c", "c"], np.eye(4, dtype=np.float32)[:2])
    live.upsert(["a"], np.eye(4, dtype=np.float32)[3:])  # replace: still two
    assert live.current.ids == ("b", "a") and live.current.vecs_MD[1, 3] == 1.0


def test_upsert_and_delete_items_over_grpc_durably(tmp_path):
    import grpc

    from contracts.rollout import CanaryPolicy, RolloutState
    from proto import livetower_v1_pb2 as pb
    from tests.conftest import ADMIN_TOKEN, client_for, running_server, server_config, wait_for

    reg = Registry(tmp_path / "registry")
    v = publish_feature_engine(reg)
    reg.write_rollout(RolloutState(stable=v, policy=CanaryPolicy(mode="manual")))
    md = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    history = ["item-1", "item-5"]
    item = pb.CatalogItem(id="new-film", categorical={"genre": pb.CatalogValues(values=["Horror"])},
                          numeric={"year": 2001.0}, text={"title": "a new film"})
    with running_server(server_config(tmp_path)) as (server, port):
        c = client_for(server, port)
        wait_for(lambda: server.manager.stable is not None, 30, "the feature engine")
        assert "new-film" not in c.recommend("u1", 60, history=history).item_ids
        r = c.admin.UpsertItems(pb.UpsertItemsRequest(items=[item]), metadata=md)
        assert (r.inserted, r.catalog_version, list(r.serving_engines), r.note) == (1, 1, [v], "")
        assert "new-film" in c.recommend("u1", 60, history=history).item_ids  # the next request
        with pytest.raises(grpc.RpcError) as bad:
            c.admin.UpsertItems(pb.UpsertItemsRequest(items=[pb.CatalogItem(id="x", numeric={"bad name!": 1.0})]),
                                metadata=md)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "feature name" in bad.value.details()
        with pytest.raises(grpc.RpcError) as empty:
            c.admin.DeleteItems(pb.DeleteItemsRequest(), metadata=md)
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "item_ids: 1..10000" in empty.value.details()
        with pytest.raises(grpc.RpcError) as long_id:
            c.admin.DeleteItems(pb.DeleteItemsRequest(item_ids=["ok", "x" * 300]), metadata=md)
        assert long_id.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "item_ids[1]" in long_id.value.details()
        with pytest.raises(grpc.RpcError) as anon:  # the admin credential is required
            c.admin.UpsertItems(pb.UpsertItemsRequest(items=[item]))
        assert anon.value.code() == grpc.StatusCode.UNAUTHENTICATED
        c.close()
    with running_server(server_config(tmp_path)) as (server, port):  # restarted: the catalogue is replayed
        c = client_for(server, port)
        wait_for(lambda: server.manager.stable is not None, 30, "the feature engine")
        assert "new-film" in c.recommend("u1", 60, history=history).item_ids
        r = c.admin.DeleteItems(pb.DeleteItemsRequest(item_ids=["new-film", "item-2"]), metadata=md)
        assert r.deleted == 1 and r.catalog_version == 3  # item-2 was never in the catalogue: a tombstone
        ids = c.recommend("u1", 60, history=history).item_ids
        assert "new-film" not in ids and "item-2" not in ids  # a build-time item is deleted too
        c.close()
