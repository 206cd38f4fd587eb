"""Kafka SSL/SASL options: parsed from the events URL, validated, and handed to every aiokafka client the project
creates. There is no TLS/SASL Kafka broker here, so these check what reaches aiokafka's real constructors (which
validate the combination), not a handshake."""

from __future__ import annotations

import asyncio
import os
import ssl

import aiokafka
import aiokafka.admin
import pytest
import trustme

from contracts.kafka_events import KafkaEventProducer, ensure_topics, parse_events_url
from server.events.kafka_feed import KafkaHistoryFeed, OwnEventIds
from trainer.sources.kafka import KafkaEventSource


class _Stop(Exception):
    pass


@pytest.fixture
def secure_url(tmp_path):
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    password = tmp_path / "kafka.password"
    password.write_text("s3cret-password\n")
    os.chmod(password, 0o600)
    return (f"kafka://broker.example:9093/events?partitions=2&security_protocol=SASL_SSL&ssl_cafile={tmp_path}/ca.pem"
            f"&sasl_mechanism=SCRAM-SHA-512&sasl_username=livetower&sasl_password_file={password}")


def test_url_options_become_aiokafka_kwargs(secure_url):
    target = parse_events_url(secure_url)
    assert target.partitions == 2 and target.security.sasl_mechanism == "SCRAM-SHA-512"
    assert "s3cret" not in repr(target)  # the password stays in its file
    kw = target.client_kwargs()
    assert kw["bootstrap_servers"] == "broker.example:9093" and kw["security_protocol"] == "SASL_SSL"
    assert isinstance(kw["ssl_context"], ssl.SSLContext)
    assert (kw["sasl_mechanism"], kw["sasl_plain_username"], kw["sasl_plain_password"]) == (
        "SCRAM-SHA-512", "livetower", "s3cret-password")
    assert parse_events_url("kafka://h:1/t").client_kwargs() == {"bootstrap_servers": "h:1",
                                                                 "security_protocol": "PLAINTEXT"}


@pytest.mark.parametrize("query, needle", [
    ("security_protocol=TLS", "security_protocol must be one of"),
    ("security_protocol=SASL_SSL&sasl_mechanism=GSSAPI&sasl_username=u&sasl_password_file=/p", "sasl_mechanism"),
    ("security_protocol=SASL_PLAINTEXT&sasl_mechanism=PLAIN", "needs sasl_username and sasl_password_file"),
    ("sasl_username=u", "needs security_protocol SASL_PLAINTEXT or SASL_SSL"),
    ("security_protocol=SSL&ssl_cafile=/no/such.pem", "is not a readable file"),
    ("sasl_password=x", "unknown option(s) ['sasl_password']"),
])
def test_bad_security_options_are_refused(query, needle):
    with pytest.raises(ValueError) as e:
        parse_events_url(f"kafka://h:1/t?{query}")
    assert needle in str(e.value)


def test_password_file_must_be_private(secure_url, tmp_path):
    os.chmod(tmp_path / "kafka.password", 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        parse_events_url(secure_url).client_kwargs()


def _recording(monkeypatch, module, name, seen: list):
    real = getattr(module, name)

    class Recording(real):  # the real aiokafka constructor validates the kwargs; start() stops the test there
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append((name, self))

        async def start(self):
            raise _Stop(name)

    monkeypatch.setattr(module, name, Recording)


def test_every_client_gets_the_security_options(secure_url, monkeypatch):
    seen: list = []
    _recording(monkeypatch, aiokafka.admin, "AIOKafkaAdminClient", seen)
    _recording(monkeypatch, aiokafka, "AIOKafkaProducer", seen)
    _recording(monkeypatch, aiokafka, "AIOKafkaConsumer", seen)
    target = parse_events_url(secure_url)

    async def attempts():
        for start in (lambda: ensure_topics(target),
                      lambda: KafkaHistoryFeed(target, lambda u, i: None, OwnEventIds(), warm_events=0).start()):
            with pytest.raises((_Stop, ConnectionError)):
                await start()
        monkeypatch.setattr("contracts.kafka_events.ensure_topics", _noop)
        monkeypatch.setattr("trainer.sources.kafka.ensure_topics", _noop)
        with pytest.raises(_Stop):
            await KafkaEventProducer(target).start()

    asyncio.run(attempts())
    with pytest.raises(_Stop):
        KafkaEventSource(target, call_timeout_s=5)  # the trainer's consumer (and producer, for dead letters)
    kinds = [name for name, _ in seen]
    assert {"AIOKafkaAdminClient", "AIOKafkaProducer", "AIOKafkaConsumer"} <= set(kinds), kinds
    for name, client in seen:
        inner = getattr(client, "_client", None) or client.client  # the AIOKafkaClient each one holds
        assert inner._security_protocol == "SASL_SSL" and inner._sasl_mechanism == "SCRAM-SHA-512", name
        assert inner._sasl_plain_username == "livetower" and isinstance(inner._ssl_context, ssl.SSLContext), name


async def _noop(*args, **kwargs):
    return None
