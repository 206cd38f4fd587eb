"""The worker side of `livetower bench load`: one spawned process with its own event loop and channels,
firing its share of the open-loop schedule and sending HdrHistograms back to the parent (loadgen.py)."""

from __future__ import annotations

import asyncio
import gc
import math
import time
import traceback
from collections import Counter
from typing import TYPE_CHECKING

from benchmarks import report
from benchmarks.workload import KINDS, KindPicker, make_workload, schedule

if TYPE_CHECKING:
    from benchmarks.loadgen import LoadConfig


class _Recorder:
    """Histograms and counters of one worker. Times are seconds since the run start (warm-up begins at 0)."""

    def __init__(self, cfg: LoadConfig):
        self.lo = cfg.warmup_s
        self.hi = cfg.warmup_s + cfg.duration_s
        self.ok = report.new_hist()
        self.all = report.new_hist()
        self.lag = report.new_hist()
        self.interval = report.new_hist()
        self.scheduled = 0
        self.ok_in_window = 0
        self.errors: Counter = Counter()
        self.kinds = {n: {"count": 0, "ok": 0, "errors": Counter(), "hist": report.new_hist()}
                      for n, _ in cfg.mix}
        self.seconds: dict[int, dict] = {}
        self.sent_total = self.ok_total = self.err_total = 0

    def _sec(self, t: float) -> dict:
        s = math.floor(t - self.lo)
        b = self.seconds.get(s)
        if b is None:
            b = self.seconds[s] = {"hist": None, "sent": 0, "ok": 0, "errors": 0}
        return b

    def scheduled_at(self, kind: str, t_sched: float) -> None:
        self._sec(t_sched)["sent"] += 1
        if self.lo <= t_sched < self.hi:
            self.scheduled += 1
            self.kinds[kind]["count"] += 1

    def sent(self, lag_s: float) -> None:
        self.sent_total += 1
        report.record_us(self.lag, lag_s)

    def done(self, kind: str, t_sched: float, t_done: float, code: str) -> None:
        """One request finished (code "OK", a gRPC status name, or a CLIENT_* code; t_done None: never sent)."""
        lat = t_done - t_sched
        b = self._sec(t_done)
        measured = self.lo <= t_sched < self.hi
        if code == "OK":
            self.ok_total += 1
            b["ok"] += 1
            if b["hist"] is None:
                b["hist"] = report.new_hist()
            report.record_us(b["hist"], lat)
            report.record_us(self.interval, lat)
            if self.lo <= t_done < self.hi:
                self.ok_in_window += 1
        else:
            self.err_total += 1
            b["errors"] += 1
        if not measured:
            return
        k = self.kinds[kind]
        if code == "OK":
            report.record_us(self.ok, lat)
            report.record_us(self.all, lat)
            k["ok"] += 1
            report.record_us(k["hist"], lat)
        else:
            if code != "CLIENT_OVERLOAD":
                report.record_us(self.all, lat)
            self.errors[code] += 1
            k["errors"][code] += 1

    def take_interval(self) -> bytes:
        blob = self.interval.encode() if self.interval.get_total_count() else b""
        self.interval.reset()
        return blob

    def export(self, uvloop: bool) -> dict:
        enc = lambda h: h.encode() if h is not None and h.get_total_count() else b""  # noqa: E731
        return {
            "uvloop": uvloop, "ok": enc(self.ok), "all": enc(self.all), "lag": enc(self.lag),
            "scheduled": self.scheduled, "ok_in_window": self.ok_in_window, "sent_total": self.sent_total,
            "errors": dict(self.errors),
            "kinds": {n: {"count": k["count"], "ok": k["ok"], "errors": dict(k["errors"]), "hist": enc(k["hist"])}
                      for n, k in self.kinds.items()},
            "seconds": {s: {**b, "hist": enc(b["hist"])} for s, b in self.seconds.items()},
        }


async def _worker_async(cfg: LoadConfig, idx: int, q, start_event, start_value, uvloop: bool) -> None:
    import grpc
    import numpy as np

    loop = asyncio.get_running_loop()
    wl = make_workload(users=cfg.users, zipf_s=cfg.zipf_s, items=cfg.items, item_prefix=cfg.item_prefix,
                       history_len=cfg.history_len, k=cfg.k, exclude_seen=cfg.exclude_seen,
                       score_candidates=cfg.score_candidates, seed=cfg.seed)
    picker = KindPicker(cfg.mix)
    from contracts.tls import RECOMMENDER_SERVICE, aio_channel

    channels = [aio_channel(cfg.target, cfg.tls, options=[
        ("grpc.use_local_subchannel_pool", 1), ("livetower.loadgen_channel", idx * 1000 + c),
        ("grpc.max_receive_message_length", 64 << 20)],
        health_service=RECOMMENDER_SERVICE if cfg.healthy_only else None) for c in range(cfg.channels)]
    try:
        for ch in channels:
            try:
                await asyncio.wait_for(ch.channel_ready(), cfg.connect_timeout_s)
            except asyncio.TimeoutError:
                raise ConnectionError(f"worker {idx}: no connection to {cfg.target} in "
                                      f"{cfg.connect_timeout_s:g} s") from None
        calls = [{name: KINDS[name].bind(ch) for name in picker.names} for ch in channels]
        rec = _Recorder(cfg)
        gc.freeze()  # set-up objects (workload tables, channels) leave the GC's scans: fewer, shorter pauses
        q.put(("ready", idx, None))
        if not await loop.run_in_executor(None, start_event.wait, 120.0):
            raise TimeoutError(f"worker {idx}: no start signal")
        base = time.monotonic() + (start_value.value - time.time())  # monotonic time of offset 0
        cpu0 = time.process_time()  # this worker's CPU (all its threads, gRPC core's too) from here to the end
        deadline_s = cfg.deadline_ms / 1e3
        metadata = cfg.metadata or None
        inflight: set[asyncio.Task] = set()
        finished = False

        async def one(call, req, kind: str, t_sched: float) -> None:
            rec.sent(time.monotonic() - base - t_sched)
            try:
                await call(req, timeout=deadline_s, metadata=metadata)
                code = "OK"
            except grpc.aio.AioRpcError as e:
                code = e.code().name
            except asyncio.CancelledError:
                code = "CLIENT_DRAIN_TIMEOUT"
            except Exception as e:  # noqa: BLE001 - counted, never fatal to the run
                code = f"CLIENT_{type(e).__name__}"
            rec.done(kind, t_sched, time.monotonic() - base, code)

        async def progress() -> None:
            while not finished:
                await asyncio.sleep(1.0)
                q.put(("progress", idx, {"t": time.monotonic() - base, "sent": rec.sent_total, "ok": rec.ok_total,
                                         "errors": rec.err_total, "inflight": len(inflight),
                                         "interval": rec.take_interval()}))

        prog = loop.create_task(progress()) if cfg.progress else None
        srng = np.random.default_rng([cfg.seed, idx, 1])
        rrng = np.random.default_rng([cfg.seed, idx, 2])
        nch = len(channels)
        cap = max(1, cfg.max_inflight // cfg.procs)
        n = 0
        for t_sched in schedule(cfg.rate / cfg.procs, cfg.warmup_s + cfg.duration_s, cfg.arrival, srng,
                                phase_s=idx / cfg.rate):
            kind = picker(rrng)
            req = KINDS[kind].make(rrng, wl)  # built before its send time, off the critical path when idle
            call = calls[n % nch][kind]
            n += 1
            delay = base + t_sched - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif n % 16 == 0:
                await asyncio.sleep(0)  # behind schedule: still let completions run
            rec.scheduled_at(kind, t_sched)
            if len(inflight) >= cap:
                rec.done(kind, t_sched, time.monotonic() - base, "CLIENT_OVERLOAD")
                continue
            task = loop.create_task(one(call, req, kind, t_sched))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        if inflight:
            _, pending = await asyncio.wait(set(inflight), timeout=deadline_s + 2.0)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        finished = True
        if prog is not None:
            prog.cancel()
        q.put(("done", idx, {**rec.export(uvloop), "cpu_s": time.process_time() - cpu0}))
    finally:
        for ch in channels:
            await ch.close()


def worker_entry(cfg: LoadConfig, idx: int, q, start_event, start_value) -> None:
    try:
        use_uv = False
        if cfg.use_uvloop:
            try:
                import uvloop

                use_uv = True
            except ImportError:
                pass
        coro = _worker_async(cfg, idx, q, start_event, start_value, use_uv)
        if use_uv:
            uvloop.run(coro)
        else:
            asyncio.run(coro)
    except BaseException:  # noqa: BLE001 - reported to the parent
        q.put(("error", idx, traceback.format_exc()))
