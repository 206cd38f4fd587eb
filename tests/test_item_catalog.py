"""The sidecar's feature item tower (trainer/item_catalog.py): rows follow the catalogue, engines carry the
item encoder, resume, compaction and short rounds keep the features with their rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from contracts.catalog import CatalogRecord, CatalogStore
from contracts.engine_format.item_features import featurize
from contracts.eventlog import SqliteEventLog
from contracts.registry import Registry
from tests.conftest import SMALL_DATA, make_trainer, stream_events
from trainer.config import TrainConfig
from trainer.data.synthetic import generate
from trainer.features import FeatureTwoTower
from trainer.loop import Trainer


def record(i: int, genre: str | None = None, price: float | None = None) -> CatalogRecord:
    return CatalogRecord(id=f"item-{i}", categorical={"genre": (genre or f"g{i % 10}",)},
                         numeric={"price": float(i) if price is None else price}, text={"title": f"thing {i}"})


@pytest.fixture
def catalog_dir(tmp_path):
    log = SqliteEventLog(tmp_path / "events.sqlite")
    log.append(list(generate(SMALL_DATA)))
    log.close()
    store = CatalogStore(tmp_path / "catalog.sqlite")
    store.upsert([record(i) for i in range(0, SMALL_DATA.n_items, 2)])  # every other item has a record
    store.close()
    return tmp_path


def feature_trainer(d, **overrides) -> Trainer:
    # gate_min_ratio 0: these tests are about the rows' features; the tiny model with id dropout needs more than
    # two epochs to beat popularity (the cold-start study measures the feature tower's quality)
    overrides = {"gate_min_ratio": 0.0, **overrides}
    return Trainer(TrainConfig.tiny_debug(item_features=True, **overrides), SqliteEventLog(d / "events.sqlite"),
                   Registry(d / "registry"), d / "trainer", catalog=CatalogStore(d / "catalog.sqlite"))


def row_cats(model: FeatureTwoTower, row: int) -> list[int]:
    return sorted(x for x in model.row_cat_NC[row].tolist() if x)


def test_rows_carry_their_catalogue_features_and_the_engine_the_encoder(catalog_dir):
    t = feature_trainer(catalog_dir)
    assert isinstance(t.model, FeatureTwoTower) and t.model.feat_cfg.numeric == ("price",)
    r = t.run_round()
    assert r.published_version == 1
    m = t.model
    n = len(t.vocab)
    assert bool((m.has_id_R[1:n + 1] == 1).all()) and float(m.has_id_R[n + 1:].sum()) == 0
    store = CatalogStore(catalog_dir / "catalog.sqlite")
    for item in ("item-4", "item-7"):
        row = t.vocab.row_of[item]
        want = featurize([store.get(item)], m.feat_cfg)
        assert row_cats(m, row) == sorted(x for x in want.cat_NC[0].tolist() if x)
    assert row_cats(m, t.vocab.row_of["item-7"]) == []  # no record: the id row alone
    engine = Registry(catalog_dir / "registry").engine_dir(1)
    assert (engine / "item_encoder.ep.pt2").is_file() and (engine / "item_encoder.json").is_file()

    # A changed record reaches its row at the next round; a resumed trainer has the same rows.
    store.upsert([record(4, genre="changed")])
    t.event_log.append(stream_events(seed=40, n_users=10, events_per_user=4))
    t.run_round()
    row = t.vocab.row_of["item-4"]
    assert row_cats(t.model, row) == sorted(x for x in featurize([record(4, genre="changed")],
                                                                 t.model.feat_cfg).cat_NC[0].tolist() if x)
    again = feature_trainer(catalog_dir)
    assert isinstance(again.model, FeatureTwoTower) and again.state.catalog_version == t.state.catalog_version
    for a, b in zip(t.model.row_buffers(), again.model.row_buffers()):
        assert torch.equal(a, b)


def test_a_feature_checkpoint_without_the_catalogue_is_refused_and_features_need_one(catalog_dir):
    feature_trainer(catalog_dir).run_round()
    with pytest.raises(ValueError, match="--item-features"):
        make_trainer(catalog_dir)
    with pytest.raises(ValueError, match="needs the catalogue"):
        Trainer(TrainConfig.tiny_debug(item_features=True), SqliteEventLog(catalog_dir / "events.sqlite"),
                Registry(catalog_dir / "registry2"), catalog_dir / "trainer2")
    with pytest.raises(ValueError, match="max_workers"):
        TrainConfig.tiny_debug(item_features=True).replace(
            elastic=TrainConfig().elastic.replace(max_workers=2))


def test_compaction_moves_the_feature_rows_with_their_ids(catalog_dir):
    from trainer.items import compact

    t = feature_trainer(catalog_dir)
    t.run_round()
    m, vocab = t.model, t.vocab
    keep_item = vocab.ids[2]  # row 3
    before = [buf[3].clone() for buf in m.row_buffers()]
    compact(m, t.opt, vocab, np.array([2]), [t.state.item_counts, t.state.item_last_seen_ms], t.state.user_seqs)
    assert vocab.row_of[keep_item] == 2
    for buf, want in zip(m.row_buffers(), before):
        assert torch.equal(buf[2], want)
    assert float(m.has_id_R[len(vocab) + 1:].sum()) == 0  # freed rows: no id, no features until reassigned


def test_short_rounds_fork_a_feature_model(catalog_dir):
    t = feature_trainer(catalog_dir, short_round_max_events=500, item_min_count=1)
    t.run_round()
    store = CatalogStore(catalog_dir / "catalog.sqlite")
    store.upsert([CatalogRecord(id="brand-new", categorical={"genre": ("g1",)}, numeric={"price": 3.0})])
    t.event_log.append([e for e in stream_events(seed=41, n_users=10, events_per_user=4)])
    from proto import livetower_v1_pb2 as pb

    t.event_log.append([pb.Event(event_id=f"bn-{i}", user_id=f"user-{i}", item_id="brand-new", action="click",
                                 weight=1.0, timestamp_ms=int(t.state.watermark_ms) + i) for i in range(5)])
    r = t.run_short_round()
    assert r.published_version == 2
    row = t.vocab.row_of["brand-new"]
    assert t.model.has_id_R[row] == 1 and row_cats(t.model, row)  # placed by the short round, with its features
    assert row_cats(t.read_ahead.fork.model, row) == row_cats(t.model, row)


def test_an_item_upserted_to_a_sidecar_engine_is_served_and_the_next_engine_takes_it_over(catalog_dir):
    """The whole path with the sidecar's own engines: trainer (--item-features) -> engine 1 -> a real server;
    UpsertItems of an item nobody has touched -> the next Recommend returns it; the trainer publishes engine 2
    and it is promoted -> the item is still served (the server replays the catalogue into the new engine)."""
    from contracts.rollout import CanaryPolicy, RolloutState
    from proto import livetower_v1_pb2 as pb
    from tests.conftest import ADMIN_TOKEN, client_for, running_server, server_config, wait_for

    t = feature_trainer(catalog_dir)
    assert t.run_round().published_version == 1
    reg = Registry(catalog_dir / "registry")
    reg.write_rollout(RolloutState(stable=1, policy=CanaryPolicy(mode="manual")))
    md = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    history = ["item-2", "item-4", "item-6"]
    item = pb.CatalogItem(id="never-seen", categorical={"genre": pb.CatalogValues(values=["g2"])},
                          numeric={"price": 4.0}, text={"title": "thing 4"})
    k = SMALL_DATA.n_items  # every item: the new one must be among them
    with running_server(server_config(catalog_dir)) as (server, port):
        c = client_for(server, port)
        wait_for(lambda: server.manager.stable is not None, 60, "engine 1")
        assert "never-seen" not in c.recommend("user-1", k, history=history).item_ids
        r = c.admin.UpsertItems(pb.UpsertItemsRequest(items=[item]), metadata=md)
        assert r.inserted == 1 and r.note == ""  # the sidecar's engine has the encoder
        assert "never-seen" in c.recommend("user-1", k, history=history).item_ids
        t.event_log.append(stream_events(seed=42, n_users=20, events_per_user=5))
        assert t.run_round().published_version == 2
        reg.update_rollout(lambda st: setattr(st, "stable", 2))
        wait_for(lambda: server.manager.stable is not None and server.manager.stable.version == 2, 60, "engine 2")
        assert "never-seen" in c.recommend("user-1", k, history=history).item_ids
        c.close()
