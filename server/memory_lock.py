"""Keep the serving process's pages in RAM once touched: mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)
(`livetower serve --lock-memory`; off by default).

Why: this machine's kernel reclaims cold file pages proactively (DAMON: `kdamond` runs beside everything, and
/proc/vmstat counts millions of file refaults), so a code page the server touches rarely (a shed warning, a
canary's analysis, an engine swap) may have to come back from disk. A thread faulting it in holds the GIL for
the read, and while the sidecar's checkpoint (230 MB, fsync'd) has the disk that read takes 100 ms and more:
every request in flight waits. ONFAULT locks only what the process has touched (no start-up read of every
mapped library), and FUTURE covers what it maps later (engines).
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys

MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
CAP_IPC_LOCK = 14  # capability bit: lock memory beyond RLIMIT_MEMLOCK


def _has_ipc_lock() -> bool:
    try:
        with open("/proc/self/status") as f:
            eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return False
    return bool(eff >> CAP_IPC_LOCK & 1)


def lock_memory() -> str:
    """Lock this process's pages as they are touched; what was done, or why not (the caller logs it). Never
    with a finite RLIMIT_MEMLOCK and no CAP_IPC_LOCK: FUTURE would then make later allocations fail."""
    if not sys.platform.startswith("linux"):
        return "not locked: mlockall is Linux-only here"
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and not _has_ipc_lock():
        return (f"not locked: RLIMIT_MEMLOCK is {soft} bytes and the process lacks CAP_IPC_LOCK (raise the limit: "
                "`ulimit -l unlimited`, systemd LimitMEMLOCK=infinity; or leave --lock-memory off)")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
        return f"not locked: mlockall failed ({os.strerror(ctypes.get_errno())})"
    return "locked as touched (mlockall CURRENT | FUTURE | ONFAULT)"
