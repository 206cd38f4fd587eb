"""Limits before parsing: 16 concurrent ~60 MiB LogEvents requests against a real `livetower serve` process.

The server (its own process, so psutil measures its RSS alone; an empty data dir: LogEvents needs no engine)
must refuse every one with RESOURCE_EXHAUSTED from the transport's message-size limit, before buffering or
parsing it, and its RSS must not grow by more than 200 MB. RSS is sampled every 5 ms in a thread.

    python -m benchmarks.hardening_limits --out bench-results/hardening-limits
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil

from benchmarks.processes import free_port
from proto import livetower_v1_pb2 as pb

LOG_EVENTS = "/livetower.v1.Recommender/LogEvents"
TARGET_GROWTH_MB = 200.0


class RssSampler(threading.Thread):
    def __init__(self, pid: int, interval_s: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.proc, self.interval_s = psutil.Process(pid), interval_s
        self.peak = self.proc.memory_info().rss
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            self.samples += 1
            self._halt.wait(self.interval_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def start_server(data_dir: Path, log_path: Path, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, int]:
    """`livetower serve` (plus `extra` flags) in its own process group; returns it once it serves, and its port."""
    port = free_port()
    cmd = [sys.executable, "-m", "livetower", "serve", "--data-dir", str(data_dir), "--port", str(port),
           "--admin-port", "0", "--metrics-port", "-1", *extra]
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if "serving gRPC on" in log_path.read_text():
            return proc, port
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError(f"server did not start; see {log_path}:\n{log_path.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def big_request(mib: float) -> bytes:
    """A serialized LogEventsRequest of about `mib` MiB (10,000 events with long item ids): what a client sends."""
    n = 10_000
    item_chars = int(mib * (1 << 20) / n)
    now = int(time.time() * 1000)
    return pb.LogEventsRequest(events=[pb.Event(event_id=f"big-{i}", user_id=f"u{i}", item_id="i" * item_chars,
                                                action="click", weight=1.0, timestamp_ms=now)
                                       for i in range(n)]).SerializeToString()


def measure(work: Path, *, requests: int, mib: float) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    proc, port = start_server(work / "data", work / "server.log")
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)])
        call = channel.unary_unary(LOG_EVENTS, request_serializer=None,
                                   response_deserializer=pb.LogEventsResponse.FromString)
        small = pb.LogEventsRequest(events=[pb.Event(event_id="warm", user_id="u", item_id="i", action="click",
                                                     weight=1.0, timestamp_ms=int(time.time() * 1000))])
        assert call(small.SerializeToString(), timeout=30).accepted == 1  # warm: the sink and the loop are up
        payload = big_request(mib)
        time.sleep(1.0)
        rss_before = psutil.Process(proc.pid).memory_info().rss
        sampler = RssSampler(proc.pid)
        sampler.start()

        def send(_: int) -> tuple[str, str, float]:
            t0 = time.perf_counter()
            try:
                call(payload, timeout=120)
                return "OK", "", time.perf_counter() - t0
            except grpc.RpcError as e:
                return e.code().name, e.details() or "", time.perf_counter() - t0

        t0 = time.perf_counter()
        with ThreadPoolExecutor(requests) as pool:
            results = list(pool.map(send, range(requests)))
        wall = time.perf_counter() - t0
        time.sleep(1.0)
        sampler.stop()
        rss_after = psutil.Process(proc.pid).memory_info().rss
        after_ok = call(small.SerializeToString().replace(b"warm", b"wrm2"), timeout=30).accepted == 1
        channel.close()
    finally:
        stop_server(proc)
    mb = 1e6
    codes: dict[str, int] = {}
    for code, _, _ in results:
        codes[code] = codes.get(code, 0) + 1
    growth = (sampler.peak - rss_before) / mb
    return {
        "requests": requests, "request_bytes": len(payload), "wall_s": round(wall, 3),
        "codes": codes, "first_details": results[0][1], "latency_s_max": round(max(r[2] for r in results), 3),
        "rss_mb": {"before": round(rss_before / mb, 1), "peak": round(sampler.peak / mb, 1),
                   "after": round(rss_after / mb, 1), "peak_growth": round(growth, 1)},
        "rss_samples": sampler.samples, "server_ok_after": after_ok,
        "target": {"all_resource_exhausted": codes == {"RESOURCE_EXHAUSTED": requests},
                   "rss_growth_below_mb": TARGET_GROWTH_MB, "met": codes == {"RESOURCE_EXHAUSTED": requests}
                   and growth < TARGET_GROWTH_MB and after_ok},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hardening_limits", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-results/hardening-limits"))
    p.add_argument("--requests", type=int, default=16, help="concurrent requests")
    p.add_argument("--mib", type=float, default=60.0, help="size of each request, MiB")
    args = p.parse_args(argv)
    result = measure(args.out / "work", requests=args.requests, mib=args.mib)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hardening_limits.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0 if result["target"]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
