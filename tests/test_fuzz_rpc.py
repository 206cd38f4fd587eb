"""Fuzzing every unary RPC of a real running server (real gRPC over a socket, real engine and event log).

Property: whatever the request - field-wise random messages (nasty strings, extreme and non-finite
numbers, repeated fields around their limits) or raw bytes (random, or valid messages with bytes
flipped) - the answer is OK or one of fuzz_support.ALLOWED_CODES, never INTERNAL or UNKNOWN, and the
server still serves a valid Recommend afterwards. Streaming RPCs (Health.Watch, reflection) are not
fuzzed here. One server per module; the admin fuzz runs last and alone in one test (it can change
the rollout policy).
"""

from __future__ import annotations

import shutil
import time

import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2
from hypothesis import example, given
from hypothesis import strategies as st

from proto import grpc_service_pb2 as kpb
from proto import livetower_v1_pb2 as pb
from server.config import RequestLimits
from server.kserve import MODELS
from server.kserve_tensors import encode_bytes_tensor
from tests.conftest import ADMIN_TOKEN, running_server, server_config, wait_for
from tests.fuzz_support import (ALLOWED_CODES, INT32, INT64, Tally, budget, floats, ints, messages, mutated,
                                sized_lists, texts)

LIMITS = RequestLimits()
CALL_TIMEOUT_S = 30.0
NOW_MS = int(time.time() * 1000)
RECOMMENDER = pb.DESCRIPTOR.services_by_name["Recommender"]
KSERVE = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
ADMIN = pb.DESCRIPTOR.services_by_name["EngineAdmin"]
DATA_SERVICES = (RECOMMENDER, KSERVE, HEALTH)


def _unary(service) -> list:
    return [m for m in service.methods if not m.client_streaming and not m.server_streaming]


def _path(method) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def _cls(descriptor):
    return message_factory.GetMessageClass(descriptor)


DATA_METHODS = [m for s in DATA_SERVICES for m in _unary(s)]
ADMIN_METHODS = _unary(ADMIN)


@pytest.fixture(scope="module")
def served(trained_dir_template, tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz_rpc") / "data"
    shutil.copytree(trained_dir_template, d)
    with running_server(server_config(d)) as (server, port):
        wait_for(lambda: server.manager.current is not None, 60, "engine 1 to load")
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        known = list(server.manager.current.item_ids[:50])
        yield server, port, channel, known
        channel.close()


def _call(channel, path: str, request, response_cls=None, metadata=None) -> grpc.StatusCode:
    """Send `request` (a message, or raw bytes when response_cls is None); the status code of the answer."""
    if response_cls is None:
        fn = channel.unary_unary(path)
    else:
        fn = channel.unary_unary(path, request_serializer=type(request).SerializeToString,
                                 response_deserializer=response_cls.FromString)
    try:
        fn(request, timeout=CALL_TIMEOUT_S, metadata=metadata)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _expect_allowed(tally: Tally, code: grpc.StatusCode, what: str, request) -> None:
    tally.add(code.name)
    shown = request if isinstance(request, bytes) else repr(request)[:2000]
    assert code in ALLOWED_CODES, f"{what} answered {code.name} for {shown!r}"


def _call_method(channel, method, request, tally: Tally, metadata=None) -> None:
    code = _call(channel, _path(method), request, _cls(method.output_type), metadata)
    _expect_allowed(tally, code, method.full_name, request)


def _assert_healthy(channel, known: list[str]) -> None:
    stub = channel.unary_unary(_path(RECOMMENDER.methods_by_name["Recommend"]),
                               request_serializer=pb.RecommendRequest.SerializeToString,
                               response_deserializer=pb.RecommendResponse.FromString)
    resp = stub(pb.RecommendRequest(user_id="fuzz-after", history=known[:5], k=5), timeout=CALL_TIMEOUT_S)
    assert len(resp.item_ids) == 5 and resp.engine_version >= 1, resp


def _run(fuzz, tally: Tally, channel, known) -> None:
    try:
        fuzz()
    finally:
        tally.report()
    _assert_healthy(channel, known)


# ---------------------------------------------------------------- structured, per RPC

def _ids(known: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(known), texts())


def _plausible_ids(known: list[str]) -> st.SearchStrategy[str]:
    """Ids that pass validation (known items or short unknown ones): inputs that reach the engine."""
    return st.one_of(st.sampled_from(known), st.text(min_size=1, max_size=30))


def test_recommend_structured(served):
    server, port, channel, known = served
    tally = Tally("Recommender.Recommend (structured)")
    method = RECOMMENDER.methods_by_name["Recommend"]

    @budget(1)
    @given(req=st.one_of(messages(pb.RecommendRequest, overrides={
        "user_id": _ids(known),
        "history": sized_lists(_ids(known), known[0], (LIMITS.max_history,)),
        "k": ints(*INT32, extra=(LIMITS.max_k, LIMITS.max_k + 1))}), st.builds(
        pb.RecommendRequest, user_id=_plausible_ids(known),
        history=sized_lists(_plausible_ids(known), known[0], (LIMITS.max_history - 1,), max_random=20),
        k=st.integers(1, LIMITS.max_k), exclude_seen=st.booleans())))
    @example(req=pb.RecommendRequest(user_id="u", history=known[:3], k=LIMITS.max_k, exclude_seen=True))
    def fuzz(req):
        _call_method(channel, method, req, tally)

    _run(fuzz, tally, channel, known)


def test_score_structured(served):
    server, port, channel, known = served
    tally = Tally("Recommender.Score (structured)")
    method = RECOMMENDER.methods_by_name["Score"]

    @budget(1)
    @given(req=st.one_of(messages(pb.ScoreRequest, overrides={
        "user_id": _ids(known),
        "history": sized_lists(_ids(known), known[0], (LIMITS.max_history,)),
        "candidate_ids": sized_lists(_ids(known), known[1], (LIMITS.max_candidates,))}), st.builds(
        pb.ScoreRequest, user_id=_plausible_ids(known),
        history=st.lists(_plausible_ids(known), max_size=20),
        candidate_ids=sized_lists(_plausible_ids(known), known[1], (LIMITS.max_candidates - 1,), max_random=20)
        .filter(len))))
    def fuzz(req):
        _call_method(channel, method, req, tally)

    _run(fuzz, tally, channel, known)


def test_log_events_structured(served):
    server, port, channel, known = served
    tally = Tally("Recommender.LogEvents (structured)")
    method = RECOMMENDER.methods_by_name["LogEvents"]
    valid = pb.Event(event_id="fuzz-e", user_id="fuzz-u", item_id=known[0], action="click", weight=1.0,
                     timestamp_ms=NOW_MS)
    event = st.one_of(messages(pb.Event), st.builds(
        pb.Event, event_id=texts(), user_id=_ids(known), item_id=_ids(known), action=texts(), weight=floats(32),
        timestamp_ms=ints(*INT64, extra=(NOW_MS, NOW_MS + 24 * 3600 * 1000 + 60_000))))

    @budget(1)
    # Lists at the size limit hold one valid event repeated (one transaction); random ones stay short, so
    # a run does not become a benchmark of the dead-letter path (issue 22, item 4).
    @given(req=st.builds(pb.LogEventsRequest, events=sized_lists(event, valid, (LIMITS.max_events,))))
    def fuzz(req):
        _call_method(channel, method, req, tally)

    _run(fuzz, tally, channel, known)


def _infer_requests(known: list[str]) -> st.SearchStrategy:
    """ModelInfer requests aimed at the three models: right and wrong names, datatypes, shapes (incl.
    negative and overflowing ones), typed or raw contents that match or do not."""
    ids = st.one_of(st.sampled_from(known), texts()).map(str.encode)
    names = st.sampled_from(("HISTORY", "ITEM_IDS", "K", "", "history", "SCORES"))
    shapes = st.lists(ints(*INT64, extra=(2**31, 2**32, 2**62, LIMITS.max_history + 1, 1025)), max_size=4)

    @st.composite
    def tensor_and_raw(draw):
        t = kpb.ModelInferRequest.InferInputTensor(
            name=draw(names), datatype=draw(st.one_of(st.sampled_from(("BYTES", "INT32", "FP32")), texts())),
            shape=draw(shapes))
        elems = draw(st.lists(ids, max_size=8))
        ints32 = draw(st.lists(ints(*INT32), max_size=4))
        if draw(st.booleans()):  # contents that fit the shape: inputs that get past the shape checks
            dims = draw(st.lists(st.integers(0, 4), min_size=1, max_size=2))
            count = 1
            for d in dims:
                count *= d
            del t.shape[:]
            t.shape.extend(dims)
            elems = draw(st.lists(ids, min_size=count, max_size=count))
            ints32 = draw(st.lists(ints(*INT32, extra=(LIMITS.max_k,)), min_size=count, max_size=count))
        kind = draw(st.sampled_from(("bytes", "int", "none", "raw_bytes", "raw_int", "raw_random")))
        raw = None
        if kind == "bytes":
            t.contents.bytes_contents.extend(elems)
        elif kind == "int":
            t.contents.int_contents.extend(ints32)
        elif kind == "raw_bytes":
            raw = encode_bytes_tensor(elems)
        elif kind == "raw_int":
            raw = b"".join(int(v).to_bytes(4, "little", signed=True) for v in ints32)
        elif kind == "raw_random":
            raw = draw(st.binary(max_size=64))
        return t, raw

    @st.composite
    def build(draw):
        req = kpb.ModelInferRequest(
            # hypothesis favours the simplest draw (False): make that the valid model and version
            model_name=draw(texts() if draw(st.booleans()) and draw(st.booleans()) else st.sampled_from(tuple(MODELS))),
            model_version=draw(st.sampled_from(("", "1")) if not draw(st.booleans()) else st.one_of(
                st.sampled_from(("01", "0", "2", "-1", "²", "1 ", "9" * 30)), texts())),
            id=draw(texts()))
        raws, use_raw = [], False
        tensors = draw(st.lists(tensor_and_raw(), max_size=3))
        spec = MODELS.get(req.model_name)
        if spec is not None and draw(st.booleans()):  # the model's own inputs, well-formed: reach the engine
            tensors, use_raw = [], draw(st.booleans())
            for want in spec.inputs:
                dims = [1 if d == 1 else draw(st.integers(0, 4)) for d in want.shape]
                count = 1
                for d in dims:
                    count *= d
                t = kpb.ModelInferRequest.InferInputTensor(name=want.name, datatype=want.datatype, shape=dims)
                if want.datatype == "BYTES":
                    elems = draw(st.lists(ids, min_size=count, max_size=count))
                    raw = encode_bytes_tensor(elems) if use_raw else None
                    if raw is None:
                        t.contents.bytes_contents.extend(elems)
                else:
                    vals = draw(st.lists(ints(*INT32, extra=(LIMITS.max_k,)), min_size=count, max_size=count))
                    raw = b"".join(v.to_bytes(4, "little", signed=True) for v in vals) if use_raw else None
                    if raw is None:
                        t.contents.int_contents.extend(vals)
                tensors.append((t, raw))
        for t, raw in tensors:
            req.inputs.append(t)
            raws.append(raw)
        if any(r is not None for r in raws) and (use_raw or draw(st.booleans())):
            req.raw_input_contents.extend(r or b"" for r in raws)
        for name in draw(st.lists(st.one_of(st.sampled_from(("ITEM_IDS", "SCORES", "EMBEDDING",
                                                             "USER_EMBEDDING")), texts()), max_size=2)):
            req.outputs.add(name=name)
        if draw(st.booleans()):
            req.parameters["exclude_seen"].CopyFrom(draw(messages(kpb.InferParameter)))
        return req

    return build()


def test_kserve_model_infer_structured(served):
    server, port, channel, known = served
    tally = Tally("inference.GRPCInferenceService.ModelInfer (structured)")
    method = KSERVE.methods_by_name["ModelInfer"]
    good = kpb.ModelInferRequest(model_name="recommend")
    good.inputs.add(name="HISTORY", datatype="BYTES", shape=[3]).contents.bytes_contents.extend(
        x.encode() for x in known[:3])

    @budget(1)
    @given(req=st.one_of(_infer_requests(known), _infer_requests(known), messages(kpb.ModelInferRequest)))
    @example(req=good)
    def fuzz(req):
        _call_method(channel, method, req, tally)

    _run(fuzz, tally, channel, known)


def test_every_data_rpc_structured(served):
    """Every unary RPC of Recommender, KServe and Health with a message built from its descriptor."""
    server, port, channel, known = served
    tallies = {m.full_name: Tally(f"{m.full_name} (structured, generic)") for m in DATA_METHODS}
    names = st.one_of(st.sampled_from(tuple(MODELS) + ("livetower.v1.Recommender", "", "1")), texts())
    overrides = {"name": names, "model_name": names, "version": st.sampled_from(("", "1", "0", "²", "01", "x")),
                 "service": st.one_of(st.sampled_from(("", "livetower.v1.Recommender", "livetower.v1.EngineAdmin")),
                                      texts())}

    @st.composite
    def call(draw):
        method = draw(st.sampled_from(DATA_METHODS))
        cls = _cls(method.input_type)
        fields = {k: v for k, v in overrides.items() if k in method.input_type.fields_by_name}
        return method, draw(messages(cls, overrides=fields))

    @budget(2)
    @given(mr=call())
    @example(mr=(KSERVE.methods_by_name["ModelMetadata"], kpb.ModelMetadataRequest(name="recommend", version="²")))
    @example(mr=(KSERVE.methods_by_name["ModelReady"], kpb.ModelReadyRequest(name="recommend", version="²")))
    @example(mr=(KSERVE.methods_by_name["ModelConfig"], kpb.ModelConfigRequest(name="recommend", version="²")))
    def fuzz(mr):
        method, req = mr
        _call_method(channel, method, req, tallies[method.full_name])

    try:
        fuzz()
    finally:
        for t in tallies.values():
            t.report()
    _assert_healthy(channel, known)


# ---------------------------------------------------------------- raw bytes

def _raw_payloads(methods, known: list[str]):
    """(method, bytes): random bytes, or a random valid message of the method's input type mutated."""
    valid = {"Recommend": pb.RecommendRequest(user_id="u", history=known[:3], k=10),
             "Score": pb.ScoreRequest(user_id="u", history=known[:3], candidate_ids=known[3:6]),
             "LogEvents": pb.LogEventsRequest(events=[pb.Event(event_id="raw-e", user_id="u", item_id=known[0],
                                                               action="click", weight=1.0, timestamp_ms=NOW_MS)])}

    @st.composite
    def build(draw):
        method = draw(st.sampled_from(methods))
        base = valid.get(method.name) or draw(messages(_cls(method.input_type)))
        payload = draw(st.one_of(st.binary(max_size=256), mutated(base.SerializeToString())))
        return method, payload

    return build()


def test_every_data_rpc_raw_bytes(served):
    server, port, channel, known = served
    tallies = {m.full_name: Tally(f"{m.full_name} (raw bytes)") for m in DATA_METHODS}

    @budget(2)
    @given(mp=_raw_payloads(DATA_METHODS, known))
    @example(mp=(RECOMMENDER.methods_by_name["Recommend"], b"\xff\xff\xff"))
    @example(mp=(RECOMMENDER.methods_by_name["Recommend"], b"\x0a\x02\xc3\x28"))  # user_id: invalid UTF-8
    def fuzz(mp):
        method, payload = mp
        code = _call(channel, _path(method), payload)
        _expect_allowed(tallies[method.full_name], code, method.full_name, payload)

    try:
        fuzz()
    finally:
        for t in tallies.values():
            t.report()
    _assert_healthy(channel, known)


# ---------------------------------------------------------------- admin (last: it can change the policy)

def test_zz_admin_rpcs(served):
    """EngineAdmin on its own listener, with the right token, a wrong one and none; structured and raw."""
    server, port, channel, known = served
    admin = grpc.insecure_channel(f"127.0.0.1:{getattr(server, 'admin_port', port)}")
    tallies = {m.full_name: Tally(f"{m.full_name} (admin)") for m in ADMIN_METHODS}
    tokens = st.sampled_from(((("authorization", f"Bearer {ADMIN_TOKEN}"),), None,
                              (("authorization", "Bearer wrong"),), (("authorization", ""),),
                              (("authorization", f"Bearer {ADMIN_TOKEN}x"),), (("authorization", ADMIN_TOKEN),)))

    @st.composite
    def call(draw):
        method = draw(st.sampled_from(ADMIN_METHODS))
        cls = _cls(method.input_type)
        overrides = {"version": ints(*INT64, extra=(1, 2, 99))} if "version" in cls.DESCRIPTOR.fields_by_name else {}
        if draw(st.booleans()):
            request = draw(messages(cls, overrides=overrides))
        else:
            request = draw(st.one_of(st.binary(max_size=128), mutated(draw(messages(cls)).SerializeToString())))
        return method, request, draw(tokens)

    @budget(2)
    @given(c=call())
    def fuzz(c):
        method, request, metadata = c
        tally = tallies[method.full_name]
        if isinstance(request, bytes):
            code = _call(admin, _path(method), request, metadata=metadata)
            _expect_allowed(tally, code, method.full_name, request)
        else:
            _call_method(admin, method, request, tally, metadata=metadata)

    try:
        fuzz()
    finally:
        for t in tallies.values():
            t.report()
        admin.close()
    _assert_healthy(channel, known)
    assert server.manager.current is not None
