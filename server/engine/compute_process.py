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

Wire format over a socketpair (multiprocessing.connection framing), one batch in flight:
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
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

REQUEST = struct.Struct("<iii")      # B, T, K
REPLY = struct.Struct("<iiidd")      # B, D, K, tower seconds, search seconds
PROCESS_NAME = "lt-compute"          # its /proc comm: bench slo counts its CPU as the compute component
START_TIMEOUT_S = 300.0              # load + parity + warm-up of a 1M-item engine took ~60 s on 2 cores

log = logging.getLogger("livetower.engine")


class ComputeProcessError(Exception):
    """The compute process could not start, failed a batch, or is gone."""


class ComputeProcess:
    """The server's end: submit a batch's rows on the event loop, await the tower's and the search's outputs."""

    def __init__(self, proc: subprocess.Popen, conn: Connection, version: int, parity: float) -> None:
        self.proc, self.conn, self.version = proc, conn, version
        self.parity_max_abs_diff = parity  # the child's own golden check of the files it loaded
        self.alive = True
        self._pending: asyncio.Future | None = None

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
        conn = Connection(ours.detach())
        try:
            conn.send_bytes(manifest_bytes)
            if not conn.poll(timeout_s):
                raise ComputeProcessError(f"engine {version}: the compute process did not start in {timeout_s:g} s")
            msg = conn.recv_bytes()
        except (EOFError, OSError) as e:
            conn.close()
            proc.wait(10)
            raise ComputeProcessError(f"engine {version}: the compute process exited (code {proc.returncode}) while "
                                      f"loading: {e or 'connection closed'}; see the server log") from e
        except ComputeProcessError:
            conn.close()
            proc.kill()
            raise
        if not msg.startswith(b"ready"):
            conn.close()
            proc.wait(10)
            raise ComputeProcessError(f"engine {version}: the compute process could not load it: "
                                      f"{msg[1:].decode(errors='replace')}")
        (parity,) = struct.unpack_from("<d", msg, 5)
        return cls(proc, conn, version, parity)

    def submit(self, rows_BT: np.ndarray, k_search: int) -> asyncio.Future:
        """On the event loop: a future of (u (B, D) float32, scores (B, K) float32, indices (B, K) int64,
        tower seconds, search seconds). One batch at a time."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self.alive:
            fut.set_exception(ComputeProcessError(f"engine {self.version}: its compute process is gone"))
            return fut
        if self._pending is not None:
            raise RuntimeError("ComputeProcess.submit: a batch is already in flight (one at a time)")
        rows_BT = np.ascontiguousarray(rows_BT, dtype=np.int64)
        B, T = rows_BT.shape
        try:
            self.conn.send_bytes(REQUEST.pack(B, T, k_search) + rows_BT.tobytes())
        except OSError as e:
            self._gone(e)
            fut.set_exception(ComputeProcessError(f"engine {self.version}: its compute process is gone ({e})"))
            return fut
        self._pending = fut
        loop.add_reader(self.conn.fileno(), self._on_reply, loop)
        return fut

    def _on_reply(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self.conn.fileno())
        fut, self._pending = self._pending, None
        try:
            msg = self.conn.recv_bytes()  # readable: the reply is here or being written (~10 KB)
        except (EOFError, OSError) as e:
            self._gone(e)
            if fut is not None and not fut.done():
                fut.set_exception(ComputeProcessError(f"engine {self.version}: its compute process exited "
                                                      f"(code {self.proc.poll()}); see the server log"))
            return
        if fut is None or fut.done():
            return
        if msg[:1] == b"E":
            fut.set_exception(ComputeProcessError(f"engine {self.version}: {msg[1:].decode(errors='replace')}"))
            return
        fut.set_result(decode_reply(msg))

    def _gone(self, why: Exception) -> None:
        if self.alive:
            self.alive = False
            log.error("engine %d: its compute process is gone (%s, exit code %s); its batches are computed in the "
                      "server process from now on", self.version, why or "connection closed", self.proc.poll())

    def close(self, timeout_s: float = 10.0) -> None:
        """Close the connection (the child exits on it) and reap the child; kill it if it does not go."""
        self.alive = False
        try:
            self.conn.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def decode_reply(msg: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    B, D, K, tower_s, search_s = REPLY.unpack_from(msg, 1)
    at = 1 + REPLY.size
    u_BD = np.frombuffer(msg, np.float32, B * D, at).reshape(B, D).copy()  # writable: torch views it (live merge)
    at += 4 * B * D
    scores_BK = np.frombuffer(msg, np.float32, B * K, at).reshape(B, K)
    at += 4 * B * K
    idx_BK = np.frombuffer(msg, np.int64, B * K, at).reshape(B, K)
    return u_BD, scores_BK, idx_BK, tower_s, search_s


# ---- the child

def _name_process() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, PROCESS_NAME.encode(), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def serve(conn: Connection, engine_dir: Path, graph_dir: Path | None, threads: int, use_ann: bool) -> None:
    import torch

    from proto import livetower_v1_pb2 as pb
    from server.engine.engine import Engine

    torch.set_num_threads(threads)
    try:
        manifest = pb.EngineManifest.FromString(conn.recv_bytes())
        engine = Engine.load(engine_dir, manifest, num_threads=threads, use_ann=use_ann, graph_dir=graph_dir)
        parity = engine.golden_max_abs_diff()
        rows_BT = engine.history_rows(engine.item_ids[:engine.max_history])[None, :]
        for _ in range(20):  # lazy init and allocator growth before the first live batch
            engine.search(engine.runner(rows_BT), min(150, engine.n_items))
    except Exception as e:  # noqa: BLE001 - whatever stops the load is the server's answer
        conn.send_bytes(b"E" + f"{type(e).__name__}: {e}".encode())
        return
    conn.send_bytes(b"ready" + struct.pack("<d", parity))
    while True:
        try:
            msg = conn.recv_bytes()
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
            conn.send_bytes(reply)
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
    _name_process()
    serve(Connection(args.fd), args.engine_dir, args.graph_dir, args.threads, not args.no_ann)


if __name__ == "__main__":
    main()
