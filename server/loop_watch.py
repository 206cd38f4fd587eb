"""How far behind and how busy the event loop runs, measured on the loop itself (grpc-free).

A timer task wakes every probe period: how late it wakes is the loop's lag (about the time a new request waits
before its handler sees it), and every window it reads the loop thread's CPU time (`time.thread_time()`, valid
because the task runs on the loop thread). The batcher sheds on the lag (max_loop_lag_ms) and computes Recommends on
the loop only while the busy share leaves room for them (inline_max_loop_busy; server/batching.py).
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Callable

LAG_DECAY_S = 0.01  # time constant of the loop-lag signal's decay
BUSY_WINDOW_S = 0.1  # how often the loop's busy share is measured (the loop thread's CPU time over the window)


class LoopWatch:
    """The probe task and what it measured. `inline_s` and `recommends` are counted by the caller (time computed on
    the loop for requests, Recommend requests admitted); each window's end calls `on_window(busy, recommends_per_s)`
    with the loop's own share of a core (that inline compute not counted) and the window's Recommend rate."""

    def __init__(self, probe_ms: float, on_window: Callable[[float, float], None]) -> None:
        self.period_s = probe_ms / 1e3
        self.on_window = on_window
        self.inline_s = 0.0   # seconds the loop computed requests (the caller adds to it)
        self.recommends = 0   # Recommend requests admitted (the caller counts them)
        self._lag_s = 0.0     # recent loop lag: the latest probe's lateness, older ones decaying
        self._due = 0.0       # when the next probe should run (monotonic); overdue = the loop is behind
        self.task: asyncio.Task | None = None  # the probe, once started

    def start(self) -> None:
        self._due = time.monotonic() + self.period_s
        self.task = asyncio.get_running_loop().create_task(self._probe())

    @property
    def lag_s(self) -> float:
        """How far behind the event loop runs: the recent probe lag, or how overdue the next probe is."""
        if self.task is None:
            return 0.0
        return max(self._lag_s, time.monotonic() - self._due)

    async def _probe(self) -> None:
        """Older lag samples decay with a 10 ms time constant, so the backlog a stall left behind is still seen
        while the loop works through it."""
        decay = math.exp(-self.period_s / LAG_DECAY_S)
        window = (time.monotonic(), time.thread_time(), self.inline_s, self.recommends)
        while True:
            self._due = time.monotonic() + self.period_s
            await asyncio.sleep(self.period_s)
            now = time.monotonic()
            self._lag_s = max(now - self._due, self._lag_s * decay, 0.0)
            if now - window[0] >= BUSY_WINDOW_S:
                window = self._close_window(window, now)

    def _close_window(self, window: tuple[float, float, float, int], now: float) -> tuple[float, float, float, int]:
        start, cpu, inline_s, recommends = window
        cpu_now, wall = time.thread_time(), now - start
        self.on_window(max(0.0, (cpu_now - cpu) - (self.inline_s - inline_s)) / wall,
                       (self.recommends - recommends) / wall)
        return now, cpu_now, self.inline_s, self.recommends
