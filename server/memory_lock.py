"""Keep the serving process's pages in RAM once touched: mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)
(`livetower serve --lock-memory`; off by default).

The case for it (a hypothesis, not shown here): a kernel that reclaims cold file pages on its own (this
machine's runs `kdamond` throughout, and /proc/vmstat counts millions of file refaults) may drop a code page the
server touches rarely (a shed warning, a canary's analysis, an engine swap); the thread faulting it back in holds
the GIL for the read, which takes long while a sidecar's checkpoint has the disk. The server took 2 major faults in
a 30 s trainer-beside run; an interleaved A/B with the trainer beside it did not separate locked from unlocked
(docs/serving.md section 7), so it is off. ONFAULT locks only what the process has touched (no start-up read of
every mapped library), and FUTURE covers what it maps later (engines).
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
