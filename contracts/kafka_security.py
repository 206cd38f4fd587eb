"""Kafka connection security (SSL and SASL) for every aiokafka client the project creates.

Given as options of the events URL, so one `--events` carries them to the server, the trainer and the tools:

    kafka://broker:9093/events?security_protocol=SASL_SSL&ssl_cafile=/etc/kafka/ca.pem
        &sasl_mechanism=SCRAM-SHA-512&sasl_username=livetower&sasl_password_file=/etc/livetower/kafka.password

The password is never in the URL: it is read from a private file (mode 0600, contracts/secret_files.py) when a
client is created. `aiokafka_kwargs()` is what each AIOKafkaProducer / Consumer / AdminClient receives.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, fields
from pathlib import Path

from contracts.secret_files import read_secret

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(kw_only=True, frozen=True, slots=True)
class KafkaSecurity:
    security_protocol: str = "PLAINTEXT"   # one of PROTOCOLS
    ssl_cafile: Path | None = None         # PEM CA bundle for the broker's certificate (SSL*); None: system roots
    ssl_certfile: Path | None = None       # PEM client certificate (brokers that require mTLS)
    ssl_keyfile: Path | None = None        # PEM private key of ssl_certfile
    sasl_mechanism: str | None = None      # SASL_*: one of SASL_MECHANISMS
    sasl_username: str | None = None       # SASL_*: the user
    sasl_password_file: Path | None = None  # SASL_*: private file (0600) holding the password

    def __post_init__(self) -> None:
        if self.security_protocol not in PROTOCOLS:
            raise ValueError(f"security_protocol must be one of {PROTOCOLS}, got {self.security_protocol!r}")
        uses_ssl = self.security_protocol in ("SSL", "SASL_SSL")
        uses_sasl = self.security_protocol.startswith("SASL_")
        ssl_set = [f for f in ("ssl_cafile", "ssl_certfile", "ssl_keyfile") if getattr(self, f) is not None]
        if ssl_set and not uses_ssl:
            raise ValueError(f"{ssl_set[0]} needs security_protocol SSL or SASL_SSL, got {self.security_protocol}")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together (a client certificate and its key)")
        for name in ssl_set:
            if not Path(getattr(self, name)).is_file():
                raise ValueError(f"{name} {getattr(self, name)} is not a readable file")
        sasl_set = [f for f in ("sasl_mechanism", "sasl_username", "sasl_password_file") if getattr(self, f)]
        if uses_sasl:
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise ValueError(f"sasl_mechanism must be one of {SASL_MECHANISMS} with {self.security_protocol}, "
                                 f"got {self.sasl_mechanism!r}")
            if not self.sasl_username or self.sasl_password_file is None:
                raise ValueError(f"{self.security_protocol} needs sasl_username and sasl_password_file")
        elif sasl_set:
            raise ValueError(f"{sasl_set[0]} needs security_protocol SASL_PLAINTEXT or SASL_SSL, "
                             f"got {self.security_protocol}")

    @classmethod
    def from_query(cls, query: dict[str, list[str]]) -> KafkaSecurity:
        """From an events URL's query (parse_qs); the keys are the field names; unknown keys are the caller's."""
        kwargs: dict[str, object] = {}
        for f in fields(cls):
            if f.name in query:
                value = query[f.name][-1]
                kwargs[f.name] = Path(value) if f.name.endswith(("file", "_cafile")) else value
        return cls(**kwargs)

    @classmethod
    def url_keys(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ssl_cafile) if self.ssl_cafile else None)
        if self.ssl_certfile is not None:
            ctx.load_cert_chain(str(self.ssl_certfile), str(self.ssl_keyfile))
        return ctx

    def aiokafka_kwargs(self) -> dict[str, object]:
        """Keyword arguments for an aiokafka client (the password file is read now, and must be private)."""
        out: dict[str, object] = {"security_protocol": self.security_protocol}
        if self.security_protocol in ("SSL", "SASL_SSL"):
            out["ssl_context"] = self.ssl_context()
        if self.security_protocol.startswith("SASL_"):
            out.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                       sasl_plain_password=read_secret(self.sasl_password_file, "Kafka SASL password"))
        return out
