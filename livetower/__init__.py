"""livetower: real-time two-tower recommendations over gRPC with a sidecar trainer.

This package holds the CLI and the code that server/ and trainer/ share (event contract and log,
engine registry, atomic file writes). server/ never imports trainer/; both import from here.
"""
