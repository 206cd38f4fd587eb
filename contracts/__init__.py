"""The contracts that server/ and trainer/ (and the tools above them) share, each in one named place:
events and their validation, the event log and Kafka wire format, the engine registry and its manifest,
the rollout state, the engine format's loaders and verification (engine_format/), atomic file writes, and
a thin client of the gRPC API. Imports only proto/ and third-party packages (docs/architecture.md)."""
