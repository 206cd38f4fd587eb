"""The decision lease (server/engine/lease.py): one replica decides at a time, another takes over when it
lapses, and a holder that paused past its lease cannot decide after its successor."""

from __future__ import annotations

import time

import pytest

from benchmarks.swap import stage
from contracts.registry import Registry
from contracts.rollout import CanaryPolicy, RolloutError, RolloutState
from server.engine.manager import EngineManager, EngineManagerConfig


def managers(trained_dir, lease_s: float = 0.6):
    reg = Registry(trained_dir / "registry")
    reg.write_rollout(RolloutState(stable=1, policy=CanaryPolicy(mode="manual")))
    cfg = dict(warmup_calls=0, lease_s=lease_s)
    return reg, EngineManager(reg, EngineManagerConfig(replica_id="a", **cfg)), \
        EngineManager(reg, EngineManagerConfig(replica_id="b", **cfg))


def test_one_holder_then_a_takeover_when_it_lapses(trained_dir):
    reg, a, b = managers(trained_dir)
    a.poll_once()
    b.poll_once()
    assert a.leading and not b.leading and reg.read_rollout().leader == "a"
    for _ in range(3):  # a renews at half-life: b never gets it while a polls
        time.sleep(0.25)
        a.poll_once()
        b.poll_once()
        assert a.leading and not b.leading
    time.sleep(0.7)  # a stops polling (dead, hung or cut off): its lease lapses
    b.poll_once()
    st = reg.read_rollout()
    assert b.leading and st.leader == "b"
    lead = st.history[-1]
    assert lead.action == "lead" and lead.replica == "b" and "from a" in lead.reason, lead
    a.poll_once()  # back: it sees the new holder and does not take the lease back
    assert not a.leading and reg.read_rollout().leader == "b"


def test_a_holder_that_paused_past_its_lease_cannot_decide(trained_dir):
    reg, a, b = managers(trained_dir)
    v2 = reg.publish(*stage(reg, 1, reg))
    a.poll_once()
    a.start_canary(v2, 0.5)
    b.poll_once()  # follows the canary
    assert b.canary is not None and b.canary.version == v2
    time.sleep(0.7)  # a pauses past its lease; b takes it and decides first
    b.poll_once()
    assert b.leading
    b.rollback(actor="auto", reason="b decided", expect=v2)
    a.poll_once()  # a follows: the canary is gone
    assert a.canary is None
    # a decision a had computed before its pause, applied now, is refused by the fence and changes nothing
    a.leading = True
    with pytest.raises(RolloutError, match="no longer holds the decision lease"):
        a._mutate(lambda st: st.record("promote", v2, "auto", "stale decision"), "auto")
    st = reg.read_rollout()
    assert [e.action for e in st.history if e.version == v2] == ["canary", "rollback"]
    assert [e.replica for e in st.history if e.version == v2] == ["a", "b"]  # who decided
