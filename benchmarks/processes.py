"""The processes a benchmark starts beside its load: `livetower serve` (or a peer serving the same engine), the
trainer beside the server, the OTLP sink of traced runs; each in its own process group, stopped with SIGTERM then
SIGKILL. Used by `livetower bench slo` (benchmarks/slo.py) and the other benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from benchmarks.server_cpu import metrics_text
from proto import livetower_v1_pb2 as pb
from proto import livetower_v1_pb2_grpc as pb_grpc

# gRPC metadata a peer's ingress needs on every request (Ray Serve routes by application name).
PEER_METADATA = {"ray": (("application", "livetower"),)}
# The module each peer runs as (`python -m MODULE --data-dir DIR --port P [flags]`, "serving gRPC on" when ready).
PEER_MODULES = {"ray": "benchmarks.ray_peer", "floor": "benchmarks.grpc_floor"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_block(n: int, tries: int = 50) -> int:
    """The first of n consecutive free ports (a `serve --workers n` metrics port p serves on p .. p+n-1)."""
    import socket

    for _ in range(tries):
        first = free_port()
        socks = []
        try:
            for p in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports in {tries} tries")


def start_server(data_dir: Path, flags: list[str], log_path: Path, metrics_port: int = -1,
                 peer: str | None = None, admin_port: int = 0) -> tuple[subprocess.Popen, int]:
    """`livetower serve` (or a peer serving the same engine) on a free port, warmed up; its own process group.
    The admin listener gets admin_port (0: any free one, so benchmark servers never collide on 50052).
    A port taken between choosing and binding (the admin listener's free port can be the metrics port just
    chosen by the caller: a 1M-item `bench slo` died so) starts it again on a new port, up to 3 times."""
    for _ in range(2):
        try:
            return _start_server(data_dir, flags, log_path, metrics_port, peer, admin_port)
        except RuntimeError:
            if "Address already in use" not in log_path.read_text():  # the log is rewritten by each try
                raise
    return _start_server(data_dir, flags, log_path, metrics_port, peer, admin_port)


def _start_server(data_dir: Path, flags: list[str], log_path: Path, metrics_port: int, peer: str | None,
                  admin_port: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    if peer is not None:
        cmd = [sys.executable, "-m", PEER_MODULES[peer], "--data-dir", str(data_dir), "--port", str(port), *flags]
    else:
        cmd = [sys.executable, "-m", "livetower", "serve", "--data-dir", str(data_dir), "--port", str(port),
               "--admin-port", str(admin_port), "--metrics-port", str(metrics_port), *flags]
    metadata = PEER_METADATA.get(peer)
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    deadline = time.monotonic() + 300
    last_error = None
    while time.monotonic() < deadline:
        if "serving gRPC on" in log_path.read_text():
            stub = pb_grpc.RecommenderStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
            while time.monotonic() < deadline:
                try:
                    for _ in range(20):  # with --workers, several connections reach every process
                        stub.Recommend(pb.RecommendRequest(user_id="warm", k=10, history=["item-1"]), timeout=5,
                                       metadata=metadata)
                    return proc, port
                except grpc.RpcError as e:
                    last_error = f"{e.code().name}: {e.details()}"
                    time.sleep(0.5)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    stop_server(proc)
    # What it said last: a CI run lost the one log that would have told why a server never answered
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
    raise RuntimeError(f"server did not start serving (exit code {proc.returncode}; the warm-up's last Recommend: "
                       f"{last_error or 'none sent'}); see {log_path}, which ends:\n{tail}")


def stop_server(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM to the process group (a peer's helper processes, a trainer's workers too), SIGKILL after grace_s. A
    process that leads no group (started without start_new_session) gets the signals itself: killpg alone would
    find no group and leave it running (three freshness-bench servers outlived their runs that way)."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            proc.send_signal(sig)
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def start_trainer(data: Path, flags: list[str], log_path: Path) -> tuple[subprocess.Popen, int]:
    """`livetower train` on data in rounds back to back (any backlog, every 2 s); ready once its metrics answer."""
    mport = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "livetower", "train", "--data-dir", str(data),
                             "--round-min-events", "100", "--round-interval-s", "2", "--trainer-metrics-port",
                             # The catalogue's synthetic events are from 2026-01-01 on, the load's are stamped now:
                             # with the item TTL the first round's watermark would evict the whole catalogue
                             # (engines of a few hundred items, each canary rolled back). Later flags override.
                             str(mport), "--item-ttl-s", "0", *flags],
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            trainer_events(mport)
            return proc, mport
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_server(proc)
                raise RuntimeError(f"trainer did not start; see {log_path}")
            time.sleep(0.5)


def trainer_events(metrics_port: int) -> float:
    """livetower_trainer_events_trained_total from the trainer's metrics endpoint."""
    return next(float(line.split()[1]) for line in metrics_text(metrics_port).splitlines()
                if line.startswith("livetower_trainer_events_trained_total "))


def start_otlp_sink(log_path: Path) -> tuple[subprocess.Popen, int, Path]:
    """benchmarks/otlp_sink.py in its own process on a free port (it counts spans, keeps none)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.otlp_sink", "--port", str(port), "--interval-s", "5"],
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    deadline = time.monotonic() + 30
    while "trace sink on" not in log_path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc, grace_s=1)
            raise RuntimeError(f"the OTLP sink did not start; see {log_path}")
        time.sleep(0.1)
    return proc, port, log_path


def stop_otlp_sink(proc: subprocess.Popen, port: int, log_path: Path) -> int:
    """SIGINT (it prints its total), then the spans it received."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        stop_server(proc, grace_s=1)
    total = [line for line in log_path.read_text().splitlines() if line.startswith("total: ")]
    return int(total[-1].split()[1]) if total else -1


def _check_stall(every_s: float, stall_s: float) -> None:
    if not every_s > stall_s > 0:
        raise ValueError(f"need every_s > stall_s > 0, got every_s={every_s:g}, stall_s={stall_s:g}")


def parse_stall(text: str) -> tuple[float, float]:
    """"EVERY_S,MS" (bench slo --stall) -> (every_s, stall_s), checked as Staller checks them."""
    try:
        every_s, stall_ms = (float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"takes EVERY_S,MS (e.g. 2,50), got {text!r}") from None
    _check_stall(every_s, stall_ms / 1e3)
    return every_s, stall_ms / 1e3


class Staller:
    """Stops a server's processes for stall_s every every_s seconds (SIGSTOP, then SIGCONT), from a thread: the
    unfriendly case of a host that pauses (a VM's vCPU descheduled, a page read back from disk, a long GC). Requests
    sent meanwhile queue in the kernel and reach the server together when it resumes. `pids`: every process that
    serves (each worker of `serve --workers N`: a host pauses them all). A context manager; `stalls` counts the
    pauses made."""

    def __init__(self, pids: int | Sequence[int], every_s: float, stall_s: float) -> None:
        _check_stall(every_s, stall_s)
        self.pids = [pids] if isinstance(pids, int) else list(pids)
        self.every_s, self.stall_s = every_s, stall_s
        self.stalls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="staller", daemon=True)

    def _signal(self, sig: int) -> bool:
        """sig to every process still there; False if one has gone (the server ended: stop pausing)."""
        alive = True
        for pid in self.pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                alive = False
        return alive

    def _run(self) -> None:
        while not self._stop.wait(self.every_s - self.stall_s):
            if not self._signal(signal.SIGSTOP):
                self._signal(signal.SIGCONT)  # none left stopped
                return
            time.sleep(self.stall_s)
            if not self._signal(signal.SIGCONT):
                return
            self.stalls += 1

    def __enter__(self) -> "Staller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
