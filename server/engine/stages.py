"""Where an engine's compute time goes: cumulative wall seconds per stage of a Recommend batch, counted on
the thread that computes it (the compute thread: wall time there is its CPU time, the stages never block).
One clock per server process, shared by every engine it serves; the metrics endpoint exports it."""

from __future__ import annotations

STAGES = ("rows", "tower", "retrieval", "assemble")  # history -> item rows; user tower; top-k; ids + scores


class StageClock:
    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.batches = 0
        self.queries = 0

    def add(self, stamps: tuple[float, ...], queries: int) -> None:
        """stamps: perf_counter() at the start and after each of STAGES (len(STAGES) + 1 values)."""
        for name, a, b in zip(STAGES, stamps, stamps[1:]):
            self.seconds[name] += b - a
        self.batches += 1
        self.queries += queries
