"""The decision lease: at most one replica makes the automatic rollout decisions (auto canaries, promotions and
rollbacks on the analysis, experiment ends) at a time, and another takes over when it dies. grpc-free.

The holder and its expiry live in rollout.json and change only through Registry.update_rollout (an exclusive
file lock, or compare-and-swap on object storage), so two replicas never both take it. The holder renews at
half-life; once it lapses (the holder died, hung, or lost the registry) the next candidate to poll takes it and
the history records who took it from whom. Each automatic decision is fenced: its own state change checks, in
the same update, that the decider still holds an unexpired lease, so a holder that paused past its expiry
cannot decide after its successor has (no decision is made twice).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Callable

from contracts.registry import Registry
from contracts.rollout import RolloutError, RolloutState


log = logging.getLogger("livetower.engine")


def default_replica_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class LeaseHeld(Exception):
    pass


def _now_ms() -> int:
    return int(time.time() * 1000)


def hold(registry: Registry, replica: str, lease_s: float, st: RolloutState,
         address: str = "") -> tuple[bool, RolloutState]:
    """Take or renew the lease if it is free, lapsed or ours (st: the state just read); (holding, state).
    address: where this replica's admin listener is reached (recorded with the lease for the other replicas)."""
    lease_ms, now = int(lease_s * 1000), _now_ms()
    if st.leader == replica and st.leader_until_ms - now > lease_ms / 2 and st.leader_address == address:
        return True, st  # renewed recently enough
    if st.leader not in ("", replica) and st.leader_until_ms > now:
        return False, st

    def take(s: RolloutState) -> None:
        now = _now_ms()
        if s.leader not in ("", replica) and s.leader_until_ms > now:
            raise LeaseHeld(s.leader)  # another candidate took it since we read
        if s.leader != replica:
            lapsed = f" from {s.leader} (lapsed {(now - s.leader_until_ms) / 1000:.1f} s ago)" if s.leader else ""
            s.record("lead", 0, "auto", f"took the decision lease{lapsed}", replica)
        s.leader, s.leader_until_ms, s.leader_address = replica, now + lease_ms, address

    try:
        return True, registry.update_rollout(take)
    except LeaseHeld:
        return False, registry.read_rollout()


def holder_address(st: RolloutState) -> str | None:
    """The admin address of an unexpired lease's holder ("" if it recorded none); None when nobody holds it."""
    if not st.leader or st.leader_until_ms <= _now_ms():
        return None
    return st.leader_address


def check_holder(st: RolloutState, replica: str) -> None:
    """Inside an automatic decision's state change: refuse unless `replica` still holds an unexpired lease."""
    if st.leader != replica or st.leader_until_ms <= _now_ms():
        raise RolloutError("FAILED_PRECONDITION", f"{replica} no longer holds the decision lease (held by "
                                                  f"{st.leader or 'nobody'}): the decision is left to the holder")


async def renew_until(stop: asyncio.Event, renew: Callable[[], object], period_s: float) -> None:
    """Call renew (blocking: take or renew the lease) every period_s off the event loop until stop. On its own
    cadence, apart from the watcher, whose engine loads could otherwise hold it up past half the lease."""
    while not stop.is_set():
        try:
            await asyncio.to_thread(renew)
        except Exception:  # the registry unreachable: the lease lapses and another replica takes it
            log.exception("decision lease renewal failed; retrying")
        try:
            await asyncio.wait_for(stop.wait(), timeout=period_s)
        except TimeoutError:
            pass
