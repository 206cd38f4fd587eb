"""The one parity check of the engine format: a user-tower runner against reference outputs on golden inputs.
The trainer runs it before publishing (against the eager torch model, tolerance TrainConfig.parity_tolerance);
the server runs it before an engine takes traffic (against the manifest's golden outputs)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from proto import livetower_v1_pb2 as pb


class ParityError(ValueError):
    """The runner's outputs cannot be compared with the reference (wrong shape, not finite)."""


def golden_set(manifest: pb.EngineManifest) -> tuple[np.ndarray, np.ndarray]:
    """The manifest's golden inputs (B, T) int64 item rows and reference outputs (B, D) float32."""
    g = manifest.golden
    rows_BT = np.asarray(g.history_rows, dtype=np.int64).reshape(g.batch, g.seq_len)
    want_BD = np.asarray(g.user_embeddings, dtype=np.float32).reshape(g.batch, g.dim)
    return rows_BT, want_BD


def parity_max_abs_diff(runner: Callable[[np.ndarray], np.ndarray], rows_BT: np.ndarray, want_BD: np.ndarray) -> float:
    """max |runner(rows) - want| over the golden batch; ParityError when shapes differ or outputs are not finite."""
    got_BD = np.asarray(runner(np.asarray(rows_BT)))
    if got_BD.shape != want_BD.shape:
        raise ParityError(f"golden output shape {got_BD.shape} != {want_BD.shape}")
    diff = float(np.max(np.abs(got_BD - want_BD)))
    if not np.isfinite(diff):
        raise ParityError("golden outputs are not finite")
    return diff
