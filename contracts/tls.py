"""TLS for the gRPC listeners and the clients that call them: the two config dataclasses and their credentials.

Server: `TlsConfig(cert_file, key_file, client_ca_file)`; a client CA makes client certificates required (mTLS).
Client: `ClientTls(ca_file, cert_file, key_file, server_name)`; `channel(target, tls)` / `aio_channel(...)` give a
secure channel when tls is set, a plaintext one (localhost tests and benchmarks) when it is None.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import grpc


@dataclass(kw_only=True, frozen=True, slots=True)
class TlsConfig:
    cert_file: Path | None = None       # PEM certificate chain the listeners present (with key_file: TLS on)
    key_file: Path | None = None        # PEM private key of cert_file
    client_ca_file: Path | None = None  # PEM CA bundle; set: every client must present a certificate it signed (mTLS)

    def __post_init__(self) -> None:
        if self.cert_file is None or self.key_file is None:
            raise ValueError("TlsConfig needs both cert_file and key_file (tls_cert_file, tls_key_file)")
        for name in ("cert_file", "key_file", "client_ca_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"tls {name} {path} is not a readable file")

    def server_credentials(self) -> grpc.ServerCredentials:
        ca = Path(self.client_ca_file).read_bytes() if self.client_ca_file else None
        pair = (Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes())
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


@dataclass(kw_only=True, frozen=True, slots=True)
class ClientTls:
    ca_file: Path | None = None      # PEM CA bundle that signed the server's certificate; None: the system roots
    cert_file: Path | None = None    # PEM client certificate (servers that require mTLS)
    key_file: Path | None = None     # PEM private key of cert_file
    server_name: str | None = None   # name to check the server's certificate against; None: the target's host

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("ClientTls needs cert_file and key_file together (a client certificate and its key)")
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"tls {name} {path} is not a readable file")

    def credentials(self) -> grpc.ChannelCredentials:
        def read(p: Path | None) -> bytes | None:
            return Path(p).read_bytes() if p is not None else None

        return grpc.ssl_channel_credentials(root_certificates=read(self.ca_file), private_key=read(self.key_file),
                                            certificate_chain=read(self.cert_file))

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


RECOMMENDER_SERVICE = "livetower.v1.Recommender"


def service_config(health_service: str | None = None) -> str:
    """Every channel balances round robin over the addresses its target resolves to: `dns:///name:port` (a
    Kubernetes headless Service: one A record per ready replica, re-resolved as they come and go), `ipv4:a:p1,b:p2`,
    or a plain host:port (one address: the same as gRPC's default pick_first).

    Recommend and Score are reads: one that fails UNAVAILABLE (its replica was killed, restarted or is still
    loading) is sent again, to the next replica, within the call's deadline. health_service: pick only replicas
    whose gRPC health service reports it SERVING (client-side health checking; the server reports the Recommender
    SERVING once an engine serves, NOT_SERVING while it drains), so a replica that is up but not ready, or
    shutting down, takes no traffic."""
    reads = [{"service": RECOMMENDER_SERVICE, "method": m} for m in ("Recommend", "Score")]
    config: dict = {"loadBalancingConfig": [{"round_robin": {}}],
                    "methodConfig": [{"name": reads, "retryPolicy": {
                        "maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.05s", "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"]}}]}
    if health_service:
        config["healthCheckConfig"] = {"serviceName": health_service}
    return json.dumps(config)


ROUND_ROBIN = ("grpc.service_config", service_config())
# A replica whose link died sends no RST: without pings a channel would keep sending it calls until each one's
# deadline. Pinging every second (1 s to answer) closes such a transport within about 2 s, and round robin then
# skips it. The server accepts pings this often (SERVER_KEEPALIVE).
KEEPALIVE = (("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_timeout_ms", 1000),
             ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0))
# (The server's minimum interval between received pings is C-core's
# GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, whose string is "grpc.http2.min_ping_interval_without_data_ms":
# with its default 5 min, clients pinging every second got GOAWAY too_many_pings.)
SERVER_KEEPALIVE = (("grpc.http2.min_ping_interval_without_data_ms", 500), ("grpc.keepalive_permit_without_calls", 1))


def _options(health_service: str | None, options: Sequence[tuple[str, object]]) -> list[tuple[str, object]]:
    config = ROUND_ROBIN if health_service is None else ("grpc.service_config", service_config(health_service))
    return [config, *KEEPALIVE, *options]


def channel(target: str, tls: ClientTls | None, options: Sequence[tuple[str, object]] = (),
            health_service: str | None = None) -> grpc.Channel:
    """A synchronous channel to target: TLS when tls is given, else plaintext; round robin over its addresses."""
    if tls is None:
        return grpc.insecure_channel(target, options=_options(health_service, options))
    return grpc.secure_channel(target, tls.credentials(), options=[*_options(health_service, options), *tls.options()])


def aio_channel(target: str, tls: ClientTls | None, options: Sequence[tuple[str, object]] = (),
                health_service: str | None = None) -> grpc.aio.Channel:
    """An asyncio channel to target: TLS when tls is given, else plaintext; round robin over its addresses."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=_options(health_service, options))
    return grpc.aio.secure_channel(target, tls.credentials(),
                                   options=[*_options(health_service, options), *tls.options()])


def is_loopback(host: str) -> bool:
    """True for a host that only this machine can reach (the plaintext default is safe there)."""
    host = host.strip("[]")
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except OSError:
            return False
