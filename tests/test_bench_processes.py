"""benchmarks/processes.py's stop_server stops what a benchmark started, in a process group of its own or not."""

from __future__ import annotations

import subprocess
import sys
import time

from benchmarks.processes import stop_server

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
IGNORES_TERM = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                      "print('ready', flush=True); time.sleep(60)"]


def test_a_process_outside_a_group_of_its_own_is_stopped_too():
    for session in (True, False):  # spawn() started servers without a session: killpg found no group
        proc = subprocess.Popen(SLEEPER, start_new_session=session)
        t0 = time.monotonic()
        stop_server(proc, grace_s=5)
        assert proc.poll() is not None and time.monotonic() - t0 < 5


def test_one_that_ignores_sigterm_is_killed_after_the_grace():
    proc = subprocess.Popen(IGNORES_TERM, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    stop_server(proc, grace_s=0.5)
    assert proc.returncode == -9
    stop_server(proc)  # stopped already: nothing to do
