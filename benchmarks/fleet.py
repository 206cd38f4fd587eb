"""A fleet on one machine, for tests and benchmarks: N `livetower serve --fleet` replicas, each in its own network
namespace (benchmarks/fleet_hosts.py), on one Kafka-protocol broker (tansu) and one registry on S3 (a moto server
process), both in the root namespace. Real processes, real links: a replica can be killed -9, restarted, or cut
off, and clients balance over the replicas' addresses round robin.

    with Fleet(workdir, engines_from=Registry(local_dir), config=FleetConfig(replicas=3)) as fleet:
        fleet.client(0).rollout(); fleet.publish(1); fleet.kill(2); fleet.start_replica(2)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from benchmarks.fleet_hosts import Hosts
from benchmarks.swap import copy_in
from benchmarks.swap import wait as _wait
from benchmarks.tansu import LocalBroker, free_port
from contracts.registry import Registry

S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}  # moto's dummies
BUCKET = "livetower-engines"
DATA_PORT, ADMIN_PORT = 50051, 50052
ADMIN_TOKEN = "fleet-admin-token-0123456789abcdef"


@dataclass(kw_only=True, frozen=True, slots=True)
class FleetConfig:
    replicas: int = 3                     # server replicas, one per network namespace
    lease_s: float = 5.0                  # the decision lease (serve --lease-s)
    poll_interval_s: float = 1.0          # how often each replica reads rollout.json (serve --poll-interval-s)
    threads: int = 1                      # user-tower threads per replica (serve --threads)
    partitions: int = 4                   # of the events topic
    registry: str = "s3"                  # "s3": a bucket on the moto server; "dir": a directory every host
                                          # mounts (one filesystem under the namespaces, as NFS would give)
    extra_args: tuple[str, ...] = ()      # more `livetower serve` flags for every replica
    env: dict[str, str] = field(default_factory=dict)  # more environment for every replica

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.registry not in ("s3", "dir"):
            raise ValueError(f"registry must be 's3' or 'dir', got {self.registry!r}")
        for name in ("lease_s", "poll_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


class Fleet:
    def __init__(self, workdir: Path, *, engines_from: Registry, config: FleetConfig = FleetConfig(),
                 log=print) -> None:
        self.workdir = Path(workdir)
        self.engines_from = engines_from  # a local registry the published engines are copied from
        self.config = config
        self.hosts = Hosts(config.replicas)
        self.broker: LocalBroker | None = None
        self.procs: dict[int, subprocess.Popen] = {}
        self._moto: subprocess.Popen | None = None
        self._log = log
        self.registry_url = ""
        self.events_url = ""

    # ---- set-up
    def start(self) -> "Fleet":
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.environ.update(S3_ENV)  # this process publishes and reads the registry too
        self.hosts.up()
        gw = self.hosts.gateway
        self.broker = LocalBroker(host=gw, log_path=self.workdir / "tansu.log").start()
        s3_port = free_port()
        self._moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", gw, "-p", str(s3_port)],
                                      stdout=open(self.workdir / "moto.log", "ab"), stderr=subprocess.STDOUT)
        endpoint = f"http://{gw}:{s3_port}"
        _wait(lambda: _listening(gw, s3_port), 30, f"moto S3 server on {endpoint}")
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        self.registry_url = (f"s3://{BUCKET}/fleet?endpoint={endpoint}&region=us-east-1" if self.config.registry == "s3"
                             else str(self.workdir / "shared-registry"))
        self.events_url = f"kafka://{self.broker.bootstrap}/fleet-events?partitions={self.config.partitions}"
        (self.workdir / "admin.token").write_text(ADMIN_TOKEN)
        os.chmod(self.workdir / "admin.token", 0o600)
        self._log(f"fleet: {self.config.replicas} hosts on {self.hosts.subnet}.0/24, broker {self.broker.bootstrap}, "
                  f"registry {self.registry_url}")
        return self

    def registry(self) -> Registry:
        """The shared registry, as a trainer or operator outside the fleet sees it."""
        from contracts.object_registry import open_registry

        return open_registry(self.registry_url, self.workdir / "publisher")

    def publish(self, version: int) -> int:
        """Copy engines_from's `version` into the shared registry as its next version; returns that number."""
        return copy_in(self.engines_from, version, self.registry())

    def serve_argv(self, i: int) -> list[str]:
        c = self.config
        return [str(Path(sys.executable).parent / "livetower"), "serve", "--fleet",
                "--data-dir", str(self.workdir / f"replica-{i}"), "--events", self.events_url,
                "--registry", self.registry_url, "--replica-id", f"replica-{i}",
                "--advertise", self.hosts.address(i), "--host", "0.0.0.0", "--port", str(DATA_PORT),
                "--admin-host", "0.0.0.0", "--admin-port", str(ADMIN_PORT),
                "--admin-token-file", str(self.workdir / "admin.token"), "--metrics-port", "-1",
                "--threads", str(c.threads), "--lease-s", str(c.lease_s), "--poll-interval-s", str(c.poll_interval_s),
                *c.extra_args]

    def start_replica(self, i: int) -> subprocess.Popen:
        env = {**os.environ, **S3_ENV, "LIVETOWER_LOG_LEVEL": "INFO", **self.config.env}
        log = open(self.workdir / f"replica-{i}.log", "ab")
        proc = self.hosts.popen(i, self.serve_argv(i), stdout=log, stderr=subprocess.STDOUT, env=env)
        self.procs[i] = proc
        return proc

    def start_all(self, *, serving_version: int, timeout_s: float = 120.0) -> None:
        for i in range(self.config.replicas):
            self.start_replica(i)
        self.wait_serving(serving_version, timeout_s=timeout_s)

    def wait_serving(self, version: int, *, replicas=None, timeout_s: float = 120.0) -> None:
        for i in replicas if replicas is not None else range(self.config.replicas):
            _wait(lambda i=i: self._serves(i, version), timeout_s, f"replica {i} serving engine {version} "
                                                                   f"(log: {self.workdir}/replica-{i}.log)")

    def _serves(self, i: int, version: int) -> bool:
        proc = self.procs.get(i)
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"replica {i} exited with code {proc.returncode}; see {self.workdir}/replica-{i}.log")
        r = self.rollout(i, timeout_s=1.0)
        return r is not None and r.stable_version == version

    # ---- clients
    def data_target(self, i: int) -> str:
        return f"{self.hosts.address(i)}:{DATA_PORT}"

    def balanced_target(self) -> str:
        """Every replica's data address, for a round-robin channel (what dns:/// gives on Kubernetes)."""
        return "ipv4:" + ",".join(self.data_target(i) for i in range(self.config.replicas))

    def client(self, i: int, timeout_s: float = 5.0):
        from contracts.client import Client

        return Client(self.data_target(i), admin_target=f"{self.hosts.address(i)}:{ADMIN_PORT}",
                      admin_token=ADMIN_TOKEN, timeout_s=timeout_s)

    def rollout(self, i: int, timeout_s: float = 2.0):
        """Replica i's GetRollout, or None when it does not answer."""
        c = self.client(i, timeout_s)
        try:
            return c.rollout()
        except grpc.RpcError:
            return None
        finally:
            c.close()

    def holder(self, *, other_than: int = -1, timeout_s: float = 15.0) -> int:
        """The index of the replica holding the decision lease, as the answering replicas report it, other than
        `other_than` (a holder just killed); waits up to timeout_s for one."""
        def find():
            for i in range(self.config.replicas):
                r = self.rollout(i, timeout_s=0.5) if i != other_than else None
                if r is not None and r.leader and r.leader != f"replica-{other_than}":
                    return int(r.leader.rsplit("-", 1)[1]) + 1  # + 1: index 0 would read as "not yet"
            return None
        return _wait(find, timeout_s, "a lease holder") - 1

    # ---- faults
    def kill(self, i: int) -> None:
        proc = self.procs[i]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.broker is not None:
            self.broker.stop()
        if self._moto is not None and self._moto.poll() is None:
            self._moto.kill()
            self._moto.wait()
        self.hosts.down()

    def __enter__(self) -> "Fleet":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def _listening(host: str, port: int) -> bool:
    import socket

    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False
