"""OpenTelemetry traces: request spans from a real server over gRPC, the trainer's round spans, W3C context from
the caller, sampling, and export over OTLP/gRPC to a real receiver."""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from benchmarks.otlp_sink import OtlpSink
from contracts.eventlog import SqliteEventLog
from contracts.tracing import Tracing, TracingConfig
from proto import livetower_v1_pb2 as pb
from proto import livetower_v1_pb2_grpc as pb_grpc
from tests.conftest import SMALL_DATA, TEST_BATCHING, make_trainer, running_server, server_config, wait_for
from trainer.data.synthetic import generate

RECOMMEND = "livetower.v1.Recommender/Recommend"
ROOT = Path(__file__).resolve().parents[1]
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
# The compute thread's path (a batch.wait span, then engine.compute); the inline path has its own test.
THREAD_ONLY = dataclasses.replace(TEST_BATCHING, inline_below_ms=0)


def _served(trained_dir, *, batching=THREAD_ONLY, **tracing):
    config = server_config(trained_dir, batching=batching, tracing=TracingConfig(enabled=True, **tracing))
    return running_server(config)


def _recommend(port: int, *, user: str = "user-1", k: int = 5, metadata=()):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.RecommenderStub(channel)
        try:
            response, call = stub.Recommend.with_call(pb.RecommendRequest(user_id=user, k=k), metadata=metadata,
                                                      timeout=10)
        except grpc.RpcError as e:
            return e.code(), dict(e.trailing_metadata() or ())
        return response, dict(call.trailing_metadata())


def _finished(server, exporter: InMemorySpanExporter, requests: int | None = None):
    """The spans ended so far; with requests: once that many request spans ended (a refused request's span ends
    just after its status is sent, so the client may see the status first)."""
    def spans():
        assert server.tracing.flush(10)
        found = list(exporter.get_finished_spans())
        return found if requests is None or sum(s.name == RECOMMEND for s in found) >= requests else None

    return spans() if requests is None else wait_for(spans, 10, f"{requests} request spans")


def test_recommend_span_has_its_stages_as_children(trained_dir):
    exporter = InMemorySpanExporter()
    with _served(trained_dir, exporter=exporter) as (server, port):
        wait_for(lambda: server.manager.current is not None, 30, "engine 1 to load")
        response, trailers = _recommend(port)
        assert isinstance(response, pb.RecommendResponse) and len(response.item_ids) == 5
        bad_code, _ = _recommend(port, k=0)
        assert bad_code == grpc.StatusCode.INVALID_ARGUMENT
        spans = _finished(server, exporter, requests=2)
    requests = [s for s in spans if s.name == RECOMMEND]
    assert len(requests) == 2
    ok, bad = sorted(requests, key=lambda s: s.attributes["rpc.grpc.status_code"])
    assert ok.attributes["rpc.grpc.status_code"] == 0 and bad.attributes["rpc.grpc.status_code"] == 3
    assert ok.attributes["livetower.request_id"] == trailers["x-request-id"]
    assert ok.attributes["livetower.engine_version"] == "1" and ok.attributes["rpc.method"] == "Recommend"
    assert ok.attributes["rpc.serialize_ms"] > 0 and ok.attributes["livetower.canary"] is False
    assert ok.resource.attributes["service.name"] == "livetower-server"
    assert [e.name for e in ok.events] == ["admitted"]
    children = {s.name: s for s in spans if s.parent is not None and s.parent.span_id == ok.context.span_id}
    assert set(children) == {"batch.wait", "engine.compute"}
    wait, compute = children["batch.wait"], children["engine.compute"]
    assert ok.start_time <= wait.start_time <= wait.end_time <= compute.start_time <= compute.end_time <= ok.end_time
    assert compute.attributes["batch.size"] == 1 and compute.attributes["livetower.engine_version"] == "1"
    assert compute.attributes["stage.tower_ms"] > 0 and compute.attributes["stage.retrieval_ms"] > 0
    stages_ms = sum(compute.attributes[f"stage.{s}_ms"] for s in ("rows", "tower", "retrieval", "assemble"))
    assert stages_ms <= (compute.end_time - compute.start_time) / 1e6
    assert compute.attributes["batch.inline"] is False
    # A refused request never reached the batcher: no stage spans under it.
    assert not [s for s in spans if s.parent is not None and s.parent.span_id == bad.context.span_id]


def test_a_request_computed_on_the_event_loop_has_no_wait_span(trained_dir):
    """The inline path (a cheap Recommend while the loop has room): one engine.compute child marked batch.inline,
    with the same stage times, and no batch.wait (it never queued)."""
    exporter = InMemorySpanExporter()
    inline = dataclasses.replace(TEST_BATCHING, inline_below_ms=1000.0)
    with _served(trained_dir, batching=inline, exporter=exporter) as (server, port):
        wait_for(lambda: server.manager.current is not None, 30, "engine 1 to load")
        # The first request measures the engine on the compute thread; inline starts once a load window closed.
        wait_for(lambda: _recommend(port) and server.batcher.inline > 0, 10, "a request computed inline")
        sent = server.batcher.inline + server.batcher.batches  # one request at a time: each batch is one
        spans = _finished(server, exporter, requests=sent)
    computes = [s for s in spans if s.name == "engine.compute"]
    inline_spans = [s for s in computes if s.attributes["batch.inline"]]
    assert len(inline_spans) == server.batcher.inline and len(computes) == sent
    request_ids = {s.parent.span_id for s in inline_spans}
    assert not [s for s in spans if s.name == "batch.wait" and s.parent.span_id in request_ids]
    compute = inline_spans[-1]
    assert compute.attributes["batch.size"] == 1 and compute.attributes["stage.tower_ms"] > 0
    (request,) = [s for s in spans if s.context.span_id == compute.parent.span_id]
    assert request.name == RECOMMEND and request.start_time <= compute.start_time <= compute.end_time <= request.end_time


def test_sampling_and_the_callers_traceparent(trained_dir):
    exporter = InMemorySpanExporter()
    with _served(trained_dir, exporter=exporter, sample_ratio=0.0) as (server, port):
        wait_for(lambda: server.manager.current is not None, 30, "engine 1 to load")
        for _ in range(5):
            assert isinstance(_recommend(port)[0], pb.RecommendResponse)
        assert _finished(server, exporter) == []  # ratio 0 and no caller context: nothing recorded
        # The caller sampled its trace: the server's span joins it whatever its own ratio.
        response, _ = _recommend(port, metadata=[("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01")])
        assert isinstance(response, pb.RecommendResponse)
        spans = _finished(server, exporter)
        # The caller did not sample: nothing is recorded.
        _recommend(port, metadata=[("traceparent", f"00-{'1' * 32}-{'2' * 16}-00")])
        assert len(_finished(server, exporter)) == len(spans)
    assert {s.context.trace_id for s in spans} == {int(CALLER_TRACE, 16)}
    (request,) = [s for s in spans if s.name == RECOMMEND]
    assert request.parent is not None and request.parent.span_id == int(CALLER_SPAN, 16) and request.parent.is_remote
    assert {s.name for s in spans if s.parent.span_id == request.context.span_id} == {"batch.wait", "engine.compute"}


def test_training_round_span_tree(tmp_path):
    log = SqliteEventLog(tmp_path / "events.sqlite")
    log.append(list(generate(SMALL_DATA)))
    exporter = InMemorySpanExporter()
    trainer = make_trainer(tmp_path, tracing=TracingConfig(enabled=True, exporter=exporter))
    result = trainer.run_round()
    assert result is not None and result.published_version == 1, result
    trainer.close()
    log.close()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"trainer.round", "read", "train", "eval", "commit", "build", "publish"}
    root = spans["trainer.round"]
    assert root.parent is None and root.resource.attributes["service.name"] == "livetower-trainer"
    assert root.attributes["round"] == 1 and root.attributes["events"] == result.events
    assert root.attributes["gate"] == result.gate and root.attributes["published_version"] == 1
    for name in ("read", "train", "eval", "commit", "build"):
        assert spans[name].parent.span_id == root.context.span_id, name
    assert spans["publish"].parent.span_id == spans["build"].context.span_id
    steps = [spans[n] for n in ("read", "train", "eval", "commit", "build")]
    assert all(a.end_time <= b.start_time for a, b in zip(steps, steps[1:]))  # in order, not overlapping
    assert spans["build"].events  # the build's progress messages


def test_sampled_draws_at_the_ratio_and_follows_a_caller():
    random.seed(7)
    quarter = Tracing(sample_ratio=0.25)
    n = sum(quarter.sampled({}) for _ in range(4000))
    assert 850 < n < 1150, n  # binomial(4000, 0.25): 1000 +- 27 (sd)
    assert not any(Tracing(sample_ratio=0.0).sampled({}) for _ in range(1000))
    assert all(Tracing(sample_ratio=1.0).sampled({}) for _ in range(1000))
    assert Tracing(sample_ratio=0.0).sampled({"traceparent": "00-..."})  # the caller's flag decides then


def test_an_unsampled_round_records_nothing(tmp_path):
    log = SqliteEventLog(tmp_path / "events.sqlite")
    log.append(list(generate(SMALL_DATA)))
    exporter = InMemorySpanExporter()
    trainer = make_trainer(tmp_path, tracing=TracingConfig(enabled=True, exporter=exporter, sample_ratio=0.0),
                           backend="torch")
    assert trainer.run_round() is not None
    trainer.close()
    log.close()
    assert exporter.get_finished_spans() == ()  # not even the steps as traces of their own


def test_spans_reach_a_real_otlp_receiver(trained_dir):
    with OtlpSink() as sink:
        with _served(trained_dir, otlp_endpoint=f"127.0.0.1:{sink.port}", export_interval_ms=50,
                     service_name="lt-test") as (server, port):
            wait_for(lambda: server.manager.current is not None, 30, "engine 1 to load")
            response, trailers = _recommend(port)
            assert isinstance(response, pb.RecommendResponse)
            wait_for(lambda: any(s.name == "engine.compute" for s in sink.spans), 10, "spans at the OTLP receiver")
    (request,) = [s for s in sink.spans if s.name == RECOMMEND]
    assert request.service == "lt-test" and request.parent_span_id == ""
    assert request.attributes["livetower.request_id"] == trailers["x-request-id"]
    compute = next(s for s in sink.spans if s.name == "engine.compute")
    assert compute.trace_id == request.trace_id and compute.parent_span_id == request.span_id
    assert compute.attributes["stage.tower_ms"] > 0


def test_tracing_is_off_by_default_and_imports_no_sdk(tmp_path):
    code = f"""
import sys
from server.app import create_server
from server.config import ServerConfig
from trainer.config import TrainConfig
config = ServerConfig(data_dir={str(tmp_path)!r}, port=0, admin_port=0, metrics_port=None)
assert not config.tracing.enabled and not TrainConfig().tracing.enabled
server, port = create_server(config)
assert server.tracing.tracer is None and server.batcher._tracer is None
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
assert not loaded, loaded
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("kw, field", [(dict(sample_ratio=1.5), "sample_ratio"),
                                       (dict(otlp_endpoint=" "), "otlp_endpoint"),
                                       (dict(ca_file=Path("/nonexistent")), "tls"),
                                       (dict(tls=True, ca_file=Path("/nonexistent")), "ca_file"),
                                       (dict(max_queue_spans=0), "max_queue_spans")])
def test_config_names_the_bad_field(kw, field):
    with pytest.raises(ValueError, match=field):
        TracingConfig(**kw)


def test_cli_flags_configure_server_and_trainer():
    from livetower import cli, cli_flags

    p = cli.build_parser()
    flags = ["--tracing", "--tracing-sample-ratio", "0.01", "--tracing-otlp-endpoint", "collector:4317"]
    s = cli_flags.server_config(p.parse_args(["serve", *flags]))
    assert s.tracing == TracingConfig(enabled=True, sample_ratio=0.01, otlp_endpoint="collector:4317")
    t = cli_flags.train_config(p.parse_args(["train", "--tiny", *flags]))
    assert t.tracing == s.tracing
    assert not cli_flags.server_config(p.parse_args(["serve"])).tracing.enabled
    up = p.parse_args(["up", "--tiny", *flags])
    assert cli_flags.server_config(up).tracing == s.tracing
    argv = cli_flags.trainer_argv(up)  # `up` hands the tracing flags to its trainer
    assert cli_flags.train_config(p.parse_args(["train", *argv])).tracing == s.tracing
    with pytest.raises(cli.FlagValueError, match="sample_ratio"):
        cli_flags.server_config(p.parse_args(["serve", "--tracing-sample-ratio", "2"]))
