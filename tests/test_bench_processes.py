"""benchmarks/processes.py: stop_server stops what a benchmark started, in a process group of its own or not; Staller
pauses a process and always resumes it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.processes import Staller, stop_server

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


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]  # R, S, T (stopped), ...


def test_the_staller_stops_the_process_for_its_pauses_and_leaves_it_running():
    proc = subprocess.Popen(SLEEPER)
    try:
        seen = set()
        with Staller(proc.pid, every_s=0.1, stall_s=0.05) as staller:
            t_end = time.monotonic() + 0.5
            while time.monotonic() < t_end:
                seen.add(_state(proc.pid))
                time.sleep(0.005)
        assert "T" in seen and seen - {"T"}  # stopped during pauses, running (sleeping) between them
        assert 3 <= staller.stalls <= 6
        assert _state(proc.pid) != "T"  # resumed when the staller ended
    finally:
        stop_server(proc, grace_s=5)
    with pytest.raises(ValueError, match="every_s > stall_s"):
        Staller(proc.pid, every_s=0.05, stall_s=0.05)


def test_the_staller_pauses_every_process_of_a_server_together():
    """A host that pauses stops all of `serve --workers N`'s processes, not one (bench slo passes every worker)."""
    procs = [subprocess.Popen(SLEEPER) for _ in range(2)]
    try:
        both_stopped = False
        with Staller([p.pid for p in procs], every_s=0.1, stall_s=0.05) as staller:
            t_end = time.monotonic() + 0.5
            while time.monotonic() < t_end:
                both_stopped |= all(_state(p.pid) == "T" for p in procs)
                time.sleep(0.005)
        assert both_stopped and staller.stalls >= 3
        assert all(_state(p.pid) != "T" for p in procs)
    finally:
        for p in procs:
            stop_server(p, grace_s=5)


def test_the_grpc_floor_starts_as_a_peer_and_answers_a_canned_recommend(tmp_path):
    """bench slo's grpc-floor configuration: benchmarks/grpc_floor.py started like a server, k items per answer."""
    import grpc

    from benchmarks.processes import start_server, stop_server
    from proto import livetower_v1_pb2 as pb
    from proto import livetower_v1_pb2_grpc as pb_grpc

    proc, port = start_server(tmp_path, ["--k", "7"], tmp_path / "floor.log", peer="floor")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            r = pb_grpc.RecommenderStub(channel).Recommend(pb.RecommendRequest(user_id="u", k=7), timeout=10)
        assert len(r.item_ids) == len(r.scores) == 7 and r.source == "model"
    finally:
        stop_server(proc)
    assert proc.poll() is not None


def test_a_server_that_never_serves_is_reported_with_its_logs_last_lines(tmp_path):
    from benchmarks.processes import start_server

    with pytest.raises(RuntimeError, match=r"(?s)exit code 2.*none sent.*max_batch must be in 1\.\.256"):
        start_server(tmp_path, ["--max-batch", "0"], tmp_path / "server.log")
