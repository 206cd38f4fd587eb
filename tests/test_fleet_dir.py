"""A fleet whose registry is a plain directory every host mounts (here: one filesystem under two network
namespaces). Its own module, so that tests/test_fleet.py's module fleet is down before this one starts: two fleets
at once would share this machine's two cores."""

from __future__ import annotations

import pytest

from benchmarks.fleet import Fleet, FleetConfig
from benchmarks.fleet_hosts import netns_available
from contracts.registry import Registry
from proto import livetower_v1_pb2 as pb
from tests.conftest import wait_for
from tests.test_fleet import rollouts

why_not = netns_available()
pytestmark = pytest.mark.skipif(why_not is not None, reason=f"fleet tests need network namespaces: {why_not}")


def test_a_plain_shared_directory_registry_works_too(trained_dir_template, tmp_path):
    """The registry as a directory every host mounts (here: one filesystem under three network namespaces)."""
    config = FleetConfig(replicas=2, lease_s=2.0, poll_interval_s=0.25, registry="dir")
    with Fleet(tmp_path / "fleet", engines_from=Registry(trained_dir_template / "registry"), config=config,
               log=lambda line: None) as f:
        v1 = f.publish(1)
        f.start_all(serving_version=v1, timeout_s=180)
        lead = f.holder()
        c = f.client(1 - lead)
        c.set_policy(pb.CanaryPolicy(mode="manual"))
        v2 = f.publish(1)
        wait_for(lambda: all(r.pending_versions == [v2] for r in rollouts(f)), 20, "both replicas see the publish")
        assert c.start_canary(v2, 0.5).replica == f"replica-{lead}"
        assert c.promote("shared directory").stable_version == v2
        wait_for(lambda: all(r.stable_version == v2 for r in rollouts(f)), 5, "both replicas on the promoted version")
