"""KServe v2 / Triton gRPC protocol (inference.GRPCInferenceService) with the stock tritonclient as client."""

from __future__ import annotations

import asyncio
import shutil

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool

from proto import grpc_service_pb2 as kpb
from proto import model_config_pb2 as mc
from server.kserve import KSERVE, MODELS, encode_bytes_tensor
from tests.conftest import running_server, server_config, wait_for


try:
    import tritonclient  # noqa: F401 - is it installed at all?
except ImportError:  # pragma: no cover
    pytest.skip("tritonclient is not installed (pip install -e '.[test]')", allow_module_level=True)

# tritonclient's generated stubs declare the same `inference.*` protobuf symbols as ours, and the default
# descriptor pool refuses a second definition ("duplicate symbol", kserve/kserve#3099,
# triton-inference-server/client#730). Load tritonclient's into a private pool: only field numbers
# matter on the wire.
_default_pool = descriptor_pool.Default
_private_pool = descriptor_pool.DescriptorPool()
descriptor_pool.Default = lambda: _private_pool
try:
    import tritonclient.grpc as tc
    import tritonclient.grpc.aio as tc_aio
    from tritonclient.grpc import model_config_pb2 as tc_mc
    from tritonclient.grpc import service_pb2 as tc_pb
    from tritonclient.grpc import service_pb2_grpc as tc_pb_grpc
    from tritonclient.utils import InferenceServerException
finally:
    descriptor_pool.Default = _default_pool


@pytest.fixture(scope="module")
def served(trained_dir_template, tmp_path_factory):
    d = tmp_path_factory.mktemp("kserve") / "data"
    shutil.copytree(trained_dir_template, d)
    # An older published version that is not the one served: requests for it are "not at ready state".
    shutil.copytree(d / "registry" / "engines" / "1", d / "registry" / "engines" / "0")
    with running_server(server_config(d)) as (server, port):
        wait_for(lambda: server.manager.current is not None, 30, "engine 1 to load")
        client = tc.InferenceServerClient(f"127.0.0.1:{port}")
        yield server, port, client
        client.close()


def _bytes_input(name: str, rows) -> "tc.InferInput":
    arr = np.array(rows, dtype=np.object_)
    t = tc.InferInput(name, list(arr.shape), "BYTES")
    t.set_data_from_numpy(arr)
    return t


def _k_input(k: int) -> "tc.InferInput":
    t = tc.InferInput("K", [1], "INT32")
    t.set_data_from_numpy(np.array([k], dtype=np.int32))
    return t


def _decode(arr) -> list[str]:
    return [x.decode() for x in arr.tolist()]


def _status(excinfo) -> str:
    return excinfo.value.status()


# ---------------------------------------------------------------- the protocol definition

def test_protocol_matches_triton_wire_format():
    """Every message / field / RPC we declare has the number, type and label of tritonclient's copy."""
    def fields(d):
        return {f.name: (f.number, f.type, f.is_repeated,
                         f.message_type.full_name if f.message_type else None,
                         f.enum_type.full_name if f.enum_type else None) for f in d.fields}

    def walk(ours, theirs):
        want = fields(theirs)
        for name, spec in fields(ours).items():
            assert name in want, f"{ours.full_name}.{name} is not in the upstream protocol"
            assert spec == want[name], f"{ours.full_name}.{name}: ours {spec} != upstream {want[name]}"
        for nested in ours.nested_types:
            walk(nested, theirs.nested_types_by_name[nested.name])

    for ours_file, theirs_file in ((kpb.DESCRIPTOR, tc_pb.DESCRIPTOR), (mc.DESCRIPTOR, tc_mc.DESCRIPTOR)):
        assert ours_file.package == theirs_file.package == "inference"
        for name, d in ours_file.message_types_by_name.items():
            walk(d, theirs_file.message_types_by_name[name])
        for name, e in ours_file.enum_types_by_name.items():
            theirs = theirs_file.enum_types_by_name[name]
            assert {v.name: v.number for v in e.values} == {v.name: v.number for v in theirs.values}
    ours_svc = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs_svc = tc_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert KSERVE == ours_svc.full_name == theirs_svc.full_name == "inference.GRPCInferenceService"
    for m in ours_svc.methods:
        t = theirs_svc.methods_by_name[m.name]
        assert (m.input_type.full_name, m.output_type.full_name) == (t.input_type.full_name, t.output_type.full_name)
    assert encode_bytes_tensor([b"ab", b""]) == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"


# ---------------------------------------------------------------- health, metadata, config

def test_health_and_server_metadata(served):
    server, _, client = served
    assert client.is_server_live() and client.is_server_ready()
    for name in MODELS:
        assert client.is_model_ready(name)
        assert client.is_model_ready(name, "1") and client.is_model_ready(name, "01")
        assert not client.is_model_ready(name, "0")    # published, not the serving engine
        assert not client.is_model_ready(name, "7")
    assert not client.is_model_ready("no_such_model")
    meta = client.get_server_metadata()
    assert meta.name == "livetower" and meta.version
    assert {"model_repository", "statistics", "model_configuration"} <= set(meta.extensions)


def test_model_metadata_and_config(served):
    server, _, client = served
    dim = server.manager.current.manifest.dim
    want = {
        "user_tower": ([("HISTORY", "BYTES", [-1, -1]), ("USER_ID", "BYTES", [-1, 1])], [("USER_EMBEDDING", "FP32", [-1, dim])]),
        "item_embeddings": ([("ITEM_IDS", "BYTES", [-1])], [("EMBEDDING", "FP32", [-1, dim])]),
        "recommend": ([("HISTORY", "BYTES", [-1]), ("K", "INT32", [1]), ("USER_ID", "BYTES", [1])],
                      [("ITEM_IDS", "BYTES", [-1]), ("SCORES", "FP32", [-1])]),
    }
    for name, (ins, outs) in want.items():
        meta = client.get_model_metadata(name)
        assert meta.name == name and list(meta.versions) == ["1"]
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == ins
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == outs
        assert client.get_model_metadata(name, "1", as_json=True)["versions"] == ["1"]
    cfg = client.get_model_config("user_tower").config
    assert cfg.name == "user_tower" and cfg.max_batch_size > 0 and cfg.backend == "torch"
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [("HISTORY", tc_mc.TYPE_STRING, [-1]),
                                                                         ("USER_ID", tc_mc.TYPE_STRING, [1])]
    assert [(o.name, o.data_type, list(o.dims)) for o in cfg.output] == [("USER_EMBEDDING", tc_mc.TYPE_FP32, [dim])]
    cfg = client.get_model_config("recommend").config
    assert cfg.max_batch_size == 0
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in cfg.input] == [
        ("HISTORY", tc_mc.TYPE_STRING, [-1], False), ("K", tc_mc.TYPE_INT32, [1], True),
        ("USER_ID", tc_mc.TYPE_STRING, [1], True)]
    assert cfg.parameters["engine_version"].string_value == "1"
    assert client.get_model_config("item_embeddings", as_json=True)["config"]["output"][0]["name"] == "EMBEDDING"


# ---------------------------------------------------------------- inference (tritonclient: raw tensors)

def test_infer_user_tower(served):
    server, _, client = served
    engine = server.manager.current
    rows = [["item-1", "item-2", "item-3"], ["", "", "item-9"], ["no-such-item", "item-4", "item-5"]]
    res = client.infer("user_tower", [_bytes_input("HISTORY", rows)], model_version="1", request_id="r1")
    got = res.as_numpy("USER_EMBEDDING")
    want = engine.runner(np.stack([engine.history_rows([h for h in r if h]) for r in rows]))
    assert got.dtype == np.float32 and got.shape == (3, engine.manifest.dim)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    resp = res.get_response()
    assert resp.model_name == "user_tower" and resp.model_version == "1" and resp.id == "r1"
    # More rows than the runner's own max batch run in chunks; a row with no known item gives zeros.
    many = [[f"item-{i % 300}", f"item-{(i * 7) % 300}"] for i in range(300)] + [["", "unknown"]]
    got = client.infer("user_tower", [_bytes_input("HISTORY", many)]).as_numpy("USER_EMBEDDING")
    want = np.concatenate([engine.runner(np.stack([engine.history_rows([h for h in r if h]) for r in many[i:i + 100]]))
                           for i in range(0, len(many), 100)])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert not got[-1].any()


def test_infer_item_embeddings(served):
    server, _, client = served
    engine = server.manager.current
    ids = ["item-5", "item-0", "item-5", "item-42"]
    res = client.infer("item_embeddings", [_bytes_input("ITEM_IDS", ids)])
    got = res.as_numpy("EMBEDDING")
    want = engine.items_ND.numpy()[[engine.row_of[i] - 1 for i in ids]]
    np.testing.assert_array_equal(got, want)


def test_infer_recommend_equals_engine(served):
    server, _, client = served
    engine = server.manager.current
    hist = ["item-1", "item-2", "item-3"]
    res = client.infer("recommend", [_bytes_input("HISTORY", hist), _k_input(20)])
    ranked = engine.recommend(hist, 20, False)
    assert _decode(res.as_numpy("ITEM_IDS")) == ranked.item_ids
    np.testing.assert_array_equal(res.as_numpy("SCORES"), np.asarray(ranked.scores, dtype=np.float32))
    assert res.get_response().parameters["source"].string_param == "model"
    # K defaults to 10; exclude_seen is a request parameter; one requested output only.
    res = client.infer("recommend", [_bytes_input("HISTORY", hist)], parameters={"exclude_seen": True},
                       outputs=[tc.InferRequestedOutput("ITEM_IDS")])
    assert _decode(res.as_numpy("ITEM_IDS")) == engine.recommend(hist, 10, True).item_ids
    assert res.as_numpy("SCORES") is None
    # No known history item: popularity, like the native API.
    res = client.infer("recommend", [_bytes_input("HISTORY", ["unknown"]), _k_input(5)])
    assert _decode(res.as_numpy("ITEM_IDS")) == engine.recommend([], 5, False).item_ids
    assert res.get_response().parameters["source"].string_param == "popularity"


def test_infer_aio_all_models(served):
    server, port, _ = served
    engine = server.manager.current
    hist = ["item-7", "item-8"]

    async def go():
        async with tc_aio.InferenceServerClient(f"127.0.0.1:{port}") as client:
            assert await client.is_server_ready() and await client.is_model_ready("recommend")
            return await asyncio.gather(
                client.infer("user_tower", [_bytes_input("HISTORY", [hist])]),
                client.infer("item_embeddings", [_bytes_input("ITEM_IDS", hist)]),
                client.infer("recommend", [_bytes_input("HISTORY", hist), _k_input(7)], model_version="1"))

    user, items, rec = asyncio.run(go())
    np.testing.assert_allclose(user.as_numpy("USER_EMBEDDING"), engine.runner(engine.history_rows(hist)[None]),
                               atol=1e-6)
    rows = [engine.row_of[h] - 1 for h in hist]
    np.testing.assert_array_equal(items.as_numpy("EMBEDDING"), engine.items_ND.numpy()[rows])
    ranked = engine.recommend(hist, 7, False)
    assert _decode(rec.as_numpy("ITEM_IDS")) == ranked.item_ids
    np.testing.assert_array_equal(rec.as_numpy("SCORES"), np.float32(ranked.scores))


# ---------------------------------------------------------------- inference with typed contents

def test_infer_typed_contents_get_typed_outputs(served):
    server, port, _ = served
    engine = server.manager.current
    hist = ["item-1", "item-2", "item-3"]
    I = tc_pb.ModelInferRequest.InferInputTensor
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = tc_pb_grpc.GRPCInferenceServiceStub(ch)
        resp = stub.ModelInfer(tc_pb.ModelInferRequest(model_name="recommend", inputs=[
            I(name="HISTORY", datatype="BYTES", shape=[3],
              contents=tc_pb.InferTensorContents(bytes_contents=[h.encode() for h in hist])),
            I(name="K", datatype="INT32", shape=[1], contents=tc_pb.InferTensorContents(int_contents=[12]))]),
            timeout=10)
        ranked = engine.recommend(hist, 12, False)
        assert not resp.raw_output_contents
        assert [o.name for o in resp.outputs] == ["ITEM_IDS", "SCORES"]
        assert [x.decode() for x in resp.outputs[0].contents.bytes_contents] == ranked.item_ids
        np.testing.assert_array_equal(np.float32(resp.outputs[1].contents.fp32_contents), np.float32(ranked.scores))
        assert list(resp.outputs[1].shape) == [12]

        resp = stub.ModelInfer(tc_pb.ModelInferRequest(model_name="user_tower", inputs=[
            I(name="HISTORY", datatype="BYTES", shape=[2, 2],
              contents=tc_pb.InferTensorContents(bytes_contents=[b"", b"item-3", b"item-4", b"item-5"]))]),
            timeout=10)
        got = np.float32(resp.outputs[0].contents.fp32_contents).reshape(list(resp.outputs[0].shape))
        want = engine.runner(np.stack([engine.history_rows(["item-3"]), engine.history_rows(["item-4", "item-5"])]))
        np.testing.assert_allclose(got, want, atol=1e-6)

        # Mixing typed contents with raw_input_contents is refused.
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(tc_pb.ModelInferRequest(
                model_name="item_embeddings",
                inputs=[I(name="ITEM_IDS", datatype="BYTES", shape=[1],
                          contents=tc_pb.InferTensorContents(bytes_contents=[b"item-1"]))],
                raw_input_contents=[encode_bytes_tensor([b"item-1"])]), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "raw_input_contents" in e.value.details()


# ---------------------------------------------------------------- errors

def _hist(rows=("item-1",)):
    return _bytes_input("HISTORY", list(rows))


@pytest.mark.parametrize("model, version, inputs, status, needle", [
    ("no_such_model", "", lambda: [_hist()], "NOT_FOUND",
     "Request for unknown model: 'no_such_model' is not found"),
    ("recommend", "7", lambda: [_hist()], "NOT_FOUND", "version 7 is not found; only the serving engine version 1"),
    ("recommend", "0", lambda: [_hist()], "UNAVAILABLE",
     "version 0 is not at ready state: only the serving engine version 1"),
    ("recommend", "", lambda: [_k_input(5)], "INVALID_ARGUMENT", "expects input 'HISTORY'"),
    ("recommend", "", lambda: [_hist(), _k_input(0)], "INVALID_ARGUMENT", "input 'K' is 0; it must be in 1..1000"),
    ("recommend", "", lambda: [_hist(), _k_input(1001)], "INVALID_ARGUMENT",
     "input 'K' is 1001; it must be in 1..1000"),
    ("recommend", "", lambda: [_bytes_input("HISTORY", [["item-1"]])], "INVALID_ARGUMENT",
     "unexpected shape for input 'HISTORY' for model 'recommend'. Expected [-1], got [1,1]"),
    ("user_tower", "", lambda: [_hist()], "INVALID_ARGUMENT", "Expected [-1,-1], got [1]"),
    ("recommend", "", lambda: [_hist(), _bytes_input("K", ["5"])], "INVALID_ARGUMENT",
     "inference input 'K' data-type is 'BYTES', but model 'recommend' expects 'INT32'"),
    ("item_embeddings", "", lambda: [_bytes_input("ITEMS", ["item-1"])], "INVALID_ARGUMENT",
     "unexpected inference input 'ITEMS' for model 'item_embeddings'; it takes ITEM_IDS"),
    ("item_embeddings", "", lambda: [_bytes_input("ITEM_IDS", ["item-1", "nope", "item-2"])], "INVALID_ARGUMENT",
     "ITEM_IDS[1] 'nope' not an item of engine 1"),
    ("item_embeddings", "", lambda: [_bytes_input("ITEM_IDS", ["x" * 257])], "INVALID_ARGUMENT",
     "ITEM_IDS[0] has 257 bytes; the limit is 256"),
    ("recommend", "", lambda: [_bytes_input("HISTORY", ["i"] * 513)], "INVALID_ARGUMENT",
     "input 'HISTORY' has 513 items; the limit is 512"),
])
def test_infer_errors(served, model, version, inputs, status, needle):
    _, _, client = served
    with pytest.raises(InferenceServerException) as e:
        client.infer(model, inputs(), model_version=version)
    assert _status(e) == f"StatusCode.{status}", e.value
    assert needle in e.value.message(), e.value.message()


def test_metadata_errors(served):
    _, _, client = served
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("no_such_model")
    assert _status(e) == "StatusCode.NOT_FOUND" and e.value.message().startswith("Request for unknown model")
    with pytest.raises(InferenceServerException) as e:
        client.get_model_config("user_tower", "9")
    assert _status(e) == "StatusCode.NOT_FOUND" and "version 9 is not found" in e.value.message()


def test_raw_bytes_tensor_malformed(served):
    _, port, _ = served
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = tc_pb_grpc.GRPCInferenceServiceStub(ch)
        for raw, needle in [(b"\x05\x00\x00\x00ab", "declares 5 bytes but only 2 remain"),
                            (encode_bytes_tensor([b"item-1"]) + b"\x01", "truncated in the length prefix"),
                            (encode_bytes_tensor([b"item-1"] * 3), "holds 3 BYTES elements; its shape needs 2")]:
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(tc_pb.ModelInferRequest(
                    model_name="item_embeddings", inputs=[tc_pb.ModelInferRequest.InferInputTensor(
                        name="ITEM_IDS", datatype="BYTES", shape=[2])], raw_input_contents=[raw]), timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.details()


@pytest.mark.parametrize("version", ["\u00b2", "\u0663", "1\u00b2", "1" * 19, " 1", "-1", "+1"])
def test_version_that_is_not_ascii_digits_is_invalid_argument_without_a_traceback(served, version, caplog):
    """str.isdigit() accepts "²" and "٣", which int() refuses: INVALID_ARGUMENT naming the field, on every RPC
    that takes a version, and no per-request traceback in the log."""
    import logging

    _, port, _ = served
    caplog.set_level(logging.INFO)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = tc_pb_grpc.GRPCInferenceServiceStub(ch)
        calls = [("model_version", lambda: stub.ModelInfer(tc_pb.ModelInferRequest(
                     model_name="item_embeddings", model_version=version, inputs=[
                         tc_pb.ModelInferRequest.InferInputTensor(name="ITEM_IDS", datatype="BYTES", shape=[1])],
                     raw_input_contents=[encode_bytes_tensor([b"item-1"])]), timeout=10)),
                 ("version", lambda: stub.ModelMetadata(tc_pb.ModelMetadataRequest(name="recommend", version=version),
                                                        timeout=10)),
                 ("version", lambda: stub.ModelConfig(tc_pb.ModelConfigRequest(name="recommend", version=version),
                                                      timeout=10)),
                 ("version", lambda: stub.ModelReady(tc_pb.ModelReadyRequest(name="recommend", version=version),
                                                     timeout=10))]
        for field, call in calls:
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
            assert e.value.details().startswith(f"{field} must be empty or a decimal engine version"), e.value.details()
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


# ---------------------------------------------------------------- statistics and repository

def test_inference_statistics(served):
    _, _, client = served
    before = client.get_inference_statistics("item_embeddings").model_stats[0]
    client.infer("item_embeddings", [_bytes_input("ITEM_IDS", ["item-1", "item-2", "item-3"])])
    with pytest.raises(InferenceServerException):
        client.infer("item_embeddings", [_bytes_input("ITEM_IDS", ["nope"])])
    after = client.get_inference_statistics("item_embeddings", "1").model_stats[0]
    assert (after.name, after.version) == ("item_embeddings", "1")
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_stats.success.ns > before.inference_stats.success.ns
    assert after.inference_stats.fail.count == before.inference_stats.fail.count + 1
    assert after.inference_count == before.inference_count + 3
    assert after.execution_count == before.execution_count + 1 and after.last_inference > 0
    everything = client.get_inference_statistics(as_json=True)
    assert {s["name"] for s in everything["model_stats"]} == set(MODELS)
    with pytest.raises(InferenceServerException) as e:
        client.get_inference_statistics("no_such_model")
    assert _status(e) == "StatusCode.NOT_FOUND"


def test_repository_index_load_unload(served):
    server, _, client = served
    index = client.get_model_repository_index()
    assert sorted((m.name, m.version, m.state) for m in index.models) == sorted(
        (name, "1", "READY") for name in MODELS)
    client.load_model("recommend")  # re-checks the registry; the model is ready -> OK
    assert client.is_model_ready("recommend")
    with pytest.raises(InferenceServerException) as e:
        client.load_model("recommend", config='{"max_batch_size": 8}')
    assert _status(e) == "StatusCode.INVALID_ARGUMENT" and "not supported" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.load_model("no_such_model")
    assert _status(e) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as e:
        client.unload_model("recommend")
    assert _status(e) == "StatusCode.FAILED_PRECONDITION"
    assert "always serves its stable engine" in e.value.message() and "EngineAdmin" in e.value.message()
    assert client.is_model_ready("recommend")  # still served


def test_no_engine_yet(tmp_path):
    """Before the trainer publishes anything: live, not ready, inference UNAVAILABLE."""
    (tmp_path / "data").mkdir()
    with running_server(server_config(tmp_path / "data")) as (server, port):
        client = tc.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            assert client.is_server_live() and not client.is_server_ready()
            assert not client.is_model_ready("recommend")
            with pytest.raises(InferenceServerException) as e:
                client.infer("recommend", [_hist()])
            assert _status(e) == "StatusCode.UNAVAILABLE" and "no engine is serving yet" in e.value.message()
            index = client.get_model_repository_index()
            assert {(m.name, m.state) for m in index.models} == {(name, "UNAVAILABLE") for name in MODELS}
            with pytest.raises(InferenceServerException) as e:
                client.load_model("recommend")
            assert _status(e) == "StatusCode.UNAVAILABLE" and "no engine of the registry" in e.value.message()
        finally:
            client.close()


def test_reflection_lists_the_service(served):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    _, port, _ = served
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=10))
        assert KSERVE in {s.name for s in resp.list_services_response.service}
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol=KSERVE)]), timeout=10))
        assert resp.file_descriptor_response.file_descriptor_proto


def test_load_generator_infer_kind_matches_native(served):
    """`livetower bench load --mix infer_recommend=...` sends requests the server answers like Recommend."""
    import grpc as _grpc

    from benchmarks.workload import KINDS, make_workload
    from proto import grpc_service_pb2_grpc as kpb_grpc
    from proto import livetower_v1_pb2 as lpb
    from proto import livetower_v1_pb2_grpc as lpb_grpc

    server, port, _ = served
    wl = make_workload(users=20, zipf_s=1.1, items=300, history_len=10, k=7)
    req = KINDS["infer_recommend"].make(np.random.default_rng(0), wl)
    user = wl.sample_user(np.random.default_rng(0))
    with _grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = kpb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=10)
        native = lpb_grpc.RecommenderStub(ch).Recommend(
            lpb.RecommendRequest(user_id="x", history=wl.history_ids(user), k=7), timeout=10)
    names = [o.name for o in resp.outputs]
    raw_ids = resp.raw_output_contents[names.index("ITEM_IDS")]
    ids, off = [], 0
    while off < len(raw_ids):
        n = int.from_bytes(raw_ids[off:off + 4], "little")
        ids.append(raw_ids[off + 4:off + 4 + n].decode())
        off += 4 + n
    assert ids == list(native.item_ids) and len(ids) == 7
