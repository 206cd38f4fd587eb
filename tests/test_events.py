import math

import pytest

from contracts.events import DEFAULT_LIMITS, EventLimits, event_problem
from proto import livetower_v1_pb2 as pb

NOW = 1_767_225_600_000
SKEW_MS = 5 * 60 * 1000  # the default clock skew a timestamp may be ahead by


def good(**kw):
    d = dict(event_id="e1", user_id="u1", item_id="i1", action="click", weight=1.0, timestamp_ms=NOW - 5)
    d.update(kw)
    return pb.Event(**d)


def test_valid_event_is_accepted():
    assert event_problem(good(), NOW) is None
    assert event_problem(good(weight=0.0), NOW) is None
    assert event_problem(good(weight=-3.5), NOW) is None
    assert event_problem(good(timestamp_ms=1), NOW) is None


def test_default_limits():
    assert DEFAULT_LIMITS == EventLimits(max_id_chars=256, max_event_id_chars=128, max_action_chars=32,
                                         max_abs_weight=1e6, max_future_ms=SKEW_MS)


@pytest.mark.parametrize("field,limit", [("event_id", 128), ("user_id", 256), ("item_id", 256), ("action", 32)])
def test_empty_string_field(field, limit):
    assert event_problem(good(**{field: ""}), NOW) == f"{field} is empty; it must be 1..{limit} characters"


@pytest.mark.parametrize("field,limit", [("event_id", 128), ("user_id", 256), ("item_id", 256), ("action", 32)])
def test_string_field_length_limit(field, limit):
    assert event_problem(good(**{field: "x" * limit}), NOW) is None
    msg = event_problem(good(**{field: "x" * (limit + 1)}), NOW)
    assert msg == f"{field} has {limit + 1} characters; the limit is {limit}"


def test_length_is_counted_in_characters_not_bytes():
    assert event_problem(good(action="é" * 32), NOW) is None
    assert event_problem(good(action="é" * 33), NOW) == "action has 33 characters; the limit is 32"


def test_first_bad_field_is_reported():
    assert event_problem(good(event_id="", user_id="", weight=math.nan), NOW).startswith("event_id ")
    assert event_problem(good(item_id="", timestamp_ms=0), NOW).startswith("item_id ")


@pytest.mark.parametrize("w", [math.nan, math.inf, -math.inf, 1e6 + 1, -2e6, 3e38])
def test_bad_weight(w):
    msg = event_problem(good(weight=w), NOW)
    assert msg is not None
    assert msg.startswith("weight is ")
    assert "must be finite with |weight| <= 1e+06" in msg


def test_weight_at_limit_is_ok():
    assert event_problem(good(weight=1e6), NOW) is None
    assert event_problem(good(weight=-1e6), NOW) is None


def test_nan_weight_message_names_value():
    assert event_problem(good(weight=math.nan), NOW) == \
        "weight is nan; it must be finite with |weight| <= 1e+06"


@pytest.mark.parametrize("ts", [0, -1, -NOW])
def test_non_positive_timestamp(ts):
    assert event_problem(good(timestamp_ms=ts), NOW) == \
        f"timestamp_ms is {ts}; it must be > 0 (Unix epoch milliseconds)"


def test_future_timestamp():
    assert event_problem(good(timestamp_ms=NOW + SKEW_MS), NOW) is None
    ts = NOW + SKEW_MS + 1
    msg = event_problem(good(timestamp_ms=ts), NOW)
    assert msg == (f"timestamp_ms is {ts}, more than {SKEW_MS} ms after the server's clock ({NOW}); "
                   "send epoch milliseconds")
    # microseconds instead of milliseconds is the classic mistake
    assert event_problem(good(timestamp_ms=NOW * 1000), NOW).startswith("timestamp_ms is ")


def test_custom_limits():
    lim = EventLimits(max_id_chars=3, max_event_id_chars=2, max_action_chars=1, max_abs_weight=2.0,
                      max_future_ms=0)
    ok = good(event_id="ab", user_id="abc", item_id="xyz", action="c", weight=2.0, timestamp_ms=NOW)
    assert event_problem(ok, NOW, lim) is None
    assert event_problem(good(event_id="abc", user_id="a", item_id="b", action="c"), NOW, lim) == \
        "event_id has 3 characters; the limit is 2"
    assert event_problem(good(event_id="a", user_id="abcd", item_id="b", action="c"), NOW, lim) == \
        "user_id has 4 characters; the limit is 3"
    assert event_problem(good(event_id="a", user_id="a", item_id="b", action="c", weight=2.5), NOW, lim) == \
        "weight is 2.5; it must be finite with |weight| <= 2"
    assert event_problem(good(event_id="a", user_id="a", item_id="b", action="c", timestamp_ms=NOW + 1),
                         NOW, lim).startswith(f"timestamp_ms is {NOW + 1}, more than 0 ms")


def test_an_event_a_day_ahead_is_refused_and_limits_are_validated():
    """A day-ahead timestamp used to pass (and move the trainer's watermark a day ahead for good)."""
    assert "after the server's clock" in event_problem(good(timestamp_ms=NOW + 24 * 3600 * 1000), NOW)
    with pytest.raises(ValueError, match="max_future_ms"):
        EventLimits(max_future_ms=-1)
    with pytest.raises(ValueError, match="max_id_chars"):
        EventLimits(max_id_chars=0)
