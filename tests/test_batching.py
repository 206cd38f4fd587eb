"""MicroBatcher: batching, ordering, shedding, deadlines (a stub engine stands in for the real one)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from server.batching import BatchingConfig, DeadlineExpired, MicroBatcher, Overloaded
from server.engine.engine import Ranked, RecommendQuery


class SlowEngine:
    """recommend_batch sleeps `seconds` per call and records batch sizes."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.batches: list[int] = []
        self.threads: set[str] = set()

    def recommend_batch(self, queries):
        self.threads.add(threading.current_thread().name)
        time.sleep(self.seconds)
        self.batches.append(len(queries))
        return [Ranked([q.history[0]], [float(q.k)], "model") for q in queries]


def run(coro):
    return asyncio.run(coro)


def q(i: int) -> RecommendQuery:
    return RecommendQuery([f"item-{i}"], i + 1, False)


def test_requests_queued_while_busy_run_as_one_batch():
    async def main():
        b = MicroBatcher(BatchingConfig(max_batch=8, max_queue_delay_ms=1000))
        b.start()
        eng = SlowEngine(0.05)
        results = await asyncio.gather(*[b.recommend(eng, q(i), None) for i in range(20)])
        await b.stop()
        return eng, results

    eng, results = run(main())
    # Each caller gets its own answer, in its own order.
    assert [r.item_ids[0] for r in results] == [f"item-{i}" for i in range(20)]
    assert [r.scores[0] for r in results] == [float(i + 1) for i in range(20)]
    assert max(eng.batches) == 8 and sum(eng.batches) == 20 and len(eng.batches) <= 4
    assert all(name.startswith("engine") for name in eng.threads)  # off the event loop


def test_queue_limit_sheds_at_once():
    async def main():
        b = MicroBatcher(BatchingConfig(max_batch=1, max_queue=3, max_queue_delay_ms=1000))
        b.start()
        eng = SlowEngine(0.05)
        tasks = [asyncio.ensure_future(b.recommend(eng, q(i), None)) for i in range(10)]
        out = await asyncio.gather(*tasks, return_exceptions=True)
        await b.stop()
        return out

    out = run(main())
    shed = [r for r in out if isinstance(r, Overloaded)]
    ok = [r for r in out if isinstance(r, Ranked)]
    assert len(ok) >= 3 and len(shed) >= 5
    assert "limit 3" in str(shed[0])
    assert {e.reason for e in shed} == {"queue_full"}


def test_shed_requests_are_exported_by_reason():
    """livetower_shed_total{reason} reads the batcher's counts; every reason is exported, also at zero."""
    from prometheus_client import generate_latest
    from server.metrics import ServerMetrics

    async def main():
        b = MicroBatcher(BatchingConfig(max_batch=1, max_queue=1, max_queue_delay_ms=1000))
        b.start()
        tasks = [asyncio.ensure_future(b.recommend(SlowEngine(0.01), q(i), None)) for i in range(4)]
        out = await asyncio.gather(*tasks, return_exceptions=True)
        await b.stop()
        return b, out

    b, out = run(main())
    shed = sum(isinstance(r, Overloaded) for r in out)
    assert shed == 3 and b.shed == 3 and b.shed_by_reason["queue_full"] == 3
    metrics = ServerMetrics()
    metrics.watch_batcher(b)
    text = generate_latest(metrics.registry).decode()
    for reason, n in b.shed_by_reason.items():
        assert f'livetower_shed_total{{reason="{reason}"}} {float(n)}' in text
    assert "livetower_expired_in_queue_total 0.0" in text


def test_deadline_admission_and_expiry():
    async def main():
        b = MicroBatcher(BatchingConfig(max_batch=1, max_queue=100, max_queue_delay_ms=1000))
        b.start()
        eng = SlowEngine(0.03)
        await b.recommend(eng, q(0), None)  # teaches the batcher ~30 ms per job
        await b.recommend(eng, q(0), None)
        now = time.monotonic()
        backlog = [asyncio.ensure_future(b.recommend(eng, q(i), None)) for i in range(5)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="deadline") as shed:
            await b.recommend(eng, q(9), now + 0.02)  # 5 jobs ahead cannot finish in 20 ms
        assert shed.value.reason == "deadline"
        await asyncio.gather(*backlog)
        await b.stop()

    run(main())


def test_predicted_queue_delay_over_the_bound_is_shed():
    """Admitted requests keep a bounded wait: one that would queue longer than max_queue_delay_ms is shed."""
    async def main():
        b = MicroBatcher(BatchingConfig(max_batch=1, max_queue=100, max_queue_delay_ms=50))
        b.start()
        eng = SlowEngine(0.03)
        await b.recommend(eng, q(0), None)
        b._engine_cost_s[eng] = 0.03  # what the batcher measures for this engine: 30 ms per job
        # Queued work ahead of each: 0, 30, 60 ms (> 50: shed).
        admitted = [asyncio.ensure_future(b.recommend(eng, q(i), None)) for i in range(3)]
        await asyncio.sleep(0)
        out = await asyncio.gather(*admitted, return_exceptions=True)
        with pytest.raises(Overloaded, match="max_queue_delay_ms"):
            await asyncio.gather(*[b.recommend(eng, q(i), None) for i in range(3)])
        await b.stop()
        return out

    out = run(main())
    assert isinstance(out[0], Ranked) and isinstance(out[1], Ranked)
    assert isinstance(out[2], Overloaded) and "max_queue_delay_ms" in str(out[2]) and out[2].reason == "queue_delay"


def test_a_burst_on_a_queue_that_does_not_stand_is_admitted_up_to_the_burst_bound():
    """Requests a short stall held back arrive together: their queue drains, so they are served late, not shed,
    up to burst_queue_delay_ms of predicted wait."""
    async def main():
        b = MicroBatcher(BatchingConfig(max_batch=1, max_queue=100, max_queue_delay_ms=50, standing_queue_ms=100,
                                        burst_queue_delay_ms=200))
        b.start()
        eng = SlowEngine(0.03)
        await b.recommend(eng, q(0), None)
        b._engine_cost_s[eng] = 0.03
        burst = [asyncio.ensure_future(b.recommend(eng, q(i), None)) for i in range(8)]  # 0, 30, ... 210 ms ahead
        out = await asyncio.gather(*burst, return_exceptions=True)
        await asyncio.sleep(0.1)  # standing_queue_ms without a long wait or a shed: whatever stood, stands no more
        await b.stop()
        return b, out

    b, out = run(main())
    assert all(isinstance(r, Ranked) for r in out[:7]), out  # up to 180 ms predicted: admitted
    assert isinstance(out[7], Overloaded) and "burst_queue_delay_ms" in str(out[7])
    assert b.shed_by_reason["queue_delay"] == 1 and not b.queue_standing


def test_a_standing_queue_sheds_at_the_target_until_it_has_not_stood_for_as_long():
    """Offered 3x what the engine serves: once every job taken has waited over max_queue_delay_ms for
    standing_queue_ms, requests predicted to wait longer are shed, for as long as the overload lasts (the admitted
    ones then wait within the target: the sheds keep it standing); standing_queue_ms after the load stops, a burst is
    admitted again."""
    async def main():
        b = MicroBatcher(BatchingConfig(max_batch=1, max_queue=1000, max_queue_delay_ms=20, standing_queue_ms=40,
                                        burst_queue_delay_ms=1000, max_loop_lag_ms=0))
        b.start()
        eng = SlowEngine(0.015)
        await b.recommend(eng, q(0), None)
        b._engine_cost_s[eng] = 0.015
        sent, stood = [], False
        for i in range(40):  # a request every 5 ms for 200 ms; the engine serves one per 15 ms
            sent.append(asyncio.ensure_future(b.recommend(eng, q(i), None)))
            await asyncio.sleep(0.005)
            stood = stood or b.queue_standing
        out = await asyncio.gather(*sent, return_exceptions=True)
        late = [r for r in out[-10:] if isinstance(r, Overloaded)]  # the last 50 ms of the overload: still shed
        await asyncio.sleep(0.06)
        assert late and not b.queue_standing
        burst = [asyncio.ensure_future(b.recommend(eng, q(i), None)) for i in range(4)]  # 0-45 ms ahead
        again = await asyncio.gather(*burst, return_exceptions=True)
        await b.stop()
        return stood, out, again

    stood, out, again = run(main())
    shed = [r for r in out if isinstance(r, Overloaded)]
    assert stood and shed and all("the queue standing" in str(e) for e in shed)
    assert isinstance(out[0], Ranked) and isinstance(out[3], Ranked)  # the first 60 ms of backlog: a burst, admitted
    assert all(isinstance(r, Ranked) for r in again)


def test_queued_work_counts_each_engine_at_its_own_cost():
    """A slow canary's queued jobs weigh what they cost; a fast engine's many jobs weigh little."""
    async def main():
        b = MicroBatcher(BatchingConfig(max_batch=1, max_queue=100, max_queue_delay_ms=50))
        b.start()
        fast, slow = SlowEngine(0.001), SlowEngine(0.03)
        await b.recommend(fast, q(0), None)
        await b.recommend(slow, q(0), None)
        b._engine_cost_s[fast], b._engine_cost_s[slow] = 0.001, 0.03
        await asyncio.gather(*[b.recommend(fast, q(i), None) for i in range(15)])  # <= 14 ms ahead: all admitted
        blocker = asyncio.ensure_future(b.recommend(slow, q(1), None))
        await asyncio.sleep(0.005)  # running: ~25 ms of it left
        queued = asyncio.ensure_future(b.recommend(slow, q(2), None))  # admitted; the next waits ~25 + 30 ms
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="max_queue_delay_ms"):
            await b.recommend(fast, q(3), None)
        await asyncio.gather(blocker, queued)
        await b.stop()

    run(main())


def test_the_running_batch_counts_as_work_ahead():
    async def main():
        b = MicroBatcher(BatchingConfig(max_batch=1, max_queue=100, max_queue_delay_ms=20))
        b.start()
        eng = SlowEngine(0.05)
        await b.recommend(eng, q(0), None)
        b._engine_cost_s[eng] = 0.05
        running = asyncio.ensure_future(b.recommend(eng, q(1), None))
        await asyncio.sleep(0.005)  # ~45 ms of the running batch left, nothing queued
        with pytest.raises(Overloaded, match="max_queue_delay_ms"):
            await b.recommend(eng, q(2), None)
        await running
        assert (await b.recommend(eng, q(3), None)).item_ids == ["item-3"]  # idle again: admitted
        await b.stop()

    run(main())


def test_a_batch_that_ends_before_its_prediction_leaves_no_work_ahead():
    """A new engine's first batches may be predicted slow; once one ends, its predicted remainder is gone."""
    async def main():
        b = MicroBatcher(BatchingConfig(max_batch=1, max_queue=100, max_queue_delay_ms=100))
        b.start()
        eng = SlowEngine(0.005)
        await b.recommend(eng, q(0), None)
        b._engine_cost_s[eng] = 0.5  # predicted 500 ms; it takes 5 ms
        await b.recommend(eng, q(1), None)
        b._engine_cost_s[eng] = 0.005
        # Nothing runs or waits now; the 495 ms the finished batch was predicted to have left is not work ahead.
        assert (await b.recommend(eng, q(2), None)).item_ids == ["item-2"]
        await b.stop()

    run(main())


def test_a_late_event_loop_does_not_make_an_engine_look_expensive():
    """The cost is timed on the compute thread: a result the event loop takes back late (the GIL held elsewhere in
    the process, a blocking callback) is not an expensive engine, and must not shed later requests."""
    async def main():
        b = MicroBatcher(BatchingConfig(max_batch=1, max_delay_ms=0, max_queue_delay_ms=1000, max_loop_lag_ms=0))
        b.start()
        eng = SlowEngine(0.05)
        task = asyncio.ensure_future(b.recommend(eng, q(0), None))
        await asyncio.sleep(0.01)  # on the compute thread now
        time.sleep(0.3)  # the loop is blocked while the batch finishes
        await task
        await b.stop()
        return b._engine_cost_s[eng]

    assert 0.04 < run(main()) < 0.15


def test_a_lagging_event_loop_sheds_new_requests_until_it_catches_up():
    async def main():
        b = MicroBatcher(BatchingConfig(max_batch=4, max_loop_lag_ms=10, loop_probe_ms=1))
        b.start()
        eng = SlowEngine(0.0)
        assert (await b.recommend(eng, q(1), None)).item_ids == ["item-1"]
        time.sleep(0.06)  # the loop is blocked: requests would wait here before any handler runs
        with pytest.raises(Overloaded, match="event loop is .* behind"):  # the probe is overdue
            await b.recommend(eng, q(2), None)
        await asyncio.sleep(0.002)  # the probe has run late and measured the stall: still behind
        with pytest.raises(Overloaded, match="event loop is .* behind"):
            await b.recommend(eng, q(2), None)
        await asyncio.sleep(0.04)  # caught up: the signal decayed
        ok = await b.recommend(eng, q(3), None)
        await b.stop()
        return b, ok

    b, ok = run(main())
    assert ok.item_ids == ["item-3"] and b.shed_by_reason["loop_lag"] == 2 and b.loop_lag_s < 0.01


def test_expired_while_queued_is_not_computed():
    async def main():
        b = MicroBatcher(BatchingConfig(max_batch=1))
        b.start()
        eng = SlowEngine(0.05)
        first = asyncio.ensure_future(b.recommend(eng, q(0), None))
        await asyncio.sleep(0.01)
        b._engine_cost_s[eng] = 0.0  # admit it; it will expire while the first job runs
        with pytest.raises(DeadlineExpired):
            await b.recommend(eng, q(1), time.monotonic() + 0.01)
        await first
        await b.stop()
        return eng

    eng = run(main())
    assert eng.batches == [1]  # the expired request never reached the engine


def test_batches_never_mix_engines():
    async def main():
        b = MicroBatcher(BatchingConfig(max_batch=16, max_queue_delay_ms=1000))
        b.start()
        old, new = SlowEngine(0.02), SlowEngine(0.02)
        blocker = asyncio.ensure_future(b.recommend(old, q(0), None))
        await asyncio.sleep(0.005)
        mixed = [b.recommend(old if i % 2 else new, q(i), None) for i in range(8)]
        await asyncio.gather(blocker, *mixed)
        await b.stop()
        return old, new

    old, new = run(main())
    assert sum(old.batches) == 5 and sum(new.batches) == 4
    # Interleaved engines (a canary's users among stable's) still form full batches per engine:
    # the queued 8 run as one batch on each engine, not as 8 batches of 1.
    assert old.batches == [1, 4] and new.batches == [4]


def test_config_validation_names_field():
    with pytest.raises(ValueError, match="burst_queue_delay_ms"):
        BatchingConfig(burst_queue_delay_ms=0)
    with pytest.raises(ValueError, match="standing_queue_ms"):
        BatchingConfig(standing_queue_ms=-1)
    with pytest.raises(ValueError, match="max_batch"):
        BatchingConfig(max_batch=0)
    with pytest.raises(ValueError, match="max_queue"):
        BatchingConfig(max_queue=0)
    with pytest.raises(ValueError, match="max_queue_delay_ms"):
        BatchingConfig(max_queue_delay_ms=0)
    with pytest.raises(ValueError, match="max_loop_lag_ms"):
        BatchingConfig(max_loop_lag_ms=-1)
    with pytest.raises(ValueError, match="inline_below_ms"):
        BatchingConfig(inline_below_ms=-1)
    with pytest.raises(ValueError, match="inline_max_loop_busy"):
        BatchingConfig(inline_max_loop_busy=0)
