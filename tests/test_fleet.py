"""A fleet on real separate hosts (issue 21): three `livetower serve --fleet` processes, each in its own network
namespace, on one tansu broker and one registry on a moto S3 server (benchmarks/fleet.py). Rollout changes reach
the lease holder from any replica, every replica follows the shared state, a user sees the same arm on every
replica, the lease moves when its holder is killed -9, and a replica cut off converges once its link is back."""

from __future__ import annotations

import time

import grpc
import pytest

from benchmarks.fleet import Fleet, FleetConfig
from benchmarks.fleet_hosts import netns_available
from contracts.registry import Registry
from proto import livetower_v1_pb2 as pb
from server.config import ServerConfig
from tests.conftest import wait_for

why_not = netns_available()
pytestmark = pytest.mark.skipif(why_not is not None, reason=f"fleet tests need network namespaces: {why_not}")

USERS = [f"s0-u{u}" for u in range(60)]


@pytest.fixture(scope="module")
def fleet(trained_dir_template, tmp_path_factory):
    config = FleetConfig(replicas=3, lease_s=2.0, poll_interval_s=0.25)
    with Fleet(tmp_path_factory.mktemp("fleet"), engines_from=Registry(trained_dir_template / "registry"),
               config=config, log=lambda line: None) as f:
        v1 = f.publish(1)
        f.start_all(serving_version=v1, timeout_s=180)
        yield f


def rollouts(fleet: Fleet) -> list:
    return [fleet.rollout(i) for i in range(fleet.config.replicas)]


def test_fleet_mode_refuses_the_sqlite_log_and_an_unshared_registry(tmp_path):
    with pytest.raises(ValueError, match="fleet needs the events on Kafka: pass --events"):
        ServerConfig(data_dir=tmp_path, fleet=True, registry="s3://b/p")
    with pytest.raises(ValueError, match="fleet needs one registry shared by every replica"):
        ServerConfig(data_dir=tmp_path, fleet=True, events_url="kafka://127.0.0.1:9092/events")


def test_rollout_calls_reach_the_holder_and_every_replica_follows_with_one_split(fleet):
    lead = fleet.holder()
    other = (lead + 1) % 3
    c = fleet.client(other)
    with pytest.raises(grpc.RpcError) as refused:  # the raw call: refused, naming where to go
        c.admin.SetPolicy(pb.SetPolicyRequest(policy=pb.CanaryPolicy(mode="manual")), metadata=c._admin_md)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert fleet.hosts.address(lead) in refused.value.details(), refused.value.details()
    assert c.set_policy(pb.CanaryPolicy(mode="manual")).policy.mode == "manual"  # Client follows the refusal
    stable = fleet.rollout(lead).stable_version
    v = fleet.publish(1)
    wait_for(lambda: all(r.pending_versions == [v] for r in rollouts(fleet)), 20, "every replica sees the publish")
    r = c.start_canary(v, 0.5)
    assert r.canary_version == v and r.replica == f"replica-{lead}"  # answered by the holder
    wait_for(lambda: all(r.canary_version == v for r in rollouts(fleet)), 5, "every replica serving the canary")
    arms = [[fleet.client(i).recommend(u, 5, history=["item-1"]).arm for u in USERS] for i in range(3)]
    assert arms[0] == arms[1] == arms[2], "a user's arm differs between replicas"
    assert 10 < arms[0].count("canary") < 50, arms[0]
    assert fleet.client((lead + 2) % 3).promote("fleet test").stable_version == v
    wait_for(lambda: all(r.stable_version == v and r.canary_version == 0 for r in rollouts(fleet)), 5,
             "every replica on the promoted version")
    history = fleet.rollout(other).history
    assert [(e.action, e.version, e.replica) for e in history[-2:]] == [("canary", v, f"replica-{lead}"),
                                                                       ("promote", v, f"replica-{lead}")]
    assert stable != v


def test_the_lease_moves_when_its_holder_is_killed_and_the_restarted_replica_catches_up(fleet):
    lead = fleet.holder()
    fleet.kill(lead)
    t0 = time.monotonic()
    new = fleet.holder(other_than=lead)
    took = time.monotonic() - t0
    assert took < fleet.config.lease_s + 3, took
    event = wait_for(lambda: next((e for e in reversed(fleet.rollout(new).history)  # its view: as of its last poll
                                   if e.action == "lead" and e.replica == f"replica-{new}"), None), 5, "the takeover")
    assert f"from replica-{lead}" in event.reason, event
    v = fleet.publish(1)  # a canary started while the old holder is down: the restarted one must serve it at once
    fleet.client(new).start_canary(v, 0.5)
    fleet.start_replica(lead)
    fleet.wait_serving(fleet.rollout(new).stable_version, replicas=[lead], timeout_s=120)
    r = wait_for(lambda: (r := fleet.rollout(lead)) is not None and r.canary_version == v and r, 10,
                 "the restarted replica serving the canary")
    assert r.leader == f"replica-{new}"  # it did not take the lease back
    fleet.client(lead).rollback("fleet test")
    wait_for(lambda: all(r.canary_version == 0 for r in rollouts(fleet)), 5, "every replica ending the canary")


def served(fleet: Fleet, i: int, k: int = 5) -> list[str]:
    return list(fleet.client(i).recommend(USERS[0], k, history=["item-1"]).item_ids)


def delete_items(fleet: Fleet, i: int, ids: list[str]) -> pb.CatalogChangeResponse:
    c = fleet.client(i)
    return c.admin.DeleteItems(pb.DeleteItemsRequest(item_ids=ids), metadata=c._admin_md, timeout=15)


def test_a_catalogue_change_on_any_replica_reaches_every_replica(fleet):
    """The catalogue is on the stream (`<topic>.catalog`): DeleteItems answered by one replica (not the lease
    holder: catalogue changes need no lease) drops a build-time item on every replica."""
    top = served(fleet, 0)[0]
    writer = (fleet.holder() + 1) % 3
    r = delete_items(fleet, writer, [top])
    assert r.catalog_version >= 1 and top not in served(fleet, writer)  # the next request on the writer
    for i in range(3):
        wait_for(lambda i=i: top not in served(fleet, i, k=50), 5, f"replica {i} dropping {top}")


def test_a_replica_cut_off_keeps_serving_then_converges(fleet):
    lead = fleet.holder()
    cut = (lead + 1) % 3
    before = fleet.rollout(cut).stable_version
    v = fleet.publish(1)
    gone = served(fleet, cut)[0]
    fleet.hosts.cut(cut)
    try:
        fleet.client(lead).start_canary(v, 0.5)
        fleet.client(lead).promote("while replica cut off")
        delete_items(fleet, lead, [gone])  # a catalogue change it cannot read yet
        time.sleep(2.0)  # the cut replica polls the registry and fails: it must keep what it serves
    finally:
        fleet.hosts.restore(cut)
    assert fleet.procs[cut].poll() is None, "the cut replica died"
    wait_for(lambda: (r := fleet.rollout(cut)) is not None and r.stable_version == v, 15,
             f"replica {cut} converging from {before} to {v}")
    r = fleet.client(cut).recommend(USERS[0], 5, history=["item-1"])
    assert r.engine_version == v and len(r.item_ids) == 5
    wait_for(lambda: gone not in served(fleet, cut, k=50), 15, f"replica {cut} catching up with the delete of {gone}")
