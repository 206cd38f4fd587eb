"""MicroBatcher's inline path: cheap Recommends computed on the event loop while its measured load leaves room for
them (a stub engine stands in for the real one)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from server.batching import BatchingConfig, MicroBatcher
from server.engine.engine import Ranked
from server.loop_watch import BUSY_WINDOW_S
from tests.test_batching import SlowEngine, q, run


class FastEngine(SlowEngine):
    """No sleep: measured far below the tests' inline_below_ms (1 s: a busy CI machine's thread
    hand-off can take milliseconds, and is part of the measured cost)."""

    def __init__(self) -> None:
        super().__init__(0.0)


async def idle_window() -> None:
    await asyncio.sleep(BUSY_WINDOW_S * 1.5)


def test_nothing_runs_inline_before_the_loops_load_is_measured():
    async def main():
        b = MicroBatcher(BatchingConfig(inline_below_ms=1000.0, max_queue_delay_ms=1000))
        b.start()
        eng = FastEngine()
        for i in range(3):  # measured cheap after the first, but no window has closed yet
            await b.recommend(eng, q(i), None)
        await b.stop()
        return b

    b = run(main())
    assert b.inline == 0 and b.batches == 3


class SpinningEngine(SlowEngine):
    """Burns `seconds` of CPU per query (a real engine's inline compute is the loop's CPU)."""

    def recommend_batch(self, queries):
        end = time.perf_counter() + self.seconds * len(queries)
        while time.perf_counter() < end:
            pass
        self.threads.add(threading.current_thread().name)
        self.batches.append(len(queries))
        return [Ranked([q.history[0]], [float(q.k)], "model") for q in queries]


def test_inline_stops_once_the_loop_could_not_carry_the_compute():
    """Back-to-back Recommends on a 2 ms engine ask for about a whole core: over inline_max_loop_busy (0.5), so after
    the first window they go through the compute thread and its queue bounds, not onto the loop."""
    async def main():
        b = MicroBatcher(BatchingConfig(inline_below_ms=1000.0, inline_max_loop_busy=0.5, max_queue_delay_ms=1000))
        b.start()
        eng = SpinningEngine(0.002)
        await b.recommend(eng, q(0), None)
        await idle_window()
        inline_at, end = [], time.monotonic() + 4 * BUSY_WINDOW_S
        while time.monotonic() < end:
            await b.recommend(eng, q(1), None)
            inline_at.append(b.inline)
            await asyncio.sleep(0)  # as between a server's requests: the loop runs its timers (the probe)
        await b.stop()
        return b, inline_at

    b, inline_at = run(main())
    assert b.inline >= 1                             # the first window's requests: the loop was idle before them
    assert inline_at[-1] == inline_at[len(inline_at) // 2]  # none inline in the second half
    assert b.batches >= len(inline_at) // 2
    assert b.inline_demand > 0.5

    from prometheus_client import generate_latest
    from server.metrics import ServerMetrics

    metrics = ServerMetrics()
    metrics.watch_batcher(b)
    text = generate_latest(metrics.registry).decode()
    assert f"livetower_inline_queries_total {float(b.inline)}" in text
    assert f"livetower_inline_demand {b.inline_demand!r}" in text and "livetower_event_loop_busy " in text


def test_a_cheap_measured_engine_runs_on_the_event_loop_when_idle():
    async def main():
        b = MicroBatcher(BatchingConfig(inline_below_ms=1000.0, max_queue_delay_ms=1000))
        b.start()
        eng = FastEngine()
        first = await b.recommend(eng, q(0), None)   # unmeasured: the compute thread
        await idle_window()                          # the loop's load measured: it can carry the compute
        after = [await b.recommend(eng, q(i), None) for i in range(1, 6)]  # measured cheap: inline
        await b.stop()
        return b, eng, first, after

    b, eng, first, after = run(main())
    assert b.batches == 1 and b.inline == 5
    assert eng.threads == {"engine_0", threading.main_thread().name}
    assert first.item_ids == ["item-0"] and [r.item_ids[0] for r in after] == [f"item-{i}" for i in range(1, 6)]


def test_slow_engines_and_queued_work_go_through_the_compute_thread():
    async def main():
        b = MicroBatcher(BatchingConfig(inline_below_ms=15.0, max_queue_delay_ms=1000))
        b.start()
        slow, fast = SlowEngine(0.03), FastEngine()
        await b.recommend(slow, q(0), None)
        await b.recommend(fast, q(0), None)
        await b.recommend(slow, q(1), None)           # measured >= 30 ms: above the limit
        running = asyncio.ensure_future(b.recommend(slow, q(2), None))
        await asyncio.sleep(0.005)                    # the slow batch is computing
        behind = await b.recommend(fast, q(3), None)  # cheap, but the compute thread is busy: it queues
        await running
        await b.stop()
        return b, slow, fast, behind

    b, slow, fast, behind = run(main())
    assert b.inline == 0 and b.batches == 5
    assert threading.main_thread().name not in slow.threads | fast.threads
    assert behind.item_ids == ["item-3"]


def test_inline_errors_reach_the_caller_and_zero_disables_it():
    class Failing(FastEngine):
        fail = False

        def recommend_batch(self, queries):
            if self.fail:
                raise RuntimeError("engine broke")
            return super().recommend_batch(queries)

    async def main(limit_ms):
        b = MicroBatcher(BatchingConfig(inline_below_ms=limit_ms, max_queue_delay_ms=1000))
        b.start()
        eng = Failing()
        await b.recommend(eng, q(0), None)
        await idle_window()
        eng.fail = True
        with pytest.raises(RuntimeError, match="engine broke"):
            await b.recommend(eng, q(1), None)
        eng.fail = False
        await b.recommend(eng, q(2), None)
        await b.stop()
        return b

    on, off = run(main(1000.0)), run(main(0.0))
    assert on.inline == 1 and on.batches == 1
    assert off.inline == 0 and off.batches == 2
