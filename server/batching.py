"""Dynamic micro-batching with admission control, between the servicers and the engine.

Requests queue here; one worker runs them on a dedicated compute thread, so the event loop keeps
accepting and (de)serialising while the engine works. Whatever queued while the last batch ran
is taken together (up to max_batch, after waiting up to max_delay_ms for more): under light load
a request runs alone at once, under heavy load batches grow and amortise the user tower and the
scoring pass. Past capacity requests are shed quickly instead of queueing without bound:
- the queue holds at most max_queue requests; beyond that: Overloaded at once;
- a request whose deadline cannot be met given the queue ahead of it is shed at admission;
- a request whose deadline passed while queued is dropped, not computed.
Engine-agnostic and grpc-free: the servicer maps the exceptions onto status codes.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from server.engine.engine import Engine, Ranked, RecommendQuery


class Overloaded(Exception):
    """Shed: the queue is full or the deadline cannot be met. Retry with back-off."""


class DeadlineExpired(Exception):
    """The request's deadline passed while it waited."""


@dataclass(kw_only=True, frozen=True, slots=True)
class BatchingConfig:
    max_batch: int = 32          # Recommend queries per user-tower call
    max_delay_ms: float = 0.0    # extra wait for a batch to fill (0: take what queued while busy)
    max_queue: int = 512         # queued requests beyond which new ones are shed

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch <= 256:
            raise ValueError(f"max_batch must be in 1..256 (the engines' batch bound), got {self.max_batch}")
        if self.max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be >= 0, got {self.max_delay_ms}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")


@dataclass(slots=True)
class _Job:
    engine: Engine
    deadline: float | None            # time.monotonic() deadline, None = no deadline
    future: asyncio.Future
    query: RecommendQuery | None = None          # batched Recommend
    call: Callable[[], Any] | None = None        # anything else, run alone (Score)


class MicroBatcher:
    def __init__(self, config: BatchingConfig) -> None:
        self.config = config
        self._queue: deque[_Job] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._worker: asyncio.Task | None = None
        self._per_item_s = 0.001  # EWMA of compute time per queued job, for deadline admission
        self.shed = 0
        self.expired = 0
        self.batches = 0
        self.batched_queries = 0

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._worker:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        for job in self._queue:
            if not job.future.done():
                job.future.set_exception(Overloaded("server is shutting down"))
        self._queue.clear()
        self._executor.shutdown(wait=True)

    def _admit(self, job: _Job) -> asyncio.Future:
        depth = len(self._queue)
        if depth >= self.config.max_queue:
            self.shed += 1
            raise Overloaded(f"server overloaded: {depth} requests queued (limit {self.config.max_queue}); "
                             "retry with back-off")
        if job.deadline is not None:
            wait = (depth + 1) * self._per_item_s
            if time.monotonic() + wait > job.deadline:
                self.shed += 1
                raise Overloaded(f"server overloaded: about {wait * 1e3:.1f} ms of queued work exceeds the "
                                 "request's deadline; retry with back-off")
        self._queue.append(job)
        self._wakeup.set()
        return job.future

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
                continue
            if job.deadline is not None and job.deadline < now:
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
        return batch

    @staticmethod
    def _compute(batch: list[_Job]) -> list[Any]:
        if batch[0].call is not None:
            return [batch[0].call()]
        return batch[0].engine.recommend_batch([j.query for j in batch])

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.config.max_delay_ms > 0 and len(self._queue) < self.config.max_batch:
                await asyncio.sleep(self.config.max_delay_ms / 1e3)
            batch = self._take()
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._compute, batch)
            except Exception as e:  # noqa: BLE001 - fail the batch's requests, keep the worker alive
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            per_item = (time.perf_counter() - t0) / len(batch)
            self._per_item_s = 0.9 * self._per_item_s + 0.1 * per_item
            self.batches += 1
            self.batched_queries += len(batch)
            for job, result in zip(batch, results):
                if not job.future.done():
                    job.future.set_result(result)
