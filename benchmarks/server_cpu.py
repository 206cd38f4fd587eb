"""A server's CPU time per request, by component, from outside the process.

Per-thread CPU comes from /proc/PID/task/TID/stat (user + system ticks), grouped by thread: the main thread
runs the event loop (gRPC aio's Python side: request parse, admission, response building and serialisation,
handler Python), the compute thread (named `lt-compute`, server/batching.py) runs engine batches, gRPC's
C-core threads move bytes. Inside the compute thread, the engine's stage clock (the metrics endpoint's
`livetower_engine_stage_seconds`) splits the time into item rows, user tower, retrieval and assembly.
A server of several processes (`serve --workers N`) is sampled as the sum of its workers: each one's threads
and its own metrics endpoint (the supervisor that started them only waits, and is left out).
"""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from server.batching import COMPUTE_THREAD_NAME
from server.engine.compute_process import PROCESS_NAME as COMPUTE_PROCESS_NAME

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
GROUPS = ("event_loop", "compute", "grpc_threads", "other")


def _group(pid: int, tid: int, comm: str) -> str:
    if tid == pid:
        return "event_loop"
    if comm == COMPUTE_THREAD_NAME:
        return "compute"
    # gRPC core's own threads; since grpc 1.6x most of its work runs on EventEngine threads ("event_engine")
    if comm.startswith(("grpc", "event_engine", "default-execu", "resolver-exec", "timer_manager", "global-cq")):
        return "grpc_threads"
    return "other"


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds so far per thread group (threads that ended are lost: take both samples while it runs). The
    server's compute host (`--compute-process`: its child named lt-compute) counts as compute, all of it: the
    threads of the engines it has dropped too."""
    out = _threads_cpu_s(pid)
    for child in compute_processes(pid):
        out["compute"] += _process_cpu_s(child)
    return out


def compute_processes(pid: int) -> list[int]:
    """The compute host a server runs its engines' towers and searches in (server/engine/compute_process.py): one,
    or none; a list, as a host that died and its successor may both show for a moment."""
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children() if c.name() == COMPUTE_PROCESS_NAME]
    except psutil.Error:
        return []


def _process_cpu_s(pid: int) -> float:
    """A process's CPU seconds so far, its ended threads included (0 once it is gone)."""
    try:
        return _stat_cpu_s(Path(f"/proc/{pid}/stat").read_text())
    except OSError:
        return 0.0


def _stat_cpu_s(stat: str) -> float:
    """User + system CPU seconds from a /proc stat line (a process's or a thread's)."""
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; utime, stime are fields 14, 15
    return (int(fields[11]) + int(fields[12])) * TICK_S


def _threads_cpu_s(pid: int) -> dict[str, float]:
    out = dict.fromkeys(GROUPS, 0.0)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            comm = (task / "comm").read_text().strip()
        except OSError:
            continue  # the thread ended meanwhile
        out[_group(pid, int(task.name), comm)] += _stat_cpu_s(stat)
    return out


def metrics_text(metrics_port: int, host: str = "127.0.0.1") -> str:
    """A process's Prometheus exposition (server or trainer metrics endpoint)."""
    return urllib.request.urlopen(f"http://{host}:{metrics_port}/metrics", timeout=10).read().decode()


def scrape(metrics_port: int, host: str = "127.0.0.1") -> dict[str, float]:
    """The counters this module needs from the server's Prometheus endpoint (stage seconds, responses)."""
    text = metrics_text(metrics_port, host)
    out = {"responses": 0.0}
    for line in text.splitlines():
        if line.startswith("livetower_engine_stage_seconds_total{"):
            stage = line.split('stage="', 1)[1].split('"', 1)[0]
            out[f"stage_{stage}"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(("livetower_engine_batches_total ", "livetower_engine_batched_queries_total ")):
            out[line.split(" ")[0].removeprefix("livetower_engine_").removesuffix("_total")] = float(line.split()[1])
        elif line.startswith("livetower_responses_total{"):
            out["responses"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("livetower_shed_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[f"shed_{reason}"] = float(line.rsplit(" ", 1)[1])
    return out


def worker_pids(supervisor_pid: int) -> list[int]:
    """The server processes a `serve --workers N` supervisor started (its children), oldest first."""
    import psutil

    return [p.pid for p in sorted(psutil.Process(supervisor_pid).children(), key=lambda p: p.create_time())]


def wait_for_workers(supervisor_pid: int, n: int, first_metrics_port: int,
                     timeout_s: float = 120.0) -> tuple[list[int], list[int]]:
    """(pids, metrics ports) of a `serve --workers n` server once all n processes answer on their metrics ports
    (worker w on first_metrics_port + w, the order they were started in)."""
    ports = [first_metrics_port + w for w in range(n)]
    deadline = time.monotonic() + timeout_s
    while True:
        pids = worker_pids(supervisor_pid)
        try:
            if len(pids) == n:
                for port in ports:
                    metrics_text(port)
                return pids, ports
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(pids)} of {n} server processes answer on metrics ports {ports} after "
                               f"{timeout_s:g} s; see the server log")
        time.sleep(0.5)


class CpuSample:
    """CPU per thread group and the server's counters at one moment, summed over a server's processes (one pid
    and metrics port each)."""

    def __init__(self, pids: int | Sequence[int], metrics_ports: int | Sequence[int]) -> None:
        pids = [pids] if isinstance(pids, int) else list(pids)
        ports = [metrics_ports] if isinstance(metrics_ports, int) else list(metrics_ports)
        if len(pids) != len(ports) or not pids:
            raise ValueError(f"pids: one metrics port per process (got {len(pids)} pids, {len(ports)} ports)")
        self.threads = dict.fromkeys(GROUPS, 0.0)
        self.counters: dict[str, float] = {}
        for pid, port in zip(pids, ports):
            for g, v in thread_cpu_s(pid).items():
                self.threads[g] += v
            for k, v in scrape(port).items():
                self.counters[k] = self.counters.get(k, 0.0) + v


def shed_by_reason(before: CpuSample, after: CpuSample) -> dict[str, int]:
    """Requests the server shed between two samples, by the admission bound that shed them (nonzero only)."""
    return {k.removeprefix("shed_"): int(after.counters[k] - before.counters.get(k, 0.0)) for k in after.counters
            if k.startswith("shed_") and after.counters[k] > before.counters.get(k, 0.0)}


def per_request_ms(before: CpuSample, after: CpuSample) -> dict[str, float]:
    """CPU milliseconds per request between two samples, by component (counted by the server's responses)."""
    n = after.counters["responses"] - before.counters["responses"]
    if n <= 0:
        return {}
    d = {g: after.threads[g] - before.threads[g] for g in GROUPS}
    stages = {k: after.counters.get(k, 0.0) - before.counters.get(k, 0.0) for k in after.counters
              if k.startswith("stage_")}
    out = {"requests": n, "total": sum(d.values()) / n * 1e3}
    out.update({g: d[g] / n * 1e3 for g in GROUPS})
    out.update({k.removeprefix("stage_"): v / n * 1e3 for k, v in stages.items()})
    # The stages ran on the compute thread (batching) or, inline, on the event loop: what is left of that thread.
    host = "compute" if d["compute"] > 0 else "event_loop"
    out[f"{host}_unstaged"] = (d[host] - sum(stages.values())) / n * 1e3
    batches = after.counters.get("batches", 0.0) - before.counters.get("batches", 0.0)
    out["mean_batch"] = (after.counters.get("batched_queries", 0.0) - before.counters.get("batched_queries", 0.0)) \
        / batches if batches else 0.0
    return out
