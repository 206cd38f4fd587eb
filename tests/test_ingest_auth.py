"""Authenticated ingestion and the per-caller events/s cap, over real sockets."""

from __future__ import annotations

import os
import time

import grpc
import pytest

from contracts.client import Client
from proto import livetower_v1_pb2 as pb
from server.app import create_server
from server.config import RequestLimits
from server.ingest_guard import CallerBuckets, peer_host
from tests.conftest import running_server, server_config

ALICE, BOB = "alice-token-0123456789abcdef", "bob-token-0123456789abcdefgh"


def events(n: int, user: str = "u1") -> list[pb.Event]:
    now = int(time.time() * 1000)
    return [pb.Event(event_id=f"ing-{user}-{i}-{time.time_ns()}", user_id=user, item_id=f"item-{i}", action="click",
                     weight=1.0, timestamp_ms=now) for i in range(n)]


def tokens_file(tmp_path, mode: int = 0o600):
    path = tmp_path / "producers.tokens"
    path.write_text(f"# name:token\nalice:{ALICE}\n\nbob: {BOB}\n")
    os.chmod(path, mode)
    return path


def test_log_events_needs_a_producer_token_when_configured(tmp_path):
    cfg = server_config(tmp_path / "data", producer_tokens_file=tokens_file(tmp_path))
    with running_server(cfg) as (server, port):
        target = f"127.0.0.1:{port}"
        for token, problem in ((None, "missing 'authorization' metadata"), ("not-a-producer-token-xyz", "unknown")):
            c = Client(target, producer_token=token)
            with pytest.raises(grpc.RpcError) as e:
                c.log_events(events(2))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert problem in e.value.details() and "Bearer <producer token>" in e.value.details()
            assert ALICE not in e.value.details()
            c.close()
        assert server.event_log.count() == 0  # refused calls stored nothing
        for token in (ALICE, BOB):
            c = Client(target, producer_token=token)
            assert c.log_events(events(2, user=token[:3])).accepted == 2
            c.close()
        assert server.event_log.count() == 4
        # The admin token is no producer token, and the data plane's other methods need none.
        with pytest.raises(grpc.RpcError) as e:
            Client(target, producer_token="test-admin-token-0123456789").log_events(events(1))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            Client(target).recommend("u1", k=3)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # no engine here: past authentication


def test_producer_tokens_file_must_be_private_and_well_formed(tmp_path):
    with pytest.raises(ValueError, match="chmod 600"):
        create_server(server_config(tmp_path / "data", producer_tokens_file=tokens_file(tmp_path, 0o640)))
    bad = tmp_path / "bad.tokens"
    bad.write_text("alice:short\n")
    os.chmod(bad, 0o600)
    with pytest.raises(ValueError, match="line 1"):
        create_server(server_config(tmp_path / "data2", producer_tokens_file=bad))
    bad.write_text(f"alice:{ALICE}\nmallory:{ALICE}\n")
    with pytest.raises(ValueError, match="reuses the token"):
        create_server(server_config(tmp_path / "data3", producer_tokens_file=bad))


def test_rate_cap_per_producer(tmp_path):
    cfg = server_config(tmp_path / "data", producer_tokens_file=tokens_file(tmp_path), limits=RequestLimits(max_events=10),
                        ingest_events_per_s=1.0, ingest_burst_events=10)
    with running_server(cfg) as (server, port):
        alice = Client(f"127.0.0.1:{port}", producer_token=ALICE)
        bob = Client(f"127.0.0.1:{port}", producer_token=BOB)
        assert alice.log_events(events(8)).accepted == 8
        with pytest.raises(grpc.RpcError) as e:
            alice.log_events(events(5))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "producer alice is over its ingest limit of 1 events/s (burst 10" in e.value.details()
        assert "ingest_events_per_s" in e.value.details()
        assert bob.log_events(events(10, user="b")).accepted == 10  # bob has his own bucket
        assert alice.log_events(events(2)).accepted == 2  # what alice has left still passes
        assert server.event_log.count() == 20
        alice.close()
        bob.close()


def test_rate_cap_per_peer_host_without_credentials(tmp_path):
    cfg = server_config(tmp_path / "data", limits=RequestLimits(max_events=10), ingest_events_per_s=1.0,
                        ingest_burst_events=10)
    with running_server(cfg) as (server, port):
        a, b = Client(f"127.0.0.1:{port}"), Client(f"127.0.0.1:{port}")  # two connections, one host
        assert a.log_events(events(10)).accepted == 10
        with pytest.raises(grpc.RpcError) as e:
            b.log_events(events(3))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "peer ipv4:127.0.0.1 is over its ingest limit" in e.value.details()
        a.close()
        b.close()


def test_caller_buckets_refill_and_bound_their_memory():
    now = [0.0]
    buckets = CallerBuckets(rate=10.0, burst=20, clock=lambda: now[0], max_callers=3)
    assert buckets.take("a", 20) == 0.0
    assert buckets.take("a", 5) == pytest.approx(0.5)
    now[0] = 0.5
    assert buckets.take("a", 5) == 0.0
    assert buckets.take("a", 1) > 0
    now[0] = 100.0
    assert buckets.take("a", 20) == 0.0 and buckets.take("a", 1) > 0  # banked at most the burst
    for caller in ("b", "c", "d"):
        buckets.take(caller, 1)
    assert len(buckets) == 3
    assert peer_host("ipv4:10.0.0.7:5123") == "ipv4:10.0.0.7" and peer_host("ipv6:[::1]:80") == "ipv6:[::1]"
    assert peer_host("unix:/tmp/s") == "unix:/tmp/s"


def test_burst_must_admit_a_full_request(tmp_path):
    with pytest.raises(ValueError, match="ingest_burst_events"):
        server_config(tmp_path, ingest_burst_events=100)  # limits.max_events is 10,000
