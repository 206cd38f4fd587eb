"""`livetower bench stream`: how fast events reach serving, on Kafka.

Sets up the whole loop on a local tansu broker: synthetic events on the topic, `livetower train
--events kafka://…` and `livetower serve --events kafka://…` as processes; waits for the first engine.

1. Event -> history (`--samples`): for a user, take the top item x of Recommend(exclude_seen=True),
   then make x part of the user's history and call Recommend back to back until x is gone (an item
   the user has seen is excluded, so its absence proves the history changed). Two paths, same run:
   - kafka: another service produces the event straight onto the topic (the server learns of it
     from its history feed); timed from just before the produce call;
   - grpc: LogEvents to the server itself (the baseline: applied before LogEvents returns).
2. Event -> serving freshness (`--freshness-s`): events at `--event-rate`/s stamped with the current
   time and Recommend load at `--qps`, while the trainer trains rounds and the server canaries and
   promotes them. Scrapes `livetower_serving_freshness_seconds` (now - event-time watermark of the
   stable engine) every second, after the first engine trained on events produced in this phase.
Writes results.json and results.png under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc

from benchmarks.processes import stop_server
from contracts.kafka_events import KafkaTarget, encode_event, now_ms, produce_all
from benchmarks.tansu import LocalBroker, free_port
from proto import livetower_v1_pb2 as pb
from proto import livetower_v1_pb2_grpc as pb_grpc


def parse_args(argv):
    p = argparse.ArgumentParser(prog="livetower bench stream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-results/stream"))
    p.add_argument("--samples", type=int, default=200, help="event->history measurements per path")
    p.add_argument("--freshness-s", type=float, default=300.0, help="length of the freshness phase (0: skip)")
    p.add_argument("--event-rate", type=float, default=50.0, help="events/s during the freshness phase")
    p.add_argument("--qps", type=float, default=100.0, help="Recommend load during the freshness phase")
    p.add_argument("--users", type=int, default=2000, help="synthetic users on the topic at the start")
    p.add_argument("--train-flags", default="--round-interval-s 10",
                   help="extra `livetower train` flags (quoted), e.g. '--tiny --backend torch'")
    return p.parse_args(argv)


def percentiles_ms(xs: list[float]) -> dict:
    if not xs:
        return {"count": 0}
    s = sorted(xs)
    at = lambda q: s[min(len(s) - 1, int(q * len(s)))] * 1e3  # noqa: E731
    return {"count": len(s), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": s[-1] * 1e3,
            "mean": statistics.fmean(s) * 1e3}


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    """`livetower ARGS` in its own process group (benchmarks.processes.stop_server stops the group)."""
    return subprocess.Popen([sys.executable, "-m", "livetower", *args], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env={**__import__("os").environ, "PYTHONUNBUFFERED": "1"},
                            start_new_session=True)


def wait_serving(stub, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = 0.0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited; see {log}")
        try:
            stub.Recommend(pb.RecommendRequest(user_id="probe", k=10), timeout=2)
            return
        except grpc.RpcError:
            if time.monotonic() - last > 15:
                last = time.monotonic()
                print("  waiting for the trainer's first engine…", flush=True)
            time.sleep(0.5)
    raise SystemExit(f"no engine served within {timeout_s:.0f} s; see the logs in {log.parent}")


async def history_latency(target: KafkaTarget, addr: str, samples: int) -> dict:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(**target.client_kwargs(), acks="all", linger_ms=0,
                                enable_idempotence=False)
    await producer.start()
    channel = grpc.aio.insecure_channel(addr)
    stub = pb_grpc.RecommenderStub(channel)
    out: dict[str, list[float]] = {"kafka": [], "grpc": []}
    polls: dict[str, list[int]] = {"kafka": [], "grpc": []}
    try:
        for i in range(samples):
            for path in ("kafka", "grpc") if i % 2 == 0 else ("grpc", "kafka"):
                user = f"latency-{path}-{i}"
                first = await stub.Recommend(pb.RecommendRequest(user_id=user, k=20, exclude_seen=True))
                x = first.item_ids[0]
                ev = pb.Event(event_id=f"lat-{path}-{i}", user_id=user, item_id=x, action="click", weight=1.0,
                              timestamp_ms=now_ms())
                t0 = time.perf_counter()
                if path == "kafka":
                    key, value = encode_event(ev)
                    await producer.send(target.topic, value=value, key=key)  # not awaiting the ack: the clock runs
                else:
                    await stub.LogEvents(pb.LogEventsRequest(events=[ev]))
                n = 0
                while True:
                    n += 1
                    r = await stub.Recommend(pb.RecommendRequest(user_id=user, k=20, exclude_seen=True))
                    if x not in r.item_ids:
                        break
                    if time.perf_counter() - t0 > 10:
                        raise SystemExit(f"{path}: user {user}'s event did not reach the history within 10 s")
                out[path].append(time.perf_counter() - t0)
                polls[path].append(n)
            if (i + 1) % 50 == 0:
                print(f"  {i + 1}/{samples}: kafka p50 {percentiles_ms(out['kafka'])['p50']:.1f} ms, "
                      f"grpc p50 {percentiles_ms(out['grpc'])['p50']:.1f} ms", flush=True)
    finally:
        await producer.stop()
        await channel.close()
    return {path: {**percentiles_ms(xs), "recommend_calls_median": statistics.median(polls[path]),
                   "samples_ms": [round(x * 1e3, 3) for x in xs]} for path, xs in out.items()}


def scrape(metrics_url: str, name: str) -> float | None:
    try:
        text = urllib.request.urlopen(metrics_url, timeout=2).read().decode()
    except OSError:
        return None
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def live_events(rng: random.Random, first: int, count: int, users: int) -> list[pb.Event]:
    """`count` events "fresh-<first>".. by random synthetic users, stamped now; each user's items lie near its
    own part of the 1,000-item catalogue."""
    out = []
    for i in range(count):
        u = rng.randrange(users)
        out.append(pb.Event(event_id=f"fresh-{first + i}", user_id=f"user-{u}",
                            item_id=f"item-{(u * 7 + int(rng.expovariate(0.1))) % 1000}", action="click",
                            weight=1.0, timestamp_ms=now_ms()))
    return out


class Traffic(threading.Thread):
    """Events at a fixed rate (current timestamps) and Recommend calls at a fixed rate."""

    def __init__(self, target: KafkaTarget, addr: str, *, event_rate: float, qps: float, users: int) -> None:
        super().__init__(daemon=True)
        self.target, self.addr, self.event_rate, self.qps, self.users = target, addr, event_rate, qps, users
        self.stop = threading.Event()
        self.errors = 0
        self.produced = 0

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        rng = random.Random(1)
        channel = grpc.aio.insecure_channel(self.addr)
        stub = pb_grpc.RecommenderStub(channel)

        async def recommend_loop():
            period, nxt = 1 / self.qps, time.monotonic()
            while not self.stop.is_set():
                nxt += period
                try:
                    await stub.Recommend(pb.RecommendRequest(user_id=f"user-{rng.randrange(self.users)}", k=100))
                except grpc.RpcError:
                    self.errors += 1
                await asyncio.sleep(max(0.0, nxt - time.monotonic()))

        async def event_loop():
            n = 0
            while not self.stop.is_set():
                t0 = time.monotonic()
                batch = live_events(rng, n, max(1, int(self.event_rate)), self.users)
                n += len(batch)
                await produce_all(self.target, batch)
                self.produced = n
                await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))

        tasks = [asyncio.create_task(recommend_loop()) for _ in range(4)] + [asyncio.create_task(event_loop())]
        while not self.stop.is_set():
            await asyncio.sleep(0.2)
        await asyncio.gather(*tasks, return_exceptions=True)
        await channel.close()


def fresh_loop_dir(work: Path, broker_log: Path) -> tuple[LocalBroker, KafkaTarget, str]:
    """An empty `work` dir and a started local broker: (broker, its 4-partition `events` target, that URL)."""
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    broker = LocalBroker(log_path=broker_log).start()
    target = KafkaTarget(bootstrap=broker.bootstrap, topic="events", partitions=4)
    return broker, target, f"kafka://{broker.bootstrap}/events?partitions=4"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv or [])
    out = args.out
    work = out / "work"
    broker, target, url = fresh_loop_dir(work, out / "tansu.log")
    procs = []
    try:
        from trainer.data.synthetic import SyntheticConfig, generate

        cfg = SyntheticConfig(n_users=args.users)
        n = asyncio.run(produce_all(target, generate(cfg)))
        print(f"{n} synthetic events on {url}", flush=True)
        port, metrics_port = free_port(), free_port()
        trainer = spawn(["train", "--data-dir", str(work), "--events", url, "--trainer-metrics-port", "-1",
                         *args.train_flags.split()], out / "trainer.log")
        server = spawn(["serve", "--data-dir", str(work), "--events", url, "--port", str(port), "--admin-port", "0",
                        "--metrics-port", str(metrics_port)], out / "server.log")
        procs = [trainer, server]
        addr = f"127.0.0.1:{port}"
        wait_serving(pb_grpc.RecommenderStub(grpc.insecure_channel(addr)), server, out / "server.log", 900)
        print(f"serving; measuring event -> history ({args.samples} samples per path)", flush=True)
        results = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "event_to_history_ms": asyncio.run(history_latency(target, addr, args.samples))}
        for path, r in results["event_to_history_ms"].items():
            print(f"  {path}: p50 {r['p50']:.2f} ms  p99 {r['p99']:.2f} ms  max {r['max']:.2f} ms", flush=True)
        if args.freshness_s > 0:
            results["freshness"] = freshness_phase(args, target, addr, f"http://127.0.0.1:{metrics_port}/metrics")
        (out / "results.json").write_text(json.dumps(results, indent=1))
        plot(results, out / "results.png")
        print(f"results in {out}", flush=True)
    finally:
        for p in procs:
            stop_server(p)
        broker.stop()
    return 0


def freshness_phase(args, target: KafkaTarget, addr: str, metrics_url: str) -> dict:
    traffic = Traffic(target, addr, event_rate=args.event_rate, qps=args.qps, users=args.users)
    traffic.start()
    t_start, series = time.time(), []
    print(f"freshness phase: {args.event_rate:g} events/s, {args.qps:g} Recommend/s for {args.freshness_s:.0f} s "
          "(counted once an engine trained on this phase's events serves)", flush=True)
    try:
        while time.time() - t_start < args.freshness_s:
            f = scrape(metrics_url, "livetower_serving_freshness_seconds")
            v = scrape(metrics_url, "livetower_serving_engine_version")
            series.append({"t": round(time.time() - t_start, 2), "freshness_s": f, "version": v})
            if len(series) % 30 == 0:
                print(f"  t={series[-1]['t']:.0f}s freshness {f if f is None else round(f, 1)} s, engine v{v}",
                      flush=True)
            time.sleep(1.0)
    finally:
        traffic.stop.set()
        traffic.join(10)
    # Count from the first moment the serving engine's watermark lies inside this phase.
    counted = [s for s in series if s["freshness_s"] is not None and s["freshness_s"] <= s["t"]]
    values = [s["freshness_s"] for s in counted]
    summary = {"samples": len(values), "events_produced": traffic.produced, "recommend_errors": traffic.errors,
               "series": series}
    if values:
        vs = sorted(values)
        summary.update({"p50_s": vs[len(vs) // 2], "p90_s": vs[int(0.9 * len(vs))], "max_s": vs[-1],
                        "mean_s": statistics.fmean(vs), "counted_from_t": counted[0]["t"]})
        print(f"  serving freshness: p50 {summary['p50_s']:.1f} s, p90 {summary['p90_s']:.1f} s, "
              f"max {summary['max_s']:.1f} s over {len(vs)} samples", flush=True)
    else:
        print("  no engine trained on this phase's events served within the phase: lengthen --freshness-s",
              flush=True)
    return summary


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    a = axes[0]
    for name, d in r["event_to_history_ms"].items():
        xs = sorted(d["samples_ms"])
        a.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=f"{name} (p50 {d['p50']:.1f}, p99 {d['p99']:.1f} ms)")
    a.set_xscale("log")
    a.set_xlabel("event -> next Recommend reflects it (ms)")
    a.set_ylabel("CDF")
    a.legend()
    a.set_title("event to history")
    b = axes[1]
    fr = r.get("freshness")
    if fr:
        # Until an engine trained on this phase's events serves, the watermark is the bootstrap data's
        # (days old): those points are drawn clipped at the top, and the counted part starts at the dotted line.
        pts = [(s["t"], s["freshness_s"]) for s in fr["series"] if s["freshness_s"] is not None]
        top = max([180.0] + [1.2 * f for t, f in pts if f <= t])
        if pts:
            b.plot([t for t, _ in pts], [min(f, top) for _, f in pts], label="now - watermark of the stable engine")
        if fr.get("counted_from_t") is not None:
            b.axvline(fr["counted_from_t"], color="gray", ls=":",
                      label=f"counted from here: p50 {fr['p50_s']:.0f} s, max {fr['max_s']:.0f} s")
        b.axhline(60, color="C3", ls="--", label="target 60 s")
        b.set_ylim(0, top)
        b.set_xlabel("time in phase (s)")
        b.set_ylabel("serving freshness (s, clipped)")
        b.legend()
        b.set_title("event to serving")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
