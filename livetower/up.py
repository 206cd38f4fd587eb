"""`livetower up`: the whole loop on one machine — bootstrap events, trainer sidecar, gRPC server."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from pathlib import Path

from contracts.eventlog import SqliteEventLog
from server.app import run, serve
from server.config import ServerConfig

log = logging.getLogger("livetower.up")


def bootstrap_if_empty(event_log: SqliteEventLog, *, users: int, seed: int = 0) -> int:
    """Fill an empty log from the synthetic generator so a first engine can be trained."""
    if event_log.count() > 0:
        return 0
    from trainer.data.synthetic import SyntheticConfig, generate  # trainer code, in the bootstrap step only

    cfg = SyntheticConfig(n_users=users, seed=seed)
    total = cfg.n_users * cfg.events_per_user
    print(f"event log is empty: writing {total} synthetic events ({cfg.n_users} users, {cfg.n_items} items, "
          f"{cfg.n_clusters} drifting interest clusters)", flush=True)
    return event_log.append_all(generate(cfg), progress=lambda n: print(f"  {n}/{total} events", flush=True))


def trainer_command(data_dir: Path, train_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "livetower", "train", "--data-dir", str(data_dir), *train_args]


async def supervise_trainer(cmd: list[str], stop: asyncio.Event) -> None:
    """Run the trainer as a child process; restart it (with back-off) if it dies; stop it on exit."""
    backoff = 1.0
    while not stop.is_set():
        proc = subprocess.Popen(cmd)
        started = time.monotonic()
        while proc.poll() is None and not stop.is_set():
            await asyncio.sleep(0.5)
        if stop.is_set():
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 30)
            except subprocess.TimeoutExpired:
                proc.kill()
            return
        backoff = 1.0 if time.monotonic() - started > 60 else min(backoff * 2, 30.0)
        log.error("trainer exited with code %s; restarting in %.0fs (it resumes from its checkpoint)",
                  proc.returncode, backoff)
        await asyncio.sleep(backoff)


def bootstrap_kafka_if_empty(events_url: str, *, users: int, seed: int = 0) -> int:
    """The Kafka flavour of bootstrap_if_empty: fill an empty event topic from the synthetic generator."""
    from contracts.kafka_events import parse_events_url, produce_all, topic_size
    from trainer.data.synthetic import SyntheticConfig, generate

    target = parse_events_url(events_url)
    if asyncio.run(topic_size(target)) > 0:
        return 0
    cfg = SyntheticConfig(n_users=users, seed=seed)
    total = cfg.n_users * cfg.events_per_user
    print(f"topic {target.topic} is empty: producing {total} synthetic events", flush=True)
    return asyncio.run(produce_all(target, generate(cfg), progress=lambda n: print(f"  {n}/{total} events", flush=True)))


def _shown_host(host: str) -> str:
    return "localhost" if host in ("127.0.0.1", "localhost") else host


def run_up(config: ServerConfig, *, train_args: list[str], bootstrap_users: int,
           admin_token: str | None = None) -> None:
    if config.events_url is not None:
        bootstrap_kafka_if_empty(config.events_url, users=bootstrap_users)
    else:
        event_log = SqliteEventLog(config.events_path)
        try:
            bootstrap_if_empty(event_log, users=bootstrap_users)
        finally:
            event_log.close()

    def announce(server, port: int) -> None:
        target = f"{_shown_host(config.host)}:{port}"
        admin_target = f"{_shown_host(config.admin_host)}:{server.admin_port}"
        metrics = f"http://{config.host}:{server.metrics_port}/metrics" if server.metrics_port else "off"
        token = "" if admin_token else f" --admin-token-file {config.admin_token_path}"  # else: the env variable
        tls = " --tls-ca-file CA.pem" if config.tls else ""
        print(f"""
livetower is up: gRPC on {target} ({'TLS' if config.tls else 'plaintext'}), admin API on {admin_target}, \
metrics {metrics}, data in {config.data_dir}
The trainer sidecar is training the first engine (about a minute); until then Recommend says UNAVAILABLE.
Try, in another shell:
  livetower engines status --admin-target {admin_target}{tls}{token}
  livetower query recommend --target {target}{tls} --user user-7 --k 5
  livetower query log --target {target}{tls} --user user-7 --item item-42     # then watch a new engine appear:
                                                  # canaried on 10% of users, then promoted or rolled back
  grpcurl {'-cacert CA.pem' if config.tls else '-plaintext'} -d '{{"user_id":"user-7","k":5}}' {target} \
livetower.v1.Recommender/Recommend
Ctrl-C stops both.
""", flush=True)

    joiner_stop = None
    if config.impressions is not None:
        # The attribution joiner on a thread of this process (off the server's event loop), over the same event
        # stream the server writes: the SQLite log, or the Kafka topic.
        from livetower.cli_attribution import joiner_thread

        joiner, joiner_stop = joiner_thread(Path(config.data_dir), events_url=config.events_url)

    async def main() -> None:
        stop = asyncio.Event()
        sidecar = asyncio.create_task(supervise_trainer(trainer_command(Path(config.data_dir), train_args), stop))
        try:
            await serve(config, on_started=announce, admin_token=admin_token)
        finally:
            stop.set()
            await sidecar

    try:
        run(main(), use_uvloop=config.uvloop)
    finally:
        if joiner_stop is not None:
            joiner_stop.set()
            joiner.join(10)
