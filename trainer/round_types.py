"""What a round returns, and how it splits its events: shared by the full rounds (trainer/loop.py) and the short
ones (trainer/short_round_control.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RoundResult:
    events: int
    holdout_users: int
    metrics: dict[str, float]
    gate: str               # "passed" | "failed" | "skipped" | "short" (a short round: no gate of its own)
    published_version: int  # 0 when nothing was published
    seconds: float


@dataclass(frozen=True, slots=True)
class RoundSplit:
    """A round's events by user, and the users whose newest event is held out for evaluation."""
    new_by_user: dict[str, list[int]]  # each user's item rows read this round, in order
    seqs: dict[str, list[int]]         # each of those users' kept history + the new rows
    holdout: list[str]                 # users whose newest event is held out (sorted)
