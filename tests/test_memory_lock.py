"""server/memory_lock.py: mlockall only where it cannot make later allocations fail."""

from __future__ import annotations

import resource

import server.memory_lock as memory_lock
from livetower.cli import build_parser


def test_no_lock_with_a_finite_memlock_limit_and_no_capability(monkeypatch):
    calls = []
    monkeypatch.setattr(memory_lock.resource, "getrlimit", lambda what: (64 << 10, 64 << 10))
    monkeypatch.setattr(memory_lock, "_has_ipc_lock", lambda: False)
    monkeypatch.setattr(memory_lock.ctypes, "CDLL", lambda *a, **k: calls.append(a))
    said = memory_lock.lock_memory()
    assert said.startswith("not locked: RLIMIT_MEMLOCK is 65536 bytes") and "ulimit -l unlimited" in said
    assert calls == []  # mlockall never called


def test_the_capability_bit_is_read_from_proc():
    with open("/proc/self/status") as f:
        eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    assert memory_lock._has_ipc_lock() == bool(eff >> memory_lock.CAP_IPC_LOCK & 1)


def test_serve_takes_the_flag_off_by_default():
    from server.config import ServerConfig

    p = build_parser()
    assert p.parse_args(["serve", "--data-dir", "/tmp/x"]).lock_memory is None  # not given: the dataclass default
    assert ServerConfig.__dataclass_fields__["lock_memory"].default is False
    assert p.parse_args(["serve", "--data-dir", "/tmp/x", "--lock-memory"]).lock_memory is True
    assert resource.RLIMIT_MEMLOCK  # the limit the check reads exists here
