"""The sidecar yields the CPU to the server it sits beside.

On one host the trainer (its rounds, its DDP workers, its engine builds: all children inherit these settings)
runs at a lower CPU priority than serving: a higher nice value, the SCHED_IDLE policy and, where a cgroup CPU
controller is writable, its own cgroup, made idle (`cpu.idle`) or else given a small CPU weight (cgroup v2
`cpu.weight`, v1 `cpu.shares`); optionally a CPU cap. All but the cap only matter under contention: a trainer
alone on its machine trains at full speed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("livetower.trainer")

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(kw_only=True, frozen=True, slots=True)
class SidecarPriority:
    nice: int = 10             # added to the trainer process's nice value (0: unchanged; 19 at most)
    cpu_weight: int = 10       # CPU weight of the trainer's own cgroup against serving's default 100 (cgroup v2
                               # cpu.weight; v1: cpu.shares = weight x 1024 / 100); 0: no cgroup
    cpu_max: float = 0.0       # CPUs the trainer's cgroup may use at most, whatever is idle (cgroup v2 cpu.max, v1
                               # cpu.cfs_quota_us; 0.5 = half of one CPU); 0: no cap. Measured worse beside a 300 QPS
                               # server on 2 cores (P99 56.9 vs 57.2 ms uncapped, more shed, no round finished: docs/serving.md §7)
    cpus: int = 0              # > 0: the trainer (its threads, workers and builds) runs only on the last `cpus` CPUs
                               # it may use (sched_setaffinity), so the other CPUs' caches stay the server's; 0: any.
                               # Beside a 300 QPS server on 2 cores, 1: P99 8.4 against 11.1 ms (medians of 4
                               # interleaved pairs), the trainer at half its events/s (docs/serving.md section 7)
    cgroup: str = "livetower-trainer"  # name of that cgroup under the CPU controller's root
    idle_policy: bool = True   # Linux SCHED_IDLE for the trainer and its own cgroup (cpu.idle, where the kernel has
                               # it): a serving thread's wake-up preempts the trainer at once, which a weight alone
                               # does not do (docs/serving.md §7: beside a 300 QPS server P99 21 ms vs 35 with weight
                               # and nice only, 13.5 with no trainer). The scheduler compares the server with the
                               # cgroup, not the task inside it: SCHED_IDLE on the task alone gained nothing. False:
                               # weight and nice only
    passive_wait: bool = True  # the trainer's OpenMP threads (torch's and FAISS's libgomp) sleep when idle
                               # (OMP_WAIT_POLICY=PASSIVE, set before torch loads) instead of spinning. A two-thread
                               # OpenMP loop at SCHED_IDLE beside a 300 QPS server: P99 59-83 ms spinning, 6-10 ms
                               # passive; the real trainer's own spinning is brief (docs/serving.md section 7). An
                               # OMP_WAIT_POLICY already in the environment is kept

    def __post_init__(self) -> None:
        if not 0 <= self.nice <= 19:
            raise ValueError(f"SidecarPriority.nice must be in 0..19, got {self.nice}")
        if not (self.cpu_weight == 0 or 1 <= self.cpu_weight <= 10_000):
            raise ValueError(f"SidecarPriority.cpu_weight must be 0 (off) or in 1..10000, got {self.cpu_weight}")
        if self.cpu_max < 0 or (self.cpu_max and self.cpu_weight == 0):
            raise ValueError(f"SidecarPriority.cpu_max must be >= 0 and needs the cgroup (cpu_weight > 0), got "
                             f"{self.cpu_max}")
        if self.cpus < 0:
            raise ValueError(f"SidecarPriority.cpus must be >= 0 (0: any CPU), got {self.cpus}")
        if not self.cgroup or "/" in self.cgroup:
            raise ValueError(f"SidecarPriority.cgroup must be a plain name, got {self.cgroup!r}")


def _cpu_controller(root: Path) -> tuple[Path, str] | None:
    """(the CPU controller's root, "v2" | "v1"), or None when neither is mounted writable."""
    controllers = root / "cgroup.controllers"
    if controllers.is_file() and "cpu" in controllers.read_text().split():
        return root, "v2"
    if (root / "cpu" / "cpu.shares").is_file():
        return root / "cpu", "v1"
    return None


def join_cgroup(p: SidecarPriority, pid: int, root: Path = CGROUP_ROOT) -> str:
    """Move `pid` into a cgroup of weight p.cpu_weight (or an idle one: p.idle_policy), capped at p.cpu_max CPUs;
    what was done, or why not."""
    found = _cpu_controller(root)
    if found is None:
        return "no cgroup CPU controller found"
    base, version = found
    group = base / p.cgroup
    try:
        group.mkdir(exist_ok=True)
        # Every setting is written at every start, "none" too: the cgroup outlives the process that set it.
        period_us = 100_000
        quota_us = max(1_000, round(p.cpu_max * period_us)) if p.cpu_max else None
        idle = group / "cpu.idle"  # Linux >= 5.15; an idle cgroup refuses a weight, so it is cleared first
        idle_group = p.idle_policy and idle.is_file()
        if idle.is_file() and not idle_group:
            idle.write_text("0")
        if not idle_group:
            if version == "v2":
                (group / "cpu.weight").write_text(str(p.cpu_weight))
            else:
                (group / "cpu.shares").write_text(str(max(2, p.cpu_weight * 1024 // 100)))
        else:
            idle.write_text("1")
        if version == "v2":
            (group / "cpu.max").write_text(f"{quota_us or 'max'} {period_us}")
        else:
            (group / "cpu.cfs_period_us").write_text(str(period_us))
            (group / "cpu.cfs_quota_us").write_text(str(quota_us or -1))
        (group / "cgroup.procs").write_text(str(pid))
    except OSError as e:
        return f"cgroup {group} not usable ({e.strerror})"
    cap = f", at most {p.cpu_max:g} CPU" if p.cpu_max else ""
    if idle_group:
        return f"cgroup {group} ({version}, idle{cap})"
    return f"cgroup {group} ({version}, weight {p.cpu_weight}{cap})"


def openmp_wait_policy(environ=None) -> str:
    """The OpenMP wait policy libgomp reads from the environment (os.environ by default), as words."""
    return (os.environ if environ is None else environ).get("OMP_WAIT_POLICY", "default (spins, then sleeps)")


def prefer_passive_openmp(p: SidecarPriority, environ: dict | None = None) -> str:
    """OMP_WAIT_POLICY=PASSIVE for this process and its children when p asks for it. libgomp reads it once, when
    it is loaded (with torch or faiss): call this before either is imported. Returns the policy in force."""
    environ = os.environ if environ is None else environ
    if p.passive_wait:
        environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return openmp_wait_policy(environ)


def lower_priority(p: SidecarPriority, root: Path = CGROUP_ROOT) -> dict:
    """Apply p to the calling process (before it starts threads or workers, so they inherit it)."""
    done = {"nice": os.nice(p.nice) if p.nice else os.nice(0)}
    done["cgroup"] = join_cgroup(p, os.getpid(), root) if p.cpu_weight else "off"
    done["policy"] = "SCHED_OTHER"
    if p.idle_policy and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            done["policy"] = "SCHED_IDLE"
        except OSError as e:
            done["policy"] = f"SCHED_OTHER (SCHED_IDLE refused: {e.strerror})"
    done["cpus"] = confine_to_last_cpus(p.cpus) if p.cpus else "any"
    done["openmp_wait"] = openmp_wait_policy()
    log.info("sidecar priority: nice %d, %s, %s, CPUs %s, OpenMP wait %s", done["nice"], done["cgroup"], done["policy"],
             done["cpus"], done["openmp_wait"])
    return done


def confine_to_last_cpus(n: int) -> str:
    """Restrict every thread of this process (and what it starts later) to the last n CPUs it may use; the CPUs
    kept, as text. Fewer CPUs allowed than n: unchanged."""
    allowed = sorted(os.sched_getaffinity(0))
    if n >= len(allowed):
        return f"any ({len(allowed)} allowed, {n} asked)"
    keep = set(allowed[-n:])
    for tid in os.listdir("/proc/self/task"):  # threads started already (torch's, logging's) too
        try:
            os.sched_setaffinity(int(tid), keep)
        except ProcessLookupError:  # the thread ended meanwhile
            pass
    return ",".join(map(str, sorted(keep)))
