"""Dynamic micro-batching with admission control, between the servicers and the engine.

Requests queue here; one worker runs them on a dedicated compute thread, so the event loop keeps
accepting and (de)serialising while the engine works. A Recommend on an engine measured to be cheap
(inline_below_ms) is computed on the event loop itself when nothing is queued or computing and the loop
could carry that compute for every Recommend at the current rate (inline_max_loop_busy): for a
millisecond engine the thread hand-offs cost more than they save. Near and past capacity the bound
sends every request through the queue and its bounds, which the loop's own compute would escape
(docs/serving.md).
Whatever queued while the last batch ran is taken together (up to max_batch, after waiting up to
max_delay_ms for more): under light load a request runs alone at once, under heavy load batches
grow and amortise the user tower and the scoring pass. Past capacity requests are shed quickly
instead of queueing without bound, so the requests that are admitted keep a bounded latency:
- the queue holds at most max_queue requests; beyond that: Overloaded at once;
- a request that would wait longer than max_queue_delay_ms for the compute thread (the queued jobs
  ahead of it, each at its engine's measured compute time per job) is shed at admission, and so is
  one whose deadline cannot be met given that queue. Optionally (standing_queue_ms > 0) the first
  rule applies only while the queue stands: once every job taken for standing_queue_ms had waited
  longer than max_queue_delay_ms, and until standing_queue_ms pass with neither such a stretch nor a
  request shed for it. A burst (the requests a short stall held back, arriving at once) is then a
  queue that drains, admitted up to burst_queue_delay_ms of predicted wait and served late rather
  than refused (CoDel's distinction of a good queue from a standing one, Nichols & Jacobson 2012,
  applied at admission). Off by default: past capacity it admitted more than the loop could serve;
- while the event loop itself runs more than max_loop_lag_ms behind (requests then wait before any
  handler sees them, where no queue bound applies), new requests are shed: a shed request costs the
  loop a fraction of a computed one, so the backlog drains instead of growing;
- a request whose deadline passed while queued is dropped, not computed.
Engine-agnostic and grpc-free: the servicer maps the exceptions onto status codes.

Tracing (when on, and only for requests whose span is sampled): admission adds an event to the request span
("admitted", or "shed" with the reason); after its batch, a request gets two finished child spans, "batch.wait"
(admission to the compute thread picking it up) and "engine.compute" (its batch: batch.size, engine version and
the engine's stage times tower/retrieval/rows/assemble in ms, read off the StageClock before and after the
batch). A request computed inline never queued: engine.compute only, with batch.inline true. They are recorded
after the fact on the event loop: no span is open on the compute thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from contracts.tracing import TRACING_OFF, Tracing, child_span
from server.engine.compute_process import ComputeProcessError, name_os_thread, recommend_batch_remote
from server.engine.engine import Engine, Ranked, RecommendQuery
from server.engine.stages import STAGES
from server.loop_watch import LoopWatch


log = logging.getLogger("livetower.batching")

SHED_REASONS = ("queue_full", "loop_lag", "queue_delay", "deadline", "shutdown")  # Overloaded.reason values


class Overloaded(Exception):
    """Shed: the queue is full or the deadline cannot be met. Retry with back-off. reason: which bound (SHED_REASONS),
    counted per reason by the batcher (livetower_shed_total{reason})."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class DeadlineExpired(Exception):
    """The request's deadline passed while it waited."""


@dataclass(kw_only=True, frozen=True, slots=True)
class BatchingConfig:
    max_batch: int = 32          # Recommend queries per user-tower call
    max_delay_ms: float = 0.0    # extra wait for a batch to fill (0: take what queued while busy)
    max_queue: int = 512         # queued requests beyond which new ones are shed
    max_queue_delay_ms: float = 20.0  # predicted wait for the compute thread beyond which a request is shed
                                      # while the queue stands (below); also the wait that counts as standing
    standing_queue_ms: float = 0.0    # > 0: how long every job taken must have waited over max_queue_delay_ms
                                      # before the queue counts as standing; until then a burst is admitted up to
                                      # burst_queue_delay_ms. 0 (default): the queue always counts as standing, a
                                      # request is shed on the prediction. Measured (docs/serving.md section 7): 100
                                      # cut the sheds after injected 50 ms pauses from ~115 to ~44 a run (P99 the
                                      # same) but doubled the admitted P99 at 2x capacity (~95 -> 154-185 ms)
    burst_queue_delay_ms: float = 100.0  # predicted wait beyond which a request is shed while the queue does
                                         # not stand (a burst); never below max_queue_delay_ms
    max_loop_lag_ms: float = 50.0     # event-loop lag beyond which new requests are shed (0: never)
    inline_below_ms: float = 2.0      # > 0: a Recommend whose engine takes less than this per request (measured)
                                      # runs on the event loop itself when nothing is queued or computing, and
                                      # while the loop could carry it (inline_max_loop_busy); 0: never. Without
                                      # that bound, past capacity the loop saturated before any queue bound
                                      # applied (P99 ~1 s at 1,000 QPS). Measured: docs/serving.md section 7
    inline_max_loop_busy: float = 0.95  # inline only while the event loop's own work per second plus the compute
                                      # the Recommends of the last window would add (their rate x the engine's
                                      # measured cost) stays below this fraction of one core; measured every
                                      # BUSY_WINDOW_S from the loop thread's CPU time (server/loop_watch.py).
                                      # Past it every request goes through the queue and its bounds (0.95 against
                                      # 0.85: docs/serving.md section 7, 2026-12-06/07)
    loop_probe_ms: float = 2.0        # how often the loop lag is sampled

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch <= 256:
            raise ValueError(f"max_batch must be in 1..256 (the engines' batch bound), got {self.max_batch}")
        if self.max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be >= 0, got {self.max_delay_ms}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if not self.max_queue_delay_ms > 0:
            raise ValueError(f"max_queue_delay_ms must be > 0, got {self.max_queue_delay_ms}")
        if self.standing_queue_ms < 0:
            raise ValueError(f"standing_queue_ms must be >= 0 (0: shed on the prediction at once), "
                             f"got {self.standing_queue_ms}")
        if not self.burst_queue_delay_ms > 0:
            raise ValueError(f"burst_queue_delay_ms must be > 0, got {self.burst_queue_delay_ms}")
        if self.max_loop_lag_ms < 0:
            raise ValueError(f"max_loop_lag_ms must be >= 0 (0: off), got {self.max_loop_lag_ms}")
        if self.inline_below_ms < 0:
            raise ValueError(f"inline_below_ms must be >= 0 (0: never inline), got {self.inline_below_ms}")
        if not self.loop_probe_ms > 0:
            raise ValueError(f"loop_probe_ms must be > 0, got {self.loop_probe_ms}")
        if not 0 < self.inline_max_loop_busy <= 1:
            raise ValueError(f"inline_max_loop_busy must be in (0, 1], got {self.inline_max_loop_busy}")


def _remote(batch: list[_Job]) -> Any:
    """The compute process a batch runs its tower and search in, or None: in this process (a Score, an engine
    without one or whose process is gone, an engine that fuses users' feature vectors between the two)."""
    job = batch[0]
    proc = getattr(job.engine, "compute_process", None)  # engines of unit tests may lack it
    if job.call is not None or proc is None or not proc.alive or getattr(job.engine, "users", None) is not None:
        return None
    return proc


@dataclass(slots=True)
class _Job:
    engine: Engine
    deadline: float | None            # time.monotonic() deadline, None = no deadline
    future: asyncio.Future
    query: RecommendQuery | None = None          # batched Recommend
    call: Callable[[], Any] | None = None        # anything else, run alone (Score)
    cost_s: float = 0.0                          # predicted compute time, part of the queued work
    span: Any = None                             # the request's recording span (tracing on and sampled)
    admitted_at: float = 0.0                     # perf_counter() at admission (traced jobs only)
    queued_at: float = 0.0                       # monotonic() at admission: its wait when taken


@dataclass(slots=True)
class _Timing:
    """A batch's times on the compute thread (perf_counter) and, traced, its stage seconds (None: not its own)."""
    start: float = 0.0
    end: float = 0.0
    stages: tuple[float, ...] | None = None


COMPUTE_THREAD_NAME = "lt-compute"  # the compute thread's OS name (/proc/PID/task/TID/comm): CPU accounting


class MicroBatcher:
    def __init__(self, config: BatchingConfig, tracing: Tracing = TRACING_OFF) -> None:
        self.config = config
        self._tracer = tracing.tracer  # None: tracing off, one check per request
        self._tracing = tracing
        self._queue: deque[_Job] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine", initializer=name_os_thread,
                                            initargs=(COMPUTE_THREAD_NAME,))
        self._worker: asyncio.Task | None = None
        # The loop's lag (max_loop_lag_ms) and busy share (inline_max_loop_busy), measured each BUSY_WINDOW_S
        self._watch = LoopWatch(config.loop_probe_ms, self._window_closed)
        self._per_item_s = 0.001  # EWMA of compute time per job (any engine): a new engine's first guess
        # Per engine (stable and canary differ): EWMA of compute time per job. Admission predicts a new
        # job's wait as the queued work ahead of it, so a slow canary's jobs count at their own cost.
        self._engine_cost_s: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._queued_s = 0.0      # sum of the queued jobs' cost_s
        self._running_until = 0.0  # predicted end of the batch being computed (time.perf_counter())
        self._above_since: float | None = None  # monotonic() since when every job taken waited > max_queue_delay_ms
        self._stands_until = 0.0  # monotonic(): a queue that stood counts as standing until then (hysteresis)
        self.shed_by_reason = dict.fromkeys(SHED_REASONS, 0)  # requests shed, by the bound that shed them
        self.expired = 0
        self.batches = 0
        self.batched_queries = 0
        self.inline = 0           # Recommend requests computed on the event loop
        self._computing = False   # a batch is on the compute thread
        self.loop_busy = 0.0      # the loop's own share of a core in the last window, inline compute not counted
        self.inline_demand = 0.0  # ... and the share the window's Recommends would have added, computed inline
        self._inline_ok = False   # their sum is below the bound (False until a window is measured)

    @property
    def shed(self) -> int:
        return sum(self.shed_by_reason.values())

    def _shed(self, reason: str, message: str) -> Overloaded:
        self.shed_by_reason[reason] += 1
        return Overloaded(message, reason)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._worker = loop.create_task(self._run())
        if self.config.max_loop_lag_ms > 0 or self.config.inline_below_ms > 0:
            self._watch.start()

    async def stop(self) -> None:
        tasks = [t for t in (self._worker, self._watch.task) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for job in self._queue:
            if not job.future.done():
                job.future.set_exception(self._shed("shutdown", "server is shutting down"))
        self._queue.clear()
        self._executor.shutdown(wait=True)

    def _window_closed(self, loop_busy: float, recommends_per_s: float) -> None:
        """The inline bound, as of the window LoopWatch just closed."""
        self.loop_busy = loop_busy
        self.inline_demand = recommends_per_s * self._per_item_s
        self._inline_ok = self.loop_busy + self.inline_demand < self.config.inline_max_loop_busy

    @property
    def loop_lag_s(self) -> float:
        """How far behind the event loop runs (LoopWatch.lag_s)."""
        return self._watch.lag_s

    def _admit(self, job: _Job) -> asyncio.Future:
        if self._tracer is None:
            return self._admit_untraced(job)
        span = self._tracing.current_span()
        if not span.is_recording():
            return self._admit_untraced(job)
        depth = len(self._queue)
        job.span, job.admitted_at = span, time.perf_counter()
        try:
            fut = self._admit_untraced(job)
        except Overloaded as e:
            span.add_event("shed", {"reason": str(e), "queue.depth": depth})
            raise
        span.add_event("admitted", {"queue.depth": depth, "job.predicted_compute_ms": job.cost_s * 1e3})
        return fut

    def _admit_untraced(self, job: _Job) -> asyncio.Future:
        cfg = self.config
        depth = len(self._queue)
        if depth >= cfg.max_queue:
            raise self._shed("queue_full", f"server overloaded: {depth} requests queued (limit {cfg.max_queue}); "
                             "retry with back-off")
        if cfg.max_loop_lag_ms and self.loop_lag_s * 1e3 > cfg.max_loop_lag_ms:
            raise self._shed("loop_lag", f"server overloaded: the event loop is {self.loop_lag_s * 1e3:.1f} ms "
                             f"behind (limit {cfg.max_loop_lag_ms:g} ms, max_loop_lag_ms); retry with back-off")
        job.cost_s = self._engine_cost_s.get(job.engine, self._per_item_s)
        # Predicted wait for the compute thread: the queued work plus what is left of the running batch.
        ahead = self._queued_s + max(0.0, self._running_until - time.perf_counter())
        if ahead * 1e3 > cfg.max_queue_delay_ms:
            standing = self.queue_standing
            burst_ms = max(cfg.burst_queue_delay_ms, cfg.max_queue_delay_ms)
            if standing:  # shedding keeps the admitted waits within the target: the shed itself says it stands
                self._stands_until = time.monotonic() + cfg.standing_queue_ms / 1e3
            if standing or ahead * 1e3 > burst_ms:
                limit, field = ((cfg.max_queue_delay_ms, "max_queue_delay_ms, the queue standing") if standing
                                else (burst_ms, "burst_queue_delay_ms"))
                raise self._shed("queue_delay", f"server overloaded: about {ahead * 1e3:.1f} ms of queued work "
                                 f"(limit {limit:g} ms, {field}); retry with back-off")
        if job.deadline is not None and time.monotonic() + ahead + job.cost_s > job.deadline:
            raise self._shed("deadline", f"server overloaded: about {(ahead + job.cost_s) * 1e3:.1f} ms of queued "
                             "work exceeds the request's deadline; retry with back-off")
        if job.query is not None:
            self._watch.recommends += 1
            if self._runs_inline(job):
                self._compute_inline(job)
                return job.future
        job.queued_at = time.monotonic()
        self._queue.append(job)
        self._queued_s += job.cost_s
        self._wakeup.set()
        return job.future

    @property
    def queue_standing(self) -> bool:
        """The queue stands: every job taken for standing_queue_ms waited over max_queue_delay_ms, and since then
        it has not gone standing_queue_ms without such a stretch or a shed for standing."""
        window_s = self.config.standing_queue_ms / 1e3
        now = time.monotonic()
        if not window_s or self._stands_until > now:
            return True
        return self._above_since is not None and now - self._above_since >= window_s

    def _note_waits(self, batch: list[_Job], now: float) -> None:
        """CoDel's rule on the batch just taken: a queue stands once every job taken for standing_queue_ms waited
        over the target, and keeps standing until none has for as long (hysteresis: past capacity the queue
        drains now and then between batches, and leaving at once re-admitted a burst's worth each time)."""
        window_s = self.config.standing_queue_ms / 1e3
        if not window_s:  # off: the queue always stands
            return
        if min(now - j.queued_at for j in batch) * 1e3 <= self.config.max_queue_delay_ms:
            self._above_since = None
        else:
            if self._above_since is None:
                self._above_since = now
            if now - self._above_since >= window_s:
                self._stands_until = now + window_s

    def _runs_inline(self, job: _Job) -> bool:
        """Cheap enough to compute right here: an engine measured (an unmeasured one might be slow and would
        stall the loop) below inline_below_ms per request, with the compute thread idle, nothing queued, and the
        loop able to carry the compute (inline_max_loop_busy, as of the last window)."""
        limit_s = self.config.inline_below_ms / 1e3
        measured = self._engine_cost_s.get(job.engine)
        return (limit_s > 0 and self._inline_ok and not self._queue and not self._computing
                and measured is not None and measured < limit_s)

    def _compute_inline(self, job: _Job) -> None:
        t0 = time.perf_counter()
        timing = _Timing() if job.span is not None else None
        try:
            result = (self._compute([job]) if timing is None else self._compute_timed([job], timing))[0]
        except Exception as e:  # noqa: BLE001 - the request's error, as on the compute thread
            job.future.set_exception(e)
            return
        elapsed = time.perf_counter() - t0
        self._watch.inline_s += elapsed
        self._learn_cost(job.engine, elapsed)
        if timing is not None:
            self._trace_batch([job], timing, inline=True)
        self.inline += 1
        job.future.set_result(result)

    def _learn_cost(self, engine: Engine, per_item: float) -> None:
        first = not self.batches and not self.inline  # the first measurement replaces the 1 ms guess
        self._per_item_s = per_item if first else 0.9 * self._per_item_s + 0.1 * per_item
        old = self._engine_cost_s.get(engine)
        self._engine_cost_s[engine] = per_item if old is None else 0.8 * old + 0.2 * per_item

    async def recommend(self, engine: Engine, query: RecommendQuery, deadline: float | None) -> Ranked:
        fut = asyncio.get_running_loop().create_future()
        return await self._admit(_Job(engine=engine, deadline=deadline, future=fut, query=query))

    async def run(self, engine: Engine, call: Callable[[], Any], deadline: float | None) -> Any:
        fut = asyncio.get_running_loop().create_future()
        return await self._admit(_Job(engine=engine, deadline=deadline, future=fut, call=call))

    def _take(self) -> list[_Job]:
        """Pop the next job, plus queued Recommend jobs on the same engine (up to max_batch). Jobs on
        another engine (a canary's users) are passed over, not a batch boundary, so a canary does not
        shrink every batch."""
        now = time.monotonic()
        batch: list[_Job] = []
        passed: list[_Job] = []
        while self._queue and len(batch) < self.config.max_batch:
            job = self._queue.popleft()
            if job.future.done():  # cancelled by the client
                self._queued_s -= job.cost_s
                continue
            if job.deadline is not None and job.deadline < now:
                self._queued_s -= job.cost_s
                self.expired += 1
                job.future.set_exception(DeadlineExpired("deadline passed while queued"))
                continue
            if not batch:
                batch.append(job)
                if job.call is not None:
                    break
            elif job.call is None and job.engine is batch[0].engine:
                batch.append(job)
            else:
                passed.append(job)
        self._queue.extendleft(reversed(passed))  # back at the front, in their order
        if batch:
            self._note_waits(batch, now)
        self._queued_s = max(0.0, self._queued_s - sum(j.cost_s for j in batch)) if self._queue else 0.0
        return batch

    @staticmethod
    def _compute(batch: list[_Job]) -> list[Any]:
        if batch[0].call is not None:
            return [batch[0].call()]
        return batch[0].engine.recommend_batch([j.query for j in batch])

    async def _compute_remote(self, batch: list[_Job], timing: _Timing) -> list[Any]:
        """A Recommend batch whose tower and search run in the engine's compute process, awaited on the event loop.
        If the process fails it (or is gone), the batch is computed on the compute thread instead: nothing is lost."""
        timing.start = time.perf_counter()
        try:
            results, timing.stages = await recommend_batch_remote(batch[0].engine, [j.query for j in batch])
        except ComputeProcessError as e:
            log.warning("a batch of %d computed in the server process: %s", len(batch), e)
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._compute_clocked,
                                                                     batch, timing)
        timing.end = time.perf_counter()
        return results

    @classmethod
    def _compute_clocked(cls, batch: list[_Job], timing: _Timing) -> list[Any]:
        """_compute, noting its start and end on the compute thread."""
        timing.start = time.perf_counter()
        try:
            return cls._compute(batch)
        finally:
            timing.end = time.perf_counter()

    @classmethod
    def _compute_timed(cls, batch: list[_Job], timing: _Timing) -> list[Any]:
        """_compute, noting its start and end and the stage seconds the engine's clock gained meanwhile. The
        clock is shared (the canary's shadow scoring adds to it from another thread): the stages count as
        this batch's only when the clock gained exactly one batch."""
        clock = batch[0].engine.clock
        before = (clock.batches, *clock.seconds.values()) if clock is not None else None
        try:
            return cls._compute_clocked(batch, timing)
        finally:
            if before is not None and batch[0].call is None and clock.batches == before[0] + 1:
                timing.stages = tuple(b - a for a, b in zip(before[1:], clock.seconds.values()))

    def _trace_batch(self, batch: list[_Job], timing: _Timing, *, inline: bool = False) -> None:
        """The traced jobs' batch.wait and engine.compute spans, from the times the compute thread noted."""
        to_ns = time.time_ns() - time.perf_counter_ns()  # perf_counter -> epoch ns
        start_ns, end_ns = int(timing.start * 1e9) + to_ns, int(timing.end * 1e9) + to_ns
        attrs: dict[str, Any] = {"batch.size": len(batch), "livetower.engine_version": str(batch[0].engine.version),
                                 "batch.inline": inline}
        if timing.stages is not None:
            attrs.update({f"stage.{name}_ms": s * 1e3 for name, s in zip(STAGES, timing.stages)})
        name = "engine.compute" if batch[0].call is None else "engine.call"
        for job in batch:
            if job.span is None:
                continue
            if not inline:
                child_span(self._tracer, job.span, "batch.wait", int(job.admitted_at * 1e9) + to_ns, start_ns)
            child_span(self._tracer, job.span, name, start_ns, end_ns, attrs)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._above_since = None  # drained: nothing waited through the last batch
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.config.max_delay_ms > 0 and len(self._queue) < self.config.max_batch:
                await asyncio.sleep(self.config.max_delay_ms / 1e3)
            batch = self._take()
            if not batch:
                continue
            self._running_until = time.perf_counter() + sum(j.cost_s for j in batch)
            self._computing = True
            traced = self._tracer is not None and any(j.span is not None for j in batch)
            timing = _Timing()
            try:
                if _remote(batch) is not None:
                    results = await self._compute_remote(batch, timing)
                else:
                    results = await loop.run_in_executor(self._executor, self._compute_timed if traced
                                                         else self._compute_clocked, batch, timing)
            except Exception as e:  # noqa: BLE001 - fail the batch's requests, keep the worker alive
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            finally:
                # Done early or late, nothing runs now: a stale prediction must not shed new requests.
                self._computing, self._running_until = False, 0.0
            # The cost is the compute thread's own time, not the wait for the event loop to take the result
            # back: a lagging loop (its own shed signal) must not make every later request look expensive.
            self._learn_cost(batch[0].engine, (timing.end - timing.start) / len(batch))
            self.batches += 1
            self.batched_queries += len(batch)
            if traced:
                self._trace_batch(batch, timing)
            for job, result in zip(batch, results):
                if not job.future.done():
                    job.future.set_result(result)
