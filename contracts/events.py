"""The event contract: validation shared by every producer path (LogEvents, log readers, Kafka later)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from proto import livetower_v1_pb2 as pb


@dataclass(kw_only=True, frozen=True, slots=True)
class EventLimits:
    max_id_chars: int = 256          # user_id / item_id length limit
    max_event_id_chars: int = 128    # event_id length limit
    max_action_chars: int = 32       # action length limit
    max_impression_id_chars: int = 64  # impression_id length limit (optional field; "" = none)
    max_abs_weight: float = 1e6      # |weight| limit
    max_future_ms: int = 5 * 60 * 1000  # how far past the server's clock a timestamp may lie (clock skew). Small on
                                        # purpose: one event stamped a day ahead would move the trainer's event-time
                                        # watermark (and the freshness metric) a day ahead

    def __post_init__(self) -> None:
        for name in ("max_id_chars", "max_event_id_chars", "max_action_chars", "max_impression_id_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"EventLimits.{name} must be >= 1, got {getattr(self, name)}")
        if not self.max_abs_weight > 0:
            raise ValueError(f"EventLimits.max_abs_weight must be > 0, got {self.max_abs_weight}")
        if self.max_future_ms < 0:
            raise ValueError(f"EventLimits.max_future_ms must be >= 0, got {self.max_future_ms}")


DEFAULT_LIMITS = EventLimits()
# What an impression id may hold: the server's are 32 hex digits (UUIDv7 layout); clients echo them back. A
# closed alphabet keeps the attribution store's keys printable and free of separators.
IMPRESSION_ID_CHARS = re.compile(r"[A-Za-z0-9_-]*")


def event_problem(ev: pb.Event, now_ms: int, limits: EventLimits = DEFAULT_LIMITS) -> str | None:
    """Why `ev` cannot be accepted (naming the field and the limit), or None when it is valid."""
    for field, limit in (("event_id", limits.max_event_id_chars), ("user_id", limits.max_id_chars),
                         ("item_id", limits.max_id_chars), ("action", limits.max_action_chars)):
        value = getattr(ev, field)
        if not value:
            return f"{field} is empty; it must be 1..{limit} characters"
        if len(value) > limit:
            return f"{field} has {len(value)} characters; the limit is {limit}"
    if len(ev.impression_id) > limits.max_impression_id_chars:
        return (f"impression_id has {len(ev.impression_id)} characters; the limit is "
                f"{limits.max_impression_id_chars}")
    if not IMPRESSION_ID_CHARS.fullmatch(ev.impression_id):
        return "impression_id has characters outside [A-Za-z0-9_-]; send the id Recommend returned"
    if not math.isfinite(ev.weight) or abs(ev.weight) > limits.max_abs_weight:
        return f"weight is {ev.weight}; it must be finite with |weight| <= {limits.max_abs_weight:g}"
    if ev.timestamp_ms <= 0:
        return f"timestamp_ms is {ev.timestamp_ms}; it must be > 0 (Unix epoch milliseconds)"
    if ev.timestamp_ms > now_ms + limits.max_future_ms:
        return (f"timestamp_ms is {ev.timestamp_ms}, more than {limits.max_future_ms} ms after the "
                f"server's clock ({now_ms}); send epoch milliseconds")
    return None
