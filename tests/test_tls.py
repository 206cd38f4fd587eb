"""TLS and mTLS on both listeners over real sockets (certificates from trustme), the admin listener's own
reflection, and the admin token file's permissions."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from contracts.client import Client
from contracts.tls import ClientTls, TlsConfig, channel, is_loopback
from proto import livetower_v1_pb2 as pb
from server.app import create_server
from tests.conftest import ADMIN_TOKEN, running_server, server_config


def _write(path: Path, blob) -> Path:
    blob.write_to_path(str(path))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A server CA with a localhost certificate, a client CA with a client certificate, and a rogue CA's client."""
    d = tmp_path_factory.mktemp("pki")
    server_ca, client_ca, rogue_ca = trustme.CA(), trustme.CA(), trustme.CA()
    server_cert = server_ca.issue_cert("localhost", "127.0.0.1")
    good, rogue = client_ca.issue_cert("producer-1"), rogue_ca.issue_cert("producer-1")
    files = {"server_ca": _write(d / "server-ca.pem", server_ca.cert_pem),
             "client_ca": _write(d / "client-ca.pem", client_ca.cert_pem),
             "server_cert": _write(d / "server.pem", server_cert.cert_chain_pems[0]),
             "server_key": _write(d / "server.key", server_cert.private_key_pem)}
    for name, cert in (("good", good), ("rogue", rogue)):
        files[f"{name}_cert"] = _write(d / f"{name}.pem", cert.cert_chain_pems[0])
        files[f"{name}_key"] = _write(d / f"{name}.key", cert.private_key_pem)
    return files


def _event() -> pb.Event:
    return pb.Event(event_id=f"tls-{time.time_ns()}", user_id="u1", item_id="item-1", action="click", weight=1.0,
                    timestamp_ms=int(time.time() * 1000))


def _health(ch: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_tls_server_refuses_plaintext_and_serves_tls(pki, tmp_path):
    tls = TlsConfig(cert_file=pki["server_cert"], key_file=pki["server_key"])
    with running_server(server_config(tmp_path / "data", tls=tls)) as (server, port):
        for p in (port, server.admin_port):
            with grpc.insecure_channel(f"127.0.0.1:{p}") as ch, pytest.raises(grpc.RpcError) as e:
                _health(ch)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        wrong_ca = ClientTls(ca_file=pki["client_ca"])  # a CA that did not sign the server's certificate
        with channel(f"localhost:{port}", wrong_ca) as ch, pytest.raises(grpc.RpcError) as e:
            _health(ch)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        client = Client(f"localhost:{port}", admin_target=f"localhost:{server.admin_port}", admin_token=ADMIN_TOKEN,
                        tls=ClientTls(ca_file=pki["server_ca"]))
        assert _health(client.channel) == health_pb2.HealthCheckResponse.SERVING
        assert client.log_events([_event()]).accepted == 1
        assert client.rollout().state  # admin over TLS on the admin listener
        client.close()
        # The certificate names localhost and 127.0.0.1; another name is refused unless overridden.
        ip = ClientTls(ca_file=pki["server_ca"], server_name="localhost")
        with channel(f"127.0.0.1:{port}", ip) as ch:
            assert _health(ch) == health_pb2.HealthCheckResponse.SERVING


def test_mtls_requires_a_client_certificate_from_the_client_ca(pki, tmp_path):
    tls = TlsConfig(cert_file=pki["server_cert"], key_file=pki["server_key"], client_ca_file=pki["client_ca"])
    with running_server(server_config(tmp_path / "data", tls=tls)) as (server, port):
        refused = {"no client certificate": ClientTls(ca_file=pki["server_ca"]),
                   "another CA's certificate": ClientTls(ca_file=pki["server_ca"], cert_file=pki["rogue_cert"],
                                                         key_file=pki["rogue_key"])}
        for what, tls_client in refused.items():
            for p in (port, server.admin_port):
                with channel(f"localhost:{p}", tls_client) as ch, pytest.raises(grpc.RpcError) as e:
                    _health(ch)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE, what
        good = ClientTls(ca_file=pki["server_ca"], cert_file=pki["good_cert"], key_file=pki["good_key"])
        client = Client(f"localhost:{port}", admin_target=f"localhost:{server.admin_port}", admin_token=ADMIN_TOKEN,
                        tls=good)
        assert client.log_events([_event()]).accepted == 1
        assert client.list_engines().serving_version == 0
        client.close()


def test_tls_config_validation(pki, tmp_path):
    with pytest.raises(ValueError, match="cert_file and key_file"):
        TlsConfig(cert_file=pki["server_cert"])
    with pytest.raises(ValueError, match="client_ca_file"):
        TlsConfig(cert_file=pki["server_cert"], key_file=pki["server_key"], client_ca_file=tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="together"):
        ClientTls(cert_file=pki["good_cert"])
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")


def test_plaintext_on_a_public_interface_warns(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="livetower.server")
    with running_server(server_config(tmp_path / "data", host="0.0.0.0")):
        pass
    assert any("PLAINTEXT" in r.getMessage() and "--tls-cert-file" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with running_server(server_config(tmp_path / "data")):
        pass
    assert not any("PLAINTEXT" in r.getMessage() for r in caplog.records)


def test_admin_token_file_must_be_private(tmp_path, monkeypatch):
    monkeypatch.delenv("LIVETOWER_ADMIN_TOKEN", raising=False)
    data = tmp_path / "data"
    data.mkdir()
    token_file = data / "admin.token"
    token_file.write_text("a-token-of-enough-length-1234\n")
    os.chmod(token_file, 0o644)
    with pytest.raises(ValueError, match=f"chmod 600 {token_file}"):
        create_server(server_config(data), admin_token=None)
    from livetower.cli import main

    with pytest.raises(SystemExit, match=f"chmod 600 {token_file}"):  # the CLI refuses it too
        main(["engines", "status", "--admin-token-file", str(token_file)])
    os.chmod(token_file, 0o600)
    with running_server(server_config(data), admin_token=None) as (server, port):
        c = Client(f"127.0.0.1:{port}", admin_target=f"127.0.0.1:{server.admin_port}",
                   admin_token="a-token-of-enough-length-1234")
        assert c.rollout().state
        c.close()


def test_missing_admin_token_file_is_created_private(tmp_path):
    with running_server(server_config(tmp_path / "data"), admin_token=None):
        pass
    token_file = tmp_path / "data" / "admin.token"
    assert token_file.stat().st_mode & 0o777 == 0o600 and len(token_file.read_text().strip()) >= 32
