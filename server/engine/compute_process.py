"""An engine's user tower and item search in a process beside the server's, so they run beside the event loop
without sharing its GIL.

In one server process the event loop (gRPC, validation, admission, response building) and the engine's work take
turns on one GIL: computed inline the loop carries both (~1.2 ms a Recommend on this project's 2-core machine, so
one core caps the rate), and on the compute thread every batch hands the GIL back and forth between them
(docs/serving.md section 7). With `--compute-process` a server runs one long-lived child, its compute host
(server/engine/compute_host.py), which loads each serving engine from the same verified files (tower package, item
index) and runs only the two native calls of a batch: (B, T) item rows in, the user vectors and the top k_search
of each row out. The item-row lookups before and the id mapping, exclusions and live-item merge after stay in the
server (Engine.prepare / Engine.finish), so the answers are the ones the engine computes in-process.

One host for all engines, not a process per engine: the sidecar publishes an engine every few seconds, and a new
process per engine paid Python's start and torch's import (~1.3 s of CPU) each time, beside the requests it
competed with (docs/serving.md section 7). The host imports once; each engine is a connection of its own.

Per engine, a stream socketpair whose far end the server hands the host (SCM_RIGHTS over the host's control
socket, with the engine's directory and options); over it, each message prefixed by its length ("<I"), one batch
in flight:
  start    server: the engine's manifest;  host: b"ready" + "<d" its golden parity max abs diff once loaded and
           warmed, or b"E" + why not
  request  "<iii" B, T, K + rows (B, T) int64
  reply    b"R" + "<iiidd" B, D, K, tower seconds, search seconds + u (B, D) float32 + scores (B, K) float32
           + item indices (B, K) int64;  b"E" + a UTF-8 message: the batch failed (the engine keeps serving)
Closing an engine's connection frees it in the host; closing the control socket (the server closed it, or exited:
not PR_SET_PDEATHSIG, which follows the thread that started the child, a loading thread here) ends the host.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from server.engine.engine import Engine, Ranked, RecommendQuery, drop_excluded

FRAME = struct.Struct("<I")          # the length of the message that follows
REQUEST = struct.Struct("<iii")      # B, T, K
REPLY = struct.Struct("<iiidd")      # B, D, K, tower seconds, search seconds
PROCESS_NAME = "lt-compute"          # its /proc comm: bench slo counts its CPU as the compute component
START_TIMEOUT_S = 300.0              # load + parity + warm-up of a 1M-item engine took ~60 s on 2 cores

log = logging.getLogger("livetower.engine")


class ComputeProcessError(Exception):
    """The compute process could not start, failed a batch, or is gone."""


class ComputeProcess:
    """The server's end of one engine in the compute host: a batch's rows go out and the tower's and the search's
    outputs come back, awaited on the event loop (non-blocking socket: uvloop makes any fd it watches non-blocking
    anyway). `proc` is the host process (shared by every engine it serves)."""

    def __init__(self, proc: subprocess.Popen, sock: socket.socket, version: int, parity: float) -> None:
        self.proc, self.sock, self.version = proc, sock, version
        self.parity_max_abs_diff = parity  # the host's own golden check of the files it loaded
        self.alive = True
        self._busy = False
        self._buf = bytearray(1 << 16)  # replies are read into it (one in flight: nothing follows a reply)

    async def compute(self, rows_BT: np.ndarray,
                      k_search: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
        """On the event loop: (u (B, D) float32, scores (B, K) float32, indices (B, K) int64, tower seconds, search
        seconds). One batch at a time. ComputeProcessError: the batch failed there, or the process is gone (then
        alive turns False for good)."""
        if not self.alive:
            raise ComputeProcessError(f"engine {self.version}: its compute process is gone")
        if self._busy:
            raise RuntimeError("ComputeProcess.compute: a batch is already in flight (one at a time)")
        rows_BT = np.ascontiguousarray(rows_BT, dtype=np.int64)
        loop = asyncio.get_running_loop()
        self._busy = True
        try:
            payload = REQUEST.pack(*rows_BT.shape, k_search) + rows_BT.tobytes()
            await loop.sock_sendall(self.sock, FRAME.pack(len(payload)) + payload)
            msg = await self._recv_frame(loop)
        except (OSError, EOFError) as e:
            self._gone(e)
            raise ComputeProcessError(f"engine {self.version}: its compute process is gone ({e or 'closed'}, exit "
                                      f"code {self.proc.poll()})") from e
        except BaseException:  # cancelled mid-exchange: the stream is out of step
            self._gone(RuntimeError("a batch was cancelled mid-exchange"))
            raise
        finally:
            self._busy = False
        if msg[:1] == b"E":
            raise ComputeProcessError(f"engine {self.version}: {msg[1:].decode(errors='replace')}")
        return decode_reply(msg)

    async def _recv_frame(self, loop: asyncio.AbstractEventLoop) -> bytes:
        """One reply: usually a single read (the child writes it at once), more when it arrives in pieces."""
        buf, got, need = self._buf, 0, FRAME.size
        while got < need:
            k = await loop.sock_recv_into(self.sock, memoryview(buf)[got:])
            if k == 0:
                raise EOFError("connection closed")
            got += k
            if need == FRAME.size and got >= FRAME.size:  # the length is in: read up to the frame's end
                need += FRAME.unpack_from(buf)[0]
                if len(buf) < need:  # a large batch
                    buf = self._buf = buf + bytearray(need - len(buf))
        return bytes(memoryview(buf)[FRAME.size:need])  # a copy: the buffer is the next reply's

    def poll(self) -> bool:
        """Whether the host still serves this engine: False once a batch found it gone, or once its process has
        exited (seen before a batch is sent there). Only reads: the socket is the event loop's to close."""
        return self.alive and self.proc.poll() is None

    def _gone(self, why: BaseException) -> None:
        if self.alive:
            self.alive = False
            log.error("engine %d: its compute host is gone (%s, exit code %s); its batches are computed in the "
                      "server process until a new host takes it", self.version, why or "connection closed",
                      self.proc.poll())
            self.sock.close()

    def close(self) -> None:
        """Close this engine's connection: the host frees the engine (and keeps serving the others)."""
        self.alive = False
        self.sock.close()


class ComputeHost:
    """A server's compute host: one child process, started on the first engine and again after it died, that loads
    and serves every engine the server hands it (`open`). Thread-safe: engines load on loading threads."""

    def __init__(self, *, num_threads: int, start_timeout_s: float = START_TIMEOUT_S) -> None:
        self.num_threads = num_threads          # intra-op threads of the towers and searches in the host
        self.start_timeout_s = start_timeout_s  # one engine's load, parity check and warm-up in the host
        self.proc: subprocess.Popen | None = None
        self._control: socket.socket | None = None
        self._lock = threading.Lock()
        self.starts = 0                         # host processes started so far (1 unless one died)

    def open(self, engine_dir: Path, manifest_bytes: bytes, version: int, *, graph_dir: Path | None,
             use_ann: bool) -> ComputeProcess:
        """Have the host load `engine_dir` and wait until it has loaded, checked and warmed it (blocking: a loading
        thread). ComputeProcessError: it could not; the host keeps serving the engines it has."""
        ours, theirs = socket.socketpair()
        spec = json.dumps({"engine_dir": str(engine_dir), "graph_dir": str(graph_dir) if graph_dir else None,
                           "use_ann": use_ann, "version": version}).encode()
        try:
            with self._lock:
                proc = self._handover(spec, theirs)
        finally:
            theirs.close()
        try:
            ours.settimeout(self.start_timeout_s)
            send_frame(ours, manifest_bytes)
            msg = recv_frame(ours)
        except (OSError, EOFError) as e:
            ours.close()  # a load still running there ends on the closed connection
            if isinstance(e, socket.timeout):
                raise ComputeProcessError(f"engine {version}: the compute host did not load it in "
                                          f"{self.start_timeout_s:g} s")
            raise ComputeProcessError(f"engine {version}: the compute host (pid {proc.pid}, exit code "
                                      f"{proc.poll()}) closed the connection while loading it: "
                                      f"{e or 'connection closed'}; see the server log") from e
        if not msg.startswith(b"ready"):
            ours.close()
            raise ComputeProcessError(f"engine {version}: the compute host could not load it: "
                                      f"{msg[1:].decode(errors='replace')}")
        ours.setblocking(False)
        (parity,) = struct.unpack_from("<d", msg, 5)
        return ComputeProcess(proc, ours, version, parity)

    def _handover(self, spec: bytes, theirs: socket.socket) -> subprocess.Popen:
        """Send the host an engine's spec and its end of the connection; a host that is gone is started again
        (once: a fresh host that cannot take it is an error). Under the lock."""
        for attempt in (1, 2):
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            try:
                socket.send_fds(self._control, [spec], [theirs.fileno()])
                return self.proc
            except OSError as e:
                log.error("the compute host (pid %d) is gone (%s, exit code %s)", self.proc.pid, e,
                          self.proc.poll())
                self._stop(timeout_s=5.0)
                if attempt == 2:
                    raise ComputeProcessError(f"the compute host took no engine after a restart: {e}") from e
        raise AssertionError("unreachable")

    def _start(self) -> None:
        """Start the host and wait until it has imported what engines need (blocking)."""
        self._stop(timeout_s=5.0)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # one message per engine, + its fd
        cmd = [sys.executable, "-m", "server.engine.compute_host", "--fd", str(theirs.fileno()),
               "--threads", str(self.num_threads)]
        root = Path(__file__).resolve().parents[2]  # the project root, importable in the child
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), env=env)
        theirs.close()
        try:
            ours.settimeout(self.start_timeout_s)
            hello = ours.recv(64)
        except OSError as e:
            hello = b""
            why = e
        else:
            why = "it closed the connection"
        if hello != b"ready":
            ours.close()
            proc.kill()
            proc.wait()
            raise ComputeProcessError(f"the compute host did not start ({why}, exit code {proc.returncode}); "
                                      f"see the server log")
        ours.settimeout(10.0)  # a handover is one small message: a host that cannot take it in 10 s is stuck
        self.proc, self._control = proc, ours
        self.starts += 1
        log.info("compute host started (pid %d, %d intra-op threads)", proc.pid, self.num_threads)

    def _stop(self, timeout_s: float) -> None:
        if self._control is not None:
            self._control.close()  # the host exits on it
            self._control = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self, timeout_s: float = 10.0) -> None:
        """End the host (its engines' batches are computed in the server from then on); kill it if it does not go."""
        with self._lock:
            self._stop(timeout_s)


async def recommend_batch_remote(engine: Engine, queries: Sequence[RecommendQuery]) -> tuple[list[Ranked], tuple]:
    """Engine.recommend_batch with the tower and the search in engine.compute_process: the rows before and the
    answers after here (Engine.prepare / finish, on the event loop), the native half awaited. Returns the answers and
    the batch's stage seconds (rows, tower, search, assembly). ComputeProcessError: nothing was answered."""
    prepared = engine.prepare(queries)
    u_BD, scores_BK, idx_BK = None, [], []
    tower_s = search_s = 0.0
    if prepared.rows:
        u_BD, dist_BK, ids_BK, tower_s, search_s = await engine.compute_process.compute(np.stack(prepared.rows),
                                                                                       prepared.k_search)
        scores_BK, idx_BK = drop_excluded(dist_BK, ids_BK, prepared.k_max, prepared.seen_B)
        # The stage clock's stamps, shifted so that each stage counts its own time (not the wait between)
        t0, t1 = prepared.stamps
        end = time.perf_counter()
        prepared.stamps = [end - search_s - tower_s - (t1 - t0), end - search_s - tower_s, end - search_s, end]
    results = engine.finish(prepared, u_BD, scores_BK, idx_BK)
    s = prepared.stamps
    return results, (s[1] - s[0], tower_s, search_s, time.perf_counter() - s[-1])


def send_frame(sock: socket.socket, payload: bytes) -> None:
    """A blocking send of one length-prefixed message."""
    sock.sendall(FRAME.pack(len(payload)) + payload)


def recv_frame(sock: socket.socket) -> bytes:
    """A blocking receive of one length-prefixed message; EOFError when the peer closed the connection."""
    (n,) = FRAME.unpack(_recv_blocking(sock, FRAME.size))
    return _recv_blocking(sock, n)


def _recv_blocking(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError("connection closed")
        got += k
    return bytes(buf)


def decode_reply(msg: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    B, D, K, tower_s, search_s = REPLY.unpack_from(msg, 1)
    at = 1 + REPLY.size
    u_BD = np.frombuffer(msg, np.float32, B * D, at).reshape(B, D).copy()  # writable: torch views it (live merge)
    at += 4 * B * D
    scores_BK = np.frombuffer(msg, np.float32, B * K, at).reshape(B, K)
    at += 4 * B * K
    idx_BK = np.frombuffer(msg, np.int64, B * K, at).reshape(B, K)
    return u_BD, scores_BK, idx_BK, tower_s, search_s


def name_os_thread(name: str) -> None:
    """Name the calling OS thread (Linux prctl PR_SET_NAME, 15 bytes), so per-thread CPU can be told apart."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass
