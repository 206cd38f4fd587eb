"""The interceptor's shed summary: one line per interval, and a burst is reported even when no shed follows it."""

from __future__ import annotations

import asyncio
import logging

from server.interceptors import _ShedLog


def test_a_burst_that_ends_inside_the_interval_is_still_logged(caplog):
    async def main():
        shed_log = _ShedLog(interval_s=0.05)
        shed_log.add("Recommend", "RESOURCE_EXHAUSTED")  # logged at once
        for _ in range(3):
            shed_log.add("Recommend", "RESOURCE_EXHAUSTED")  # within the interval: held for the summary
        shed_log.add("Score", "DEADLINE_EXCEEDED")
        await asyncio.sleep(0.15)  # no further shed: the timer reports them

    with caplog.at_level(logging.WARNING, logger="livetower.rpc"):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if r.name == "livetower.rpc"]
    assert len(lines) == 2, lines
    assert "Recommend RESOURCE_EXHAUSTED x1" in lines[0]
    assert "Recommend RESOURCE_EXHAUSTED x3" in lines[1] and "Score DEADLINE_EXCEEDED x1" in lines[1]


def test_sheds_after_a_quiet_interval_are_logged_at_once(caplog):
    async def main():
        shed_log = _ShedLog(interval_s=0.02)
        shed_log.add("Recommend", "RESOURCE_EXHAUSTED")
        await asyncio.sleep(0.05)
        shed_log.add("Recommend", "RESOURCE_EXHAUSTED")
        return shed_log

    with caplog.at_level(logging.WARNING, logger="livetower.rpc"):
        shed_log = asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if r.name == "livetower.rpc"]
    assert len(lines) == 2 and all("x1" in line for line in lines) and not shed_log.counts
