"""`livetower bench kill`: kill -9 the Kafka-fed trainer at random moments, many times; prove nothing is lost.

A local tansu broker; a producer thread writes synthetic events (unique event_ids) at a steady
rate; `livetower train --events kafka://… --ledger …` runs as a child process and is SIGKILLed
after a random delay (mid-step, mid-checkpoint or mid-publish, wherever it happens to be), then
restarted, again and again. After the last kill the trainer runs until its lag is 0 and stops.

Checks, from files the trainer wrote (see Trainer's `ledger_path`):
- lost: produced event_ids that no committed round trained (must be 0);
- duplicates: event_ids trained by more than one committed round (at-least-once allows them);
- redone: events trained by attempts a kill cut short (their rounds were redone from the checkpoint);
- every restart loaded the checkpoint (no half-written one) and every published engine verifies
  (no half-written engine is visible; staging dirs are dot-prefixed and removed at restart);
- recovery: restart → first new checkpoint (progress made again), max and median.
Writes results.json and results.png under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from contracts.kafka_events import KafkaTarget, now_ms, produce_all
from contracts.registry import Registry
from benchmarks.tansu import LocalBroker
from proto import livetower_v1_pb2 as pb


def parse_args(argv):
    p = argparse.ArgumentParser(prog="livetower bench kill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-results/kill"))
    p.add_argument("--kills", type=int, default=30, help="SIGKILLs to deliver")
    p.add_argument("--min-s", type=float, default=3.0, help="shortest life of a trainer process before the kill")
    p.add_argument("--max-s", type=float, default=25.0, help="longest life of a trainer process before the kill")
    p.add_argument("--rate", type=float, default=200.0, help="events produced per second during the campaign")
    p.add_argument("--initial-events", type=int, default=5000, help="events on the topic before the first start")
    p.add_argument("--users", type=int, default=500)
    p.add_argument("--items", type=int, default=300)
    p.add_argument("--backend", default="torch", choices=("torch", "aoti", "onnx"), help="engine backend")
    p.add_argument("--max-round-events", type=int, default=3000,
                   help="small rounds: many checkpoints and publishes for the kills to land in")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--drain-timeout-s", type=float, default=300.0)
    return p.parse_args(argv)


class Producer(threading.Thread):
    """Synthetic events at a fixed rate; remembers every acknowledged event_id."""

    def __init__(self, target: KafkaTarget, *, rate: float, users: int, items: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.target, self.rate, self.users, self.items = target, rate, users, items
        self.rng = random.Random(seed)
        self.produced: list[str] = []
        self.stop = threading.Event()
        self.n = 0

    def make(self, count: int) -> list[pb.Event]:
        out = []
        for _ in range(count):
            u = self.rng.randrange(self.users)
            # Each user mostly likes one slice of the catalogue, so training has something to learn.
            item = (u * 7 + int(self.rng.expovariate(0.2))) % self.items
            out.append(pb.Event(event_id=f"k{self.n}", user_id=f"user-{u}", item_id=f"item-{item}",
                                action="click", weight=1.0, timestamp_ms=now_ms()))
            self.n += 1
        return out

    def send(self, events: list[pb.Event]) -> None:
        asyncio.run(produce_all(self.target, events))
        self.produced.extend(e.event_id for e in events)

    def run(self) -> None:
        chunk = max(1, int(self.rate / 4))
        while not self.stop.is_set():
            t0 = time.monotonic()
            self.send(self.make(chunk))
            self.stop.wait(max(0.0, chunk / self.rate - (time.monotonic() - t0)))


def checkpoint_mtime(data_dir: Path) -> float:
    try:
        return (data_dir / "trainer" / "checkpoint.pt").stat().st_mtime
    except FileNotFoundError:
        return 0.0


def read_ledger(path: Path, final_step: int) -> tuple[list[str], int]:
    """(event_ids of committed rounds, events trained by cut-short attempts)."""
    by_step: dict[int, dict[str, list[str]]] = {}
    for line in path.read_text().splitlines():
        step, pid, eid = line.split("\t")
        by_step.setdefault(int(step), {}).setdefault(pid, []).append(eid)
    committed, redone = [], 0
    for step, attempts in by_step.items():
        pids = list(attempts)  # insertion order = write order: the last pid is the committed attempt
        if step <= final_step:
            committed.extend(attempts[pids[-1]])
            redone += sum(len(attempts[p]) for p in pids[:-1])
        else:
            redone += sum(len(v) for v in attempts.values())
    return committed, redone


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv or [])
    out = args.out
    data = out / "work"
    if data.exists():
        import shutil

        shutil.rmtree(data)
    data.mkdir(parents=True)
    rng = random.Random(args.seed)
    broker = LocalBroker(log_path=out / "tansu.log").start()
    target = KafkaTarget(bootstrap=broker.bootstrap, topic="events", partitions=4)
    url = f"kafka://{broker.bootstrap}/events?partitions=4"
    ledger = data / "ledger.tsv"
    cmd = [sys.executable, "-m", "livetower", "--log-level", "INFO", "train", "--data-dir", str(data), "--events",
           url, "--tiny", "--backend", args.backend, "--ledger", str(ledger), "--trainer-metrics-port", "-1",
           "--train-threads", "1", "--round-min-events", "300", "--round-interval-s", "1",
           "--max-round-events", str(args.max_round_events)]
    producer = Producer(target, rate=args.rate, users=args.users, items=args.items, seed=args.seed)
    try:
        producer.send(producer.make(args.initial_events))
        print(f"{args.initial_events} events on the topic; producing {args.rate:g}/s from now on", flush=True)
        producer.start()
        kills, recoveries = [], []
        log = open(out / "trainer.log", "wb")
        for k in range(args.kills):
            before = checkpoint_mtime(data)
            started = time.monotonic()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            life = rng.uniform(args.min_s, args.max_s)
            recovered = None
            while time.monotonic() - started < life:
                if recovered is None and checkpoint_mtime(data) != before:
                    recovered = time.monotonic() - started
                if proc.poll() is not None:
                    raise SystemExit(f"the trainer exited by itself (code {proc.returncode}) after a kill: see "
                                     f"{out / 'trainer.log'}")
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills.append(round(life, 3))
            if recovered is not None:
                recoveries.append(recovered)
            print(f"kill {k + 1}/{args.kills} after {life:.1f} s"
                  f"{'' if recovered is None else f' (first new checkpoint {recovered:.1f} s after start)'}",
                  flush=True)
        producer.stop.set()
        producer.join()
        print(f"producer stopped after {len(producer.produced)} events; draining", flush=True)
        started, before = time.monotonic(), checkpoint_mtime(data)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        final_recovery = None
        expected = len(producer.produced)
        while time.monotonic() - started < args.drain_timeout_s:
            if final_recovery is None and checkpoint_mtime(data) != before:
                final_recovery = time.monotonic() - started
            if ledger.exists() and len(set(read_ledger(ledger, 10**9)[0])) >= expected:
                break
            if proc.poll() is not None:
                raise SystemExit(f"the trainer exited (code {proc.returncode}): see {out / 'trainer.log'}")
            time.sleep(0.5)
        time.sleep(2.0)  # let the round that trained the last events write its checkpoint
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        if final_recovery is not None:
            recoveries.append(final_recovery)
    finally:
        producer.stop.set()
        broker.stop()

    import torch

    ckpt = torch.load(data / "trainer" / "checkpoint.pt", map_location="cpu", weights_only=False)
    committed, redone = read_ledger(ledger, ckpt["step"])
    produced = set(producer.produced)
    trained = set(committed)
    registry = Registry(data / "registry")
    versions = registry.versions()
    bad_engines = []
    for v in versions:
        try:
            registry.verify(v)
        except Exception as e:  # noqa: BLE001 - collect, report
            bad_engines.append(f"v{v}: {e}")
    log_text = (out / "trainer.log").read_text(errors="replace")
    results = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "kills": len(kills), "kill_after_s": kills,
        "events_produced": len(produced), "events_trained_committed": len(committed),
        "events_lost": len(produced - trained), "unknown_trained": len(trained - produced),
        "duplicates_trained": len(committed) - len(trained), "events_redone_after_kills": redone,
        "checkpoint_step": ckpt["step"], "trained_events_in_checkpoint": ckpt["trained_events"],
        "restarts_resumed_from_checkpoint": log_text.count("resumed from checkpoint"),
        "checkpoint_load_failures": log_text.count("checkpoint format") + log_text.count("UnpicklingError"),
        "engines_published": len(versions), "engines_failing_verification": bad_engines,
        "stale_staging_dirs_removed_at_restart": log_text.count("half-built engine dir"),
        "recovery_s": {"max": max(recoveries, default=None),
                       "median": sorted(recoveries)[len(recoveries) // 2] if recoveries else None,
                       "samples": [round(r, 2) for r in recoveries]},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "results.png")
    print(json.dumps({k: v for k, v in results.items() if k not in ("config", "kill_after_s")}, indent=1))
    ok = results["events_lost"] == 0 and not bad_engines
    print(f"{'PASS' if ok else 'FAIL'}: {results['events_lost']} lost, {len(bad_engines)} bad engines; "
          f"results in {out}", flush=True)
    return 0 if ok else 1


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(["produced", "trained\n(committed)", "lost", "duplicates", "redone\nafter kills"],
          [r["events_produced"], r["events_trained_committed"], r["events_lost"], r["duplicates_trained"],
           r["events_redone_after_kills"]], color=["C0", "C2", "C3", "C1", "C7"])
    a.set_title(f"{r['kills']} kill -9s of the trainer")
    a.set_ylabel("events")
    b.plot(r["recovery_s"]["samples"], "o-")
    b.set_xlabel("restart")
    b.set_ylabel("start → first new checkpoint (s)")
    b.set_title("recovery after each restart")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
