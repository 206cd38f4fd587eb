"""An engine's user tower and item search in a process of its own, so they run beside the event loop without
sharing its GIL.

In one server process the event loop (gRPC, validation, admission, response building) and the engine's work take
turns on one GIL: computed inline the loop carries both (~1.2 ms a Recommend on this project's 2-core machine, so
one core caps the rate), and on the compute thread every batch hands the GIL back and forth between them
(docs/serving.md section 7). With `--compute-process` each serving engine gets a child process that loads the same
verified files (tower package, item index) and runs only the two native calls of a batch: (B, T) item rows in,
the user vectors and the top k_search of each row out. The item-row lookups before and the id mapping, exclusions
and live-item merge after stay in the server (Engine.prepare / Engine.finish), so the answers are the ones the
engine computes in-process.

Wire format over a socketpair, each message prefixed by its length ("<I"), one batch in flight:
  request  "<iii" B, T, K + rows (B, T) int64
  reply    b"R" + "<iiidd" B, D, K, tower seconds, search seconds + u (B, D) float32 + scores (B, K) float32
           + item indices (B, K) int64;  b"E" + a UTF-8 message: the batch failed (the process keeps serving)
Start-up: the child sends b"ready" + "<d" its golden parity max abs diff once loaded and warmed, or b"E" + why not.
The child exits when its connection closes: the server closed it, or exited (not PR_SET_PDEATHSIG: that follows
the thread that started the child, a loading thread here, not the server process).

    python -m server.engine.compute_process --fd N --engine-dir DIR [--graph-dir DIR] [--threads 1] [--no-ann]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import struct
import subprocess
import sys
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
    """The server's end: a batch's rows go out and the tower's and the search's outputs come back, awaited on the
    event loop (non-blocking socket: uvloop makes any fd it watches non-blocking anyway)."""

    def __init__(self, proc: subprocess.Popen, sock: socket.socket, version: int, parity: float) -> None:
        self.proc, self.sock, self.version = proc, sock, version
        self.parity_max_abs_diff = parity  # the child's own golden check of the files it loaded
        self.alive = True
        self._busy = False
        self._buf = bytearray(1 << 16)  # replies are read into it (one in flight: nothing follows a reply)

    @classmethod
    def start(cls, engine_dir: Path, manifest_bytes: bytes, version: int, *, graph_dir: Path | None,
              num_threads: int, use_ann: bool, timeout_s: float = START_TIMEOUT_S) -> "ComputeProcess":
        """Start the child and wait until it has loaded, checked and warmed the engine (blocking: a loading thread)."""
        ours, theirs = socket.socketpair()
        cmd = [sys.executable, "-m", "server.engine.compute_process", "--fd", str(theirs.fileno()),
               "--engine-dir", str(engine_dir), "--threads", str(num_threads)]
        if graph_dir is not None:
            cmd += ["--graph-dir", str(graph_dir)]
        if not use_ann:
            cmd.append("--no-ann")
        root = Path(__file__).resolve().parents[2]  # the project root, importable in the child
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), env=env)
        theirs.close()
        try:
            ours.settimeout(timeout_s)
            send_frame(ours, manifest_bytes)
            msg = recv_frame(ours)
        except (OSError, EOFError) as e:
            ours.close()
            if isinstance(e, socket.timeout):
                proc.kill()
                proc.wait()
                raise ComputeProcessError(f"engine {version}: the compute process did not start in {timeout_s:g} s")
            proc.wait(10)
            raise ComputeProcessError(f"engine {version}: the compute process exited (code {proc.returncode}) while "
                                      f"loading: {e or 'connection closed'}; see the server log") from e
        if not msg.startswith(b"ready"):
            ours.close()
            proc.wait(10)
            raise ComputeProcessError(f"engine {version}: the compute process could not load it: "
                                      f"{msg[1:].decode(errors='replace')}")
        ours.setblocking(False)
        (parity,) = struct.unpack_from("<d", msg, 5)
        return cls(proc, ours, version, parity)

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

    def _gone(self, why: BaseException) -> None:
        if self.alive:
            self.alive = False
            log.error("engine %d: its compute process is gone (%s, exit code %s); its batches are computed in the "
                      "server process from now on", self.version, why or "connection closed", self.proc.poll())
            self.sock.close()

    def close(self, timeout_s: float = 10.0) -> None:
        """Close the connection (the child exits on it) and reap the child; kill it if it does not go."""
        self.alive = False
        self.sock.close()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


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


# ---- the child

def serve(sock: socket.socket, engine_dir: Path, graph_dir: Path | None, threads: int, use_ann: bool) -> None:
    import torch

    from proto import livetower_v1_pb2 as pb

    torch.set_num_threads(threads)
    try:
        manifest = pb.EngineManifest.FromString(recv_frame(sock))
        engine = Engine.load(engine_dir, manifest, num_threads=threads, use_ann=use_ann, graph_dir=graph_dir)
        parity = engine.golden_max_abs_diff()
        rows_BT = engine.history_rows(engine.item_ids[:engine.max_history])[None, :]
        for _ in range(20):  # lazy init and allocator growth before the first live batch
            engine.search(engine.runner(rows_BT), min(150, engine.n_items))
    except Exception as e:  # noqa: BLE001 - whatever stops the load is the server's answer
        send_frame(sock, b"E" + f"{type(e).__name__}: {e}".encode())
        return
    send_frame(sock, b"ready" + struct.pack("<d", parity))
    while True:
        try:
            msg = recv_frame(sock)
        except (EOFError, OSError):
            return  # the server closed the connection (or died)
        try:
            B, T, K = REQUEST.unpack_from(msg)
            rows_BT = np.frombuffer(msg, np.int64, B * T, REQUEST.size).reshape(B, T).copy()  # writable, for torch
            t0 = time.perf_counter()
            u_BD = np.ascontiguousarray(engine.runner(rows_BT), dtype=np.float32)
            t1 = time.perf_counter()
            scores_BK, idx_BK = engine.search(u_BD, K)
            t2 = time.perf_counter()
            reply = b"".join((b"R", REPLY.pack(B, u_BD.shape[1], scores_BK.shape[1], t1 - t0, t2 - t1),
                              u_BD.tobytes(), np.ascontiguousarray(scores_BK, dtype=np.float32).tobytes(),
                              np.ascontiguousarray(idx_BK, dtype=np.int64).tobytes()))
        except Exception as e:  # noqa: BLE001 - this batch failed; the next may not
            reply = b"E" + f"{type(e).__name__}: {e}".encode()
        try:
            send_frame(sock, reply)
        except OSError:
            return


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m server.engine.compute_process", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fd", type=int, required=True, help="the socket (inherited) the server talks over")
    p.add_argument("--engine-dir", type=Path, required=True)
    p.add_argument("--graph-dir", type=Path, help="a refit engine's graph version directory")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of the tower and the search")
    p.add_argument("--no-ann", action="store_true", help="exact search, as the server's --no-ann")
    args = p.parse_args(argv)
    name_os_thread(PROCESS_NAME)  # the main thread's name is the process's (/proc/PID/comm)
    serve(socket.socket(fileno=args.fd), args.engine_dir, args.graph_dir, args.threads, not args.no_ann)


if __name__ == "__main__":
    main()
