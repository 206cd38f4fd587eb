"""User features beside the history (issue 23 item 2): the encoder and its late fusion, training through it, the
engine's exported user encoder (parity at build and load, the server's fusion equal to the model's), the
sidecar's user rows from the catalogue, and the ml-100k study at its debug size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from contracts.catalog import CatalogRecord, CatalogStore
from contracts.engine_format.item_encoder import fuse_user_vectors
from contracts.eventlog import SqliteEventLog
from contracts.engine_format.user_vectors import read_user_vectors
from contracts.registry import USER_ENCODER_FILE, USER_VECTORS_FILE, Registry
from server.engine.catalog_sync import CatalogSync
from server.engine.engine import Engine, RecommendQuery
from server.engine.user_vectors import UserVectors
from tests.conftest import SMALL_DATA, stream_events
from trainer.config import TrainConfig
from trainer.data.synthetic import generate
from trainer.export.build import BuildInfo, build_engine
from trainer.export.compile import CompileOptions
from trainer.loop import Trainer
from trainer.model import TwoTower
from trainer.model_config import ModelConfig
from trainer.training import WindowLoss, window_loss
from trainer.user_features import attach_user_features, user_feature_config, window_user_rows

OCCUPATIONS = ("writer", "engineer", "student", "artist", "doctor")
ML100K = Path(__file__).resolve().parents[1] / "../shared/data/ml-100k"


def user_record(i: int) -> CatalogRecord:
    return CatalogRecord(id=f"user-{i}", kind="user", numeric={"age": 18.0 + i % 50},
                         categorical={"occupation": (OCCUPATIONS[i % 5],), "gender": ("MF"[i % 2],)})


def user_model(n_users: int = 30, n_items: int = 40, seed: int = 0) -> TwoTower:
    torch.manual_seed(seed)
    cfg = ModelConfig.tiny_debug()
    model = TwoTower(cfg, n_items + 1)
    records = [user_record(i) for i in range(n_users)]
    attach_user_features(model, user_feature_config(records, cfg.out_dim, cat_buckets=64, text_buckets=128), records)
    with torch.no_grad():  # a trained-looking encoder: the fresh one's output is tiny (init std 0.02)
        model.user_features.encoder.mlp_out.weight.normal_(std=0.5)
    return model.eval()


def test_fusion_is_the_history_vector_without_a_record_and_normalised_with_one():
    model = user_model()
    hist_BT = torch.randint(1, 41, (4, model.cfg.max_history))
    alone_BD = model.encode_users(hist_BT)
    none_BD = model.encode_users(hist_BT, torch.zeros(4, dtype=torch.long))  # row 0: no record
    torch.testing.assert_close(none_BD, alone_BD)
    fused_BD = model.encode_users(hist_BT, torch.tensor([1, 2, 3, 0]))
    torch.testing.assert_close(fused_BD.norm(dim=-1), torch.ones(4))
    assert (fused_BD[:3] - alone_BD[:3]).abs().max() > 1e-2  # the record moves the vector
    torch.testing.assert_close(fused_BD[3], alone_BD[3])
    # the same user's vector over every position (training) = encode_users' at the last one
    states_BTD = model.user_states(hist_BT, torch.tensor([1, 2, 3, 0]))
    torch.testing.assert_close(states_BTD[:, -1], fused_BD, atol=1e-5, rtol=1e-5)


def test_training_reaches_the_user_encoder():
    model = user_model().train()
    cfg = TrainConfig.tiny_debug(precision="fp32")
    loss_fn = window_loss(WindowLoss(model), cfg, torch.full((41,), 1 / 40), 40)
    T = model.cfg.max_history
    inp_BT, tgt_BT = torch.randint(1, 41, (8, T)), torch.randint(1, 41, (8, T))
    m_BT = torch.ones(8, T, dtype=torch.bool)
    loss = loss_fn(inp_BT, tgt_BT, m_BT, torch.Generator().manual_seed(0), torch.arange(1, 9))
    loss.backward()
    g = model.user_features.encoder.cat_bag.weight.grad
    assert g is not None and g.abs().sum() > 0
    model.zero_grad()
    loss_fn(inp_BT, tgt_BT, m_BT, torch.Generator().manual_seed(0), None).backward()  # no users: untouched
    assert model.user_features.encoder.cat_bag.weight.grad is None or \
        model.user_features.encoder.cat_bag.weight.grad.abs().sum() == 0


def publish_user_engine(model: TwoTower, reg: Registry, n: int = 40) -> int:
    return build_engine(model, [f"item-{i}" for i in range(n)], np.arange(n + 1, dtype=np.float64), reg,
                        BuildInfo(parent=0, stream_offsets={}, watermark_ms=0, trained_events=0, eval_metrics={}),
                        CompileOptions(backend="torch"), parity_tolerance=1e-4, progress=lambda line: None).version


def test_the_engine_carries_the_user_encoder_and_fuses_like_the_model(tmp_path):
    model, n = user_model(), 40
    reg = Registry(tmp_path / "reg")
    v = publish_user_engine(model, reg, n)
    m = reg.verify(v)
    assert USER_ENCODER_FILE in {f.path for f in m.files}
    engine = Engine.load(reg.engine_dir(v), m)
    assert engine.user_encoder is not None and engine.golden_max_abs_diff() <= 1e-4
    # The catalogue's user records reach the engine through the same sync as items.
    store = CatalogStore(tmp_path / "catalog.sqlite")
    store.upsert([user_record(i) for i in range(5)])
    CatalogSync(store).catch_up([engine])
    assert sorted(engine.users.vecs) == [f"user-{i}" for i in range(5)]
    history = ["item-3", "item-7", "item-11"]
    rows_1T = torch.from_numpy(engine.history_rows(history)[None, :])
    with torch.no_grad():
        want_D = model.encode_users(rows_1T, torch.tensor([3]))[0]  # table row 3 = user-2
        alone_D = model.encode_users(rows_1T)[0]
    got = engine.score(history, [f"item-{i}" for i in range(n)], "user-2")[0]
    torch.testing.assert_close(torch.tensor(got), model.encode_items(torch.arange(1, n + 1)).detach() @ want_D,
                               atol=1e-4, rtol=1e-4)
    unknown_user = engine.score(history, ["item-0"], "user-99")[0][0]
    assert unknown_user == pytest.approx(float(model.encode_items(torch.tensor([1]))[0].detach() @ alone_D), abs=1e-4)
    # Recommend: a batch with and without a record, each fused alone.
    a, b = engine.recommend_batch([RecommendQuery(history, 5, True, "user-2"), RecommendQuery(history, 5, True)])
    assert a.scores[0] == pytest.approx(max(s for i, s in enumerate(got) if f"item-{i}" not in history), abs=1e-4)
    assert b.item_ids == engine.recommend(history, 5, True).item_ids
    # A deleted record: the user's vector is the history's again.
    store.delete(["user-2"], kind="user")
    CatalogSync(store).catch_up([engine])
    assert "user-2" not in engine.users.vecs
    np.testing.assert_allclose(fuse_user_vectors(alone_D.numpy()[None], np.zeros((1, alone_D.numel()), np.float32)),
                               alone_D.numpy()[None], atol=1e-6)


def test_engines_with_the_same_user_encoder_share_one_table_encoded_once(tmp_path):
    reg = Registry(tmp_path / "reg")
    model = user_model()
    a_v, b_v = publish_user_engine(model, reg), publish_user_engine(model, reg)  # a refit's: the same encoder
    with torch.no_grad():
        model.user_features.encoder.mlp_in.bias.add_(0.1)
    c_v = publish_user_engine(model, reg)  # a trained encoder: its own table
    a, b, c = (Engine.load(reg.engine_dir(v), reg.verify(v)) for v in (a_v, b_v, c_v))
    store = CatalogStore(tmp_path / "catalog.sqlite")
    store.upsert([user_record(i) for i in range(6)])
    sync = CatalogSync(store)
    sync.catch_up([a])
    encoded = []
    for e in (b, c):
        sync._lock.acquire()
        try:
            e.users = sync.user_tables.table_for(e.user_encoder)
            encoded.append(e.apply_user_catalog([(ch.version, ch.id, ch.record) for ch in store.changes_since(0)],
                                                store.version()))
        finally:
            sync._lock.release()
    assert a.users is b.users and a.users is not c.users
    assert encoded == [0, 6]  # b replays nothing: a's table is caught up; c encodes its own
    store.upsert([user_record(9)])
    sync.catch_up([a, b, c])
    assert "user-9" in b.users.vecs and "user-9" in c.users.vecs
    assert not np.allclose(a.users.vecs["user-9"], c.users.vecs["user-9"])


def test_the_build_ships_users_vectors_and_a_server_encodes_only_records_changed_since(tmp_path):
    reg, model = Registry(tmp_path / "reg"), user_model()
    built = CatalogStore(tmp_path / "trainer" / "catalog.sqlite")  # the trainer's store
    built.upsert([user_record(i) for i in range(20)])
    info = BuildInfo(parent=0, stream_offsets={}, watermark_ms=0, trained_events=0, eval_metrics={})
    build = dict(parity_tolerance=1e-4, user_catalog=built, progress=lambda line: None)
    v1 = build_engine(model, [f"item-{i}" for i in range(40)], np.arange(41, dtype=np.float64), reg, info,
                      CompileOptions(backend="torch"), **build).version
    v2 = build_engine(model, [f"item-{i}" for i in range(40)], np.arange(41, dtype=np.float64), reg,
                      BuildInfo(parent=v1, stream_offsets={}, watermark_ms=0, trained_events=0, eval_metrics={}),
                      CompileOptions(backend="torch"), **build).version
    assert USER_VECTORS_FILE in {f.path for f in reg.verify(v1).files}
    assert USER_VECTORS_FILE not in {f.path for f in reg.verify(v2).files}  # the parent's encoder: servers share it
    # The server's own store went on: user-3 changed, user-5 deleted, user-25 new since the build.
    served = CatalogStore(tmp_path / "server" / "catalog.sqlite")
    served.upsert([user_record(i) for i in range(20)])
    served.upsert([CatalogRecord(id="user-3", kind="user", numeric={"age": 77.0}), user_record(25)])
    served.delete(["user-5"], kind="user")
    engine = Engine.load(reg.engine_dir(v1), reg.verify(v1))
    encoded: list[int] = []
    program = engine.user_encoder._module
    engine.user_encoder._module = lambda *xs: (encoded.append(int(xs[0].shape[0])), program(*xs))[1]
    CatalogSync(served).catch_up([engine])
    assert encoded == [8, 2]  # a sample of 8 shipped vectors re-checked, then user-3 and user-25 only
    reference = Engine.load(reg.engine_dir(v1), reg.verify(v1))
    reference.shipped_users = None  # as an engine that shipped none: every record encoded
    CatalogSync(served).catch_up([reference])
    assert engine.users.vecs.keys() == reference.users.vecs.keys() and "user-5" not in engine.users.vecs
    for uid, want in reference.users.vecs.items():
        np.testing.assert_allclose(engine.users.vecs[uid], want, atol=1e-5, err_msg=uid)
    # Vectors that do not match what the engine's encoder computes are refused, and the table stays as it was.
    shipped = read_user_vectors(reg.engine_dir(v1) / USER_VECTORS_FILE, engine.manifest.dim)
    table = UserVectors(reference.user_encoder)
    version, rows = served.live_bodies("user")
    with pytest.raises(ValueError, match="differ from the shipped vectors"):
        table.seed(shipped._replace(vecs_ND=shipped.vecs_ND + 0.01), version, rows)
    with pytest.raises(ValueError, match="another user encoder"):
        table.seed(shipped._replace(encoder_key="other"), version, rows)
    assert not table.vecs and table.version == 0
    assert table.seed(shipped, version, rows) == (18, 2)


def test_an_engine_with_its_parents_user_encoder_points_to_the_shipped_vectors(tmp_path):
    """A short round's refit keeps its full round's encoder and ships no file of its own: its manifest names the
    engine that did, a server cold-starting on it seeds from that file, and garbage collection keeps that engine."""
    from server.engine.loading import load_from_registry
    from server.engine.manager import EngineManagerConfig

    reg, model = Registry(tmp_path / "reg"), user_model()
    store = CatalogStore(tmp_path / "catalog.sqlite")
    store.upsert([user_record(i) for i in range(20)])
    versions: list[int] = []
    for parent in (0, 1, 2):
        info = BuildInfo(parent=parent, stream_offsets={}, watermark_ms=0, trained_events=0, eval_metrics={})
        versions.append(build_engine(model, [f"item-{i}" for i in range(40)], np.arange(41, dtype=np.float64), reg,
                                     info, CompileOptions(backend="torch"), parity_tolerance=1e-4,
                                     user_catalog=store, progress=lambda line: None).version)
    assert versions == [1, 2, 3]
    assert [int(reg.read_manifest(v).user_vectors_version) for v in versions] == [0, 1, 1]
    store.upsert([CatalogRecord(id="user-3", kind="user", numeric={"age": 77.0})])  # changed since the builds
    config = EngineManagerConfig(warmup_calls=1, verify_pause_s=0.0)
    engine = load_from_registry(reg, 3, config)
    assert engine.shipped_users == reg.engine_dir(1) / USER_VECTORS_FILE
    encoded: list[int] = []
    program = engine.user_encoder._module
    engine.user_encoder._module = lambda *xs: (encoded.append(int(xs[0].shape[0])), program(*xs))[1]
    CatalogSync(store).catch_up([engine])
    assert encoded == [8, 1] and len(engine.users.vecs) == 20  # the sample, then user-3 only
    assert reg.collect_garbage(keep_newest=1) == [2]  # 1 stays: engine 3's users' vectors are its file
    # A source that is gone costs only the encoding: the engine still loads, and every user is encoded.
    import shutil
    shutil.rmtree(reg.engine_dir(1))
    assert load_from_registry(reg, 3, config).shipped_users is None


def test_short_round_forks_keep_the_base_user_encoder():
    from trainer import ema
    from trainer.export.item_encoder import weights_sha256
    from trainer.examples import stack_windows
    from trainer.short_rounds import Fork
    from trainer.training import train_windows

    model, cfg = user_model().train(), TrainConfig.tiny_debug(precision="fp32")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    fork = Fork.of(model, opt, cfg, 1, 0, 0, 40)
    T = model.cfg.max_history
    windows = [(np.r_[np.zeros(T - 3, np.int64), [1, 2, 3]], np.r_[np.zeros(T - 3, np.int64), [2, 3, 4]],
                np.r_[np.zeros(T - 3, bool), [True] * 3])] * 4
    train_windows(fork.model, fork.opt, *stack_windows(windows), item_prob_R=torch.full((41,), 1 / 40), n_items=40,
                  cfg=cfg, epochs=2, generator=torch.Generator().manual_seed(0), users_W=np.array([1, 2, 3, 4]))
    served = fork.served()
    enc_cfg = model.user_features.cfg
    base = ema.averaged(model, opt)
    assert weights_sha256(served.user_features.encoder, enc_cfg) == weights_sha256(base.user_features.encoder, enc_cfg)
    assert not torch.equal(served.item_embedding.weight, base.item_embedding.weight)  # the rest trained


def test_upsert_and_delete_users_over_grpc(tmp_path):
    import grpc

    from contracts.rollout import CanaryPolicy, RolloutState
    from proto import livetower_v1_pb2 as pb
    from tests.conftest import ADMIN_TOKEN, client_for, running_server, server_config, wait_for

    reg = Registry(tmp_path / "registry")
    v = publish_user_engine(user_model(), reg)
    reg.write_rollout(RolloutState(stable=v, policy=CanaryPolicy(mode="manual")))
    md = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    history = ["item-1", "item-5"]
    user = pb.CatalogItem(id="user-3", categorical={"occupation": pb.CatalogValues(values=["artist"])},
                          numeric={"age": 33.0})
    with running_server(server_config(tmp_path)) as (server, port):
        c = client_for(server, port)
        wait_for(lambda: server.manager.stable is not None, 30, "the engine")
        alone = list(c.recommend("user-3", 10, history=history).scores)
        r = c.admin.UpsertUsers(pb.UpsertUsersRequest(users=[user]), metadata=md)
        assert (r.inserted, list(r.serving_engines), r.note) == (1, [v], "")
        fused = list(c.recommend("user-3", 10, history=history).scores)
        assert max(abs(a - b) for a, b in zip(alone, fused)) > 1e-3  # the next request reads the record
        assert list(c.recommend("user-4", 10, history=history).scores) == pytest.approx(alone, abs=1e-5)
        with pytest.raises(grpc.RpcError) as bad:
            c.admin.UpsertUsers(pb.UpsertUsersRequest(users=[pb.CatalogItem(id="u", numeric={"age": float("nan")})]),
                                metadata=md)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "users[id='u']" in bad.value.details()
        with pytest.raises(grpc.RpcError) as empty:
            c.admin.DeleteUsers(pb.DeleteUsersRequest(), metadata=md)
        assert "user_ids: 1..10000" in empty.value.details()
        with pytest.raises(grpc.RpcError) as anon:
            c.admin.UpsertUsers(pb.UpsertUsersRequest(users=[user]))
        assert anon.value.code() == grpc.StatusCode.UNAUTHENTICATED
        _kserve_fuses_the_user_like_the_native_api(port, history, fused, alone)
        r = c.admin.DeleteUsers(pb.DeleteUsersRequest(user_ids=["user-3"]), metadata=md)
        assert r.deleted == 1
        assert list(c.recommend("user-3", 10, history=history).scores) == pytest.approx(alone, abs=1e-5)
        c.close()
    store = CatalogStore(tmp_path / "catalog.sqlite")  # durable, and users only: no item was written
    assert store.count("item") == 0 and store.get("user-3", "user") is None and store.version() == 2


def _kserve_fuses_the_user_like_the_native_api(port: int, history: list[str], fused: list[float],
                                               alone: list[float]) -> None:
    """KServe v2: USER_ID on `recommend` and `user_tower` gives what the native API's user_id gives."""
    import grpc

    from proto import grpc_service_pb2 as kpb
    from proto import grpc_service_pb2_grpc as kpb_grpc

    T = kpb.ModelInferRequest.InferInputTensor

    def tensor(name: str, shape: list[int], values: list[str]) -> T:
        return T(name=name, datatype="BYTES", shape=shape,
                 contents=kpb.InferTensorContents(bytes_contents=[v.encode() for v in values]))

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = kpb_grpc.GRPCInferenceServiceStub(ch)

        def recommend(*extra: T) -> list[float]:
            resp = stub.ModelInfer(kpb.ModelInferRequest(model_name="recommend", inputs=[
                tensor("HISTORY", [len(history)], history),
                T(name="K", datatype="INT32", shape=[1], contents=kpb.InferTensorContents(int_contents=[10])),
                *extra]))
            return list(resp.outputs[1].contents.fp32_contents)

        assert recommend(tensor("USER_ID", [1], ["user-3"])) == pytest.approx(fused, abs=1e-5)
        assert recommend() == pytest.approx(alone, abs=1e-5)
        rows = [history, ["", "item-2"], ["", "no-such-item"]]  # the last row: no known item
        resp = stub.ModelInfer(kpb.ModelInferRequest(model_name="user_tower", inputs=[
            tensor("HISTORY", [3, 2], [x for row in rows for x in row]),
            tensor("USER_ID", [3, 1], ["user-3", "user-4", "user-3"])]))
        u_BD = np.asarray(resp.outputs[0].contents.fp32_contents, np.float32).reshape(3, -1)
        resp = stub.ModelInfer(kpb.ModelInferRequest(model_name="user_tower", inputs=[
            tensor("HISTORY", [3, 2], [x for row in rows for x in row])]))
        plain_BD = np.asarray(resp.outputs[0].contents.fp32_contents, np.float32).reshape(3, -1)
        assert np.abs(u_BD[0] - plain_BD[0]).max() > 1e-3  # user-3 has a record: fused
        np.testing.assert_allclose(u_BD[1:], plain_BD[1:], atol=1e-6)  # no record; no known item: the zero row
        assert not u_BD[2].any()
        with pytest.raises(grpc.RpcError) as bad:
            stub.ModelInfer(kpb.ModelInferRequest(model_name="user_tower", inputs=[
                tensor("HISTORY", [3, 2], [x for row in rows for x in row]), tensor("USER_ID", [2, 1], ["a", "b"])]))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'USER_ID' has 2 ids; it must have one per HISTORY row (3)" in bad.value.details()


def test_the_sidecar_trains_user_features_from_the_catalogue(tmp_path):
    log = SqliteEventLog(tmp_path / "events.sqlite")
    log.append(list(generate(SMALL_DATA)))
    log.close()
    store = CatalogStore(tmp_path / "catalog.sqlite")
    store.upsert([user_record(i) for i in range(0, SMALL_DATA.n_users, 2)])  # every other user has a record

    def trainer() -> Trainer:
        return Trainer(TrainConfig.tiny_debug(user_features=True, gate_min_ratio=0.0),
                       SqliteEventLog(tmp_path / "events.sqlite"), Registry(tmp_path / "registry"),
                       tmp_path / "trainer", catalog=CatalogStore(tmp_path / "catalog.sqlite"))

    t = trainer()
    assert t.model.user_features is not None and t.model.user_features.cfg.numeric == ("age",)
    before = t.model.user_features.encoder.cat_bag.weight.detach().clone()
    assert t.run_round().published_version == 1
    assert not torch.equal(before, t.model.user_features.encoder.cat_bag.weight)  # the encoder trained
    assert (Registry(tmp_path / "registry").engine_dir(1) / USER_ENCODER_FILE).is_file()
    rows = window_user_rows(t.model, ["user-0", "user-1", "user-0"], store)
    assert rows.tolist() == [1, 2, 1] and t.model.user_features.num_rows == 3
    assert t.model.user_features.row_cat_NC[2].sum() == 0  # user-1 has no record: no features
    # A resumed trainer has the same encoder, and trains on.
    again = trainer()
    assert again.state.user_feature_config == t.state.user_feature_config
    for (k, a), b in zip(t.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), k
    again.event_log.append(stream_events(seed=41, n_users=10, events_per_user=4))
    assert again.run_round() is not None


def test_user_features_need_the_catalogue_and_one_worker(tmp_path):
    from trainer.config import ElasticConfig

    with pytest.raises(ValueError, match="user_features needs the catalogue"):
        Trainer(TrainConfig.tiny_debug(user_features=True), SqliteEventLog(tmp_path / "e.sqlite"),
                Registry(tmp_path / "r"), tmp_path / "t")
    with pytest.raises(ValueError, match="user_features trains in the trainer process only"):
        TrainConfig.tiny_debug(user_features=True, elastic=ElasticConfig(max_workers=2))


@pytest.mark.skipif(not (ML100K / "u.user").is_file(), reason="ml-100k not in ../shared/data")
def test_user_feature_study_debug_size(tmp_path, capsys):
    from trainer.studies.user_features import main

    out = tmp_path / "uf.json"
    assert main(["--debug", "--data", str(ML100K), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    for part, evals in (("warm", ("val", "test")), ("new", ("new_users", "kept_users_test"))):
        for name in ("history_only", "user_features"):
            for ev in evals:
                m = r[part]["metrics"][name][ev]["all"]
                assert 0.0 <= m["ndcg@10"] <= m["recall@10"] <= m["recall@20"] <= 1.0
    assert r["new"]["split"]["held_out_users"] == 30 and r["new"]["split"]["new_user_targets"] > 0
    assert "warm / test / all" in capsys.readouterr().out

