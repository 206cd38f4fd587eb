"""Request checks. Each returns None or a message naming the field and the limit."""

from __future__ import annotations

from typing import Sequence

from server.config import RequestLimits


def id_problem(field: str, value: str, limits: RequestLimits) -> str | None:
    if not value:
        return f"{field} is empty; it must be 1..{limits.max_id_chars} characters"
    if len(value) > limits.max_id_chars:
        return f"{field} has {len(value)} characters; the limit is {limits.max_id_chars}"
    return None


def ids_problem(field: str, values: Sequence[str], max_count: int, limits: RequestLimits,
                *, min_count: int = 0) -> str | None:
    if len(values) > max_count:
        return f"{field} has {len(values)} entries; the limit is {max_count}"
    if len(values) < min_count:
        return f"{field} has {len(values)} entries; at least {min_count} required"
    for i, v in enumerate(values):
        p = id_problem(f"{field}[{i}]", v, limits)
        if p:
            return p
    return None


def recommend_problem(req, limits: RequestLimits) -> str | None:
    if not 1 <= req.k <= limits.max_k:
        return f"k is {req.k}; it must be in 1..{limits.max_k}"
    return id_problem("user_id", req.user_id, limits) or ids_problem("history", req.history, limits.max_history, limits)


def score_problem(req, limits: RequestLimits) -> str | None:
    return (id_problem("user_id", req.user_id, limits)
            or ids_problem("history", req.history, limits.max_history, limits)
            or ids_problem("candidate_ids", req.candidate_ids, limits.max_candidates, limits, min_count=1))
