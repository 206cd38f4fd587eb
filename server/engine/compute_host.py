"""The compute host: the child process a `--compute-process` server runs its engines' towers and searches in
(the protocol and the server's end: server/engine/compute_process.py).

It imports torch (and the index and runtime libraries engines use) once, then takes engines from the server's
control socket for as long as the server lives: each arrives as a spec (directory, options) with its own
connection, and gets a thread that loads it, checks its golden parity, warms it up and serves its batches, one at
a time, until the connection closes, when the engine is dropped. Engines load beside the ones serving (a new
engine from the sidecar while the current one answers), and two serving engines (a canary and its stable) compute
at once, their native calls outside the GIL.

    python -m server.engine.compute_host --fd N [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np

from server.engine.compute_process import PROCESS_NAME, REPLY, REQUEST, name_os_thread, recv_frame, send_frame
from server.engine.engine import Engine

SPEC_MAX_BYTES = 1 << 16  # an engine's spec: two paths and a few options
WARMUP_BATCHES = 20       # lazy init and allocator growth before the first live batch


def serve_engine(sock: socket.socket, spec: dict, threads: int) -> None:
    """One engine's life in the host: load, check and warm it, answer `ready`, then its batches until the server
    closes the connection."""
    from proto import livetower_v1_pb2 as pb

    name_os_thread(f"lt-engine-{spec['version']}")
    try:
        manifest_bytes = recv_frame(sock)
    except (EOFError, OSError):
        sock.close()  # the server gave up on this load or is gone
        return
    try:
        manifest = pb.EngineManifest.FromString(manifest_bytes)
        graph_dir = Path(spec["graph_dir"]) if spec["graph_dir"] else None
        engine = Engine.load(Path(spec["engine_dir"]), manifest, num_threads=threads, use_ann=spec["use_ann"],
                             graph_dir=graph_dir)
        parity = engine.golden_max_abs_diff()
        rows_BT = engine.history_rows(engine.item_ids[:engine.max_history])[None, :]
        for _ in range(WARMUP_BATCHES):
            engine.search(engine.runner(rows_BT), min(150, engine.n_items))
    except Exception as e:  # noqa: BLE001 - whatever stops the load is the server's answer
        _send_or_close(sock, _failure(e))
        return
    if not _send_or_close(sock, b"ready" + struct.pack("<d", parity)):
        return
    while True:
        try:
            msg = recv_frame(sock)
        except (EOFError, OSError):
            sock.close()  # the server freed the engine (or died): so does this thread, with its last reference
            return
        if not _send_or_close(sock, answer(engine, msg)):
            return


def answer(engine: Engine, msg: bytes) -> bytes:
    """One batch's reply: the tower's user vectors and the search's top K of each row, or b"E" + why."""
    try:
        B, T, K = REQUEST.unpack_from(msg)
        rows_BT = np.frombuffer(msg, np.int64, B * T, REQUEST.size).reshape(B, T).copy()  # writable, for torch
        t0 = time.perf_counter()
        u_BD = np.ascontiguousarray(engine.runner(rows_BT), dtype=np.float32)
        t1 = time.perf_counter()
        scores_BK, idx_BK = engine.search(u_BD, K)
        t2 = time.perf_counter()
        return b"".join((b"R", REPLY.pack(B, u_BD.shape[1], scores_BK.shape[1], t1 - t0, t2 - t1), u_BD.tobytes(),
                         np.ascontiguousarray(scores_BK, dtype=np.float32).tobytes(),
                         np.ascontiguousarray(idx_BK, dtype=np.int64).tobytes()))
    except Exception as e:  # noqa: BLE001 - this batch failed; the next may not
        return _failure(e)


def _failure(e: Exception) -> bytes:
    """The protocol's failure message: b"E" + the exception, in UTF-8."""
    return b"E" + f"{type(e).__name__}: {e}".encode()


def _send_or_close(sock: socket.socket, payload: bytes) -> bool:
    try:
        send_frame(sock, payload)
        return True
    except OSError:
        sock.close()
        return False


def host(control: socket.socket, threads: int) -> None:
    """Import once, say ready, then start a thread per engine handed over, until the control socket closes."""
    import torch

    torch.set_num_threads(threads)
    for optional in ("faiss", "onnxruntime"):  # what an engine's index or tower package may need: imported now,
        try:                                   # not on the first engine's load
            __import__(optional)
        except ImportError:
            pass
    control.sendall(b"ready")
    while True:
        try:
            spec, fds, _, _ = socket.recv_fds(control, SPEC_MAX_BYTES, 1)
        except OSError:
            break
        if not spec:
            break  # the server closed it, or exited
        if not fds:
            continue  # not a handover (nothing to answer on)
        sock = socket.socket(fileno=fds[0])
        try:
            parsed = json.loads(spec)
        except ValueError:
            sock.close()  # the server's load fails on the closed connection
            continue
        threading.Thread(target=serve_engine, args=(sock, parsed, threads), daemon=True,
                         name=f"engine-{parsed.get('version')}").start()
    os._exit(0)  # the engines' threads stop with the process (their connections are the server's to close)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m server.engine.compute_host", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fd", type=int, required=True, help="the control socket (inherited, SOCK_SEQPACKET)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of the towers and the searches")
    args = p.parse_args(argv)
    name_os_thread(PROCESS_NAME)  # the main thread's name is the process's (/proc/PID/comm)
    host(socket.socket(fileno=args.fd), args.threads)


if __name__ == "__main__":
    main()
