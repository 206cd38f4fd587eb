"""Bounded state under hostile input (issue 22): dead letters and new item ids.

`dead-letters`: a real `livetower serve` process (SQLite event log); one LogEvents request of 10,000
invalid (empty) events while another client sends small valid LogEvents requests. Counts the server's
fsync/fdatasync calls during the bad request with `strace -f -c` (needs ptrace rights: run as root) and
reports the bad request's latency and the valid requests' latencies while it was in flight.

`items`: 1M unique random item ids streamed through the trainer's admission path (a real Trainer on a
SqliteEventLog, tiny config): the events go into the log, then `Trainer.admit_round` (the counting and
admission step a round runs before training) reads them in rounds of max_round_events. Training rounds on 1M
events would take far longer than this measurement needs; admission, the vocabulary, the item table and the
per-user state are exactly the round's. Reports table rows, vocabulary size, users kept and trainer RSS
(psutil) against the caps.

    python -m benchmarks.hardening_state dead-letters
    python -m benchmarks.hardening_state items --events 1000000

`server-items`: the same 1M unique ids (200 characters each) sent to a real server over LogEvents, its
recent histories capped at 64 MiB: the server's RSS against that cap.

    python -m benchmarks.hardening_state server-items --events 1000000
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from benchmarks.hardening_limits import start_server as _start_server, stop_server as _stop
from proto import livetower_v1_pb2 as pb
from proto import livetower_v1_pb2_grpc as pb_grpc


def _valid_request(i: int) -> pb.LogEventsRequest:
    return pb.LogEventsRequest(events=[pb.Event(event_id=f"ok-{i}", user_id=f"u{i % 50}", item_id=f"item-{i % 300}",
                                                action="click", weight=1.0, timestamp_ms=int(time.time() * 1000))])


def _strace_calls(text: str) -> dict[str, int]:
    """{syscall: calls} from strace -c's table."""
    calls = {}
    for line in text.splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", line)
        if m and m.group(2) != "total":
            calls[m.group(2)] = int(m.group(1))
    return calls


def measure_dead_letters(n_bad: int, work: Path) -> dict:
    proc, port = _start_server(work, work / "server.log")
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.RecommenderStub(channel)
        for i in range(20):  # warm-up: connection, the log's first writes
            stub.LogEvents(_valid_request(-1 - i), timeout=10)
        strace_out = work / "strace.txt"
        tracer = subprocess.Popen(["strace", "-f", "-c", "-e", "trace=fsync,fdatasync", "-o", str(strace_out),
                                   "-p", str(proc.pid)], stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attach to every thread
        bad = pb.LogEventsRequest(events=[pb.Event() for _ in range(n_bad)])
        done = threading.Event()
        box: dict = {}

        def send_bad() -> None:
            t0 = time.perf_counter()
            r = stub.LogEvents(bad, timeout=600)
            box["bad_s"] = time.perf_counter() - t0
            box["bad_response"] = (r.accepted, len(r.rejected))
            done.set()

        valid_ms: list[float] = []
        t = threading.Thread(target=send_bad)
        t.start()
        time.sleep(0.005)  # the bad request is on its way first
        i = 0
        while not done.is_set() or len(valid_ms) < 5:
            t0 = time.perf_counter()
            stub.LogEvents(_valid_request(i), timeout=600)
            valid_ms.append((time.perf_counter() - t0) * 1e3)
            i += 1
            if done.is_set() and len(valid_ms) >= 5:
                break
        t.join()
        time.sleep(0.5)
        tracer.send_signal(signal.SIGINT)
        tracer.wait(30)
        calls = _strace_calls(strace_out.read_text())
        channel.close()
    finally:
        _stop(proc)
    valid_sorted = sorted(valid_ms)
    return {"bad_events": n_bad, "bad_request_ms": round(box["bad_s"] * 1e3, 1),
            "bad_response_accepted_rejected": box["bad_response"],
            "fsync_calls": calls.get("fsync", 0), "fdatasync_calls": calls.get("fdatasync", 0),
            "valid_requests": len(valid_ms), "valid_ms_max": round(valid_sorted[-1], 1),
            "valid_ms_p50": round(valid_sorted[len(valid_sorted) // 2], 1),
            "valid_ms_first": round(valid_ms[0], 1),
            "note": "fsync counts include the concurrent valid requests' commits (one each)"}


def measure_server_items(n_events: int, work: Path, *, id_chars: int = 200, n_users: int = 200_000,
                         history_max_bytes: int = 64 << 20, per_request: int = 1000) -> dict:
    """n_events with unique random item ids of id_chars characters, for random users, into a real server
    (LogEvents over gRPC, SQLite log), its recent histories capped at history_max_bytes. The server's RSS
    (psutil, sampled every 50 ms) against that cap."""
    import random

    import psutil

    proc, port = _start_server(work, work / "server.log",
                               ("--history-max-bytes", str(history_max_bytes), "--ingest-events-per-s", "0"))
    try:
        server = psutil.Process(proc.pid)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 8 << 20)])
        stub = pb_grpc.RecommenderStub(channel)
        stub.LogEvents(_valid_request(0), timeout=30)  # warm: connection, first write
        rss0 = server.memory_info().rss
        peak, stop = [rss0], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], server.memory_info().rss)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rng, ts, t0, accepted, progress = random.Random(0), int(time.time() * 1000), time.perf_counter(), 0, []
        for start in range(0, n_events, per_request):
            events = [pb.Event(event_id=f"x{i}", user_id=f"user-{rng.randrange(n_users)}",
                               item_id=f"{rng.getrandbits(128):032x}".ljust(id_chars, "z"), action="click",
                               weight=1.0, timestamp_ms=ts) for i in range(start, min(start + per_request, n_events))]
            accepted += stub.LogEvents(pb.LogEventsRequest(events=events), timeout=120).accepted
            if (start // per_request) % 100 == 99:
                progress.append({"events": start + len(events), "rss_mb": round(server.memory_info().rss / 2**20, 1)})
                print(f"  {progress[-1]['events']:,} events, server RSS {progress[-1]['rss_mb']} MB", flush=True)
        stream_s = time.perf_counter() - t0
        stop.set()
        sampler.join()
        rss1 = server.memory_info().rss
        channel.close()
    finally:
        _stop(proc)
    mb = 2**20
    return {"events": n_events, "accepted": accepted, "id_chars": id_chars, "users": n_users,
            "raw_item_id_bytes_mb": round(n_events * id_chars / mb, 1),
            "history_max_bytes_mb": history_max_bytes / mb, "server_rss_before_mb": round(rss0 / mb, 1),
            "server_rss_after_mb": round(rss1 / mb, 1), "server_rss_peak_mb": round(peak[0] / mb, 1),
            "server_rss_growth_peak_mb": round((peak[0] - rss0) / mb, 1), "stream_s": round(stream_s, 1),
            "progress": progress}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="livetower bench hardening-state", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("dead-letters", "items", "server-items"))
    p.add_argument("--bad-events", type=int, default=10_000, help="dead-letters: invalid events in the request")
    p.add_argument("--events", type=int, default=1_000_000, help="items: unique random item ids streamed")
    p.add_argument("--history-max-mb", type=int, default=64, help="server-items: the server's history_max_bytes, MiB")
    p.add_argument("--out", type=Path, default=None, help="write the JSON result here too")
    args = p.parse_args(argv or [])
    with tempfile.TemporaryDirectory(prefix="hardening-") as tmp:
        if args.what == "dead-letters":
            result = measure_dead_letters(args.bad_events, Path(tmp))
        elif args.what == "server-items":
            result = measure_server_items(args.events, Path(tmp), history_max_bytes=args.history_max_mb << 20)
        else:
            result = measure_items(args.events, Path(tmp))
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


def measure_items(n_events: int, work: Path, *, n_users: int = 200_000, max_users: int = 50_000) -> dict:
    import random
    import psutil

    from contracts.eventlog import SqliteEventLog
    from contracts.registry import Registry
    from trainer.config import TrainConfig
    from trainer.loop import Trainer, split_round

    proc = psutil.Process()
    cfg = TrainConfig.tiny_debug(max_users=max_users)
    rng = random.Random(0)
    t0 = time.perf_counter()
    log = SqliteEventLog(work / "events.sqlite")
    ts = int(time.time() * 1000)
    log.append_all(pb.Event(event_id=f"e{i}", user_id=f"user-{rng.randrange(n_users)}",
                            item_id=f"{rng.getrandbits(128):032x}", action="click", weight=1.0, timestamp_ms=ts)
                   for i in range(n_events))
    append_s = time.perf_counter() - t0
    trainer = Trainer(cfg, log, Registry(work / "registry"), work / "trainer")
    rss0 = proc.memory_info().rss
    rounds, t0 = [], time.perf_counter()
    while True:
        # A round's admission path: read, evict/admit/grow (Trainer._add_items), keep the users' rows (LRU);
        # training and the engine build are left out (this measures the state, not the model).
        batch = trainer.event_log.read_batch(trainer.state.offsets, cfg.max_round_events)
        if not batch.events:
            break
        rows_by_user = trainer._add_items(batch.events)
        split = split_round(rows_by_user, trainer.state.user_seqs, max_eval_users=0, seed=0)
        trainer.remember_users(split.seqs)
        trainer.state.offsets = batch.next_offsets
        rounds.append({"events": len(batch.events), "table_rows": trainer.model.num_rows,
                       "vocab_items": len(trainer.vocab), "users_kept": len(trainer.state.user_seqs),
                       "rss_mb": round(proc.memory_info().rss / 2**20, 1)})
    admit_s = time.perf_counter() - t0
    trainer._checkpoint()
    ckpt = (work / "trainer" / "checkpoint.pt").stat().st_size
    return {"events": n_events, "unique_item_ids": n_events, "users": n_users, "rounds": rounds,
            "caps": {"item_min_count": cfg.item_min_count, "max_new_items_per_round": cfg.max_new_items_per_round,
                     "max_users": cfg.max_users, "admission_sketch_bytes": trainer.sketch.table.nbytes},
            "final": rounds[-1] if rounds else None, "rss_before_mb": round(rss0 / 2**20, 1),
            "checkpoint_mb": round(ckpt / 2**20, 1), "append_s": round(append_s, 1),
            "admission_s": round(admit_s, 1)}


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
