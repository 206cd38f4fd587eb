"""Fuzzing the Kafka record decoder (contracts/kafka_events.decode_event): random and mutated record values
are either a valid event or (None, reason) - its documented rejection - and never raise."""

from __future__ import annotations

import time

from hypothesis import example, given
from hypothesis import strategies as st

from contracts.events import event_problem
from contracts.kafka_events import decode_event, encode_event
from proto import livetower_v1_pb2 as pb
from tests.fuzz_support import INT64, Tally, budget, floats, ints, messages, mutated, texts

NOW = int(time.time() * 1000)
VALID = pb.Event(event_id="e1", user_id="u1", item_id="i1", action="click", weight=1.0, timestamp_ms=NOW - 1000)


def _check(value: bytes | None, now_ms: int, tally: Tally) -> None:
    ev, reason = decode_event(value, now_ms)
    # Exactly one of the two, and an accepted event is one the shared validation accepts.
    assert (ev is None) != (reason is None), (value, ev, reason)
    if ev is None:
        assert isinstance(reason, str) and reason, (value, reason)
        tally.add("rejected")
    else:
        assert isinstance(ev, pb.Event) and event_problem(ev, now_ms) is None, (value, ev)
        tally.add("accepted")


def test_decode_random_and_mutated_values():
    tally = Tally("kafka decode_event (bytes)")

    @budget(2)
    @given(value=st.one_of(st.none(), st.binary(max_size=512), mutated(VALID.SerializeToString(), max_ops=6)),
           now_ms=st.one_of(st.just(NOW), ints(*INT64)))
    @example(value=b"\xff\xff\xff", now_ms=NOW)
    @example(value=b"\x12\x02\xc3\x28", now_ms=NOW)  # user_id field holding invalid UTF-8
    @example(value=b"\x0a\xff\xff\xff\xff\x0f", now_ms=NOW)  # a length prefix far past the end
    def run(value, now_ms):
        _check(value, now_ms, tally)

    try:
        run()
    finally:
        tally.report()


def test_decode_structured_events_round_trip():
    """Field-wise random events: encode_event then decode_event accepts exactly the valid ones, unchanged."""
    tally = Tally("kafka decode_event (structured events)")

    ids = st.one_of(st.text(min_size=1, max_size=20), texts())  # mostly valid, so both outcomes are tried

    @budget(2)
    @given(ev=st.one_of(messages(pb.Event), st.builds(
        pb.Event, event_id=ids, user_id=ids, item_id=ids, action=ids, weight=floats(32),
        timestamp_ms=st.one_of(st.integers(NOW - 10**12, NOW), ints(*INT64, extra=(NOW + 24 * 3600 * 1000,
                                                                                   NOW + 24 * 3600 * 1000 + 1))))))
    def run(ev):
        key, value = encode_event(ev)
        assert key == ev.user_id.encode()
        _check(value, NOW, tally)
        decoded, reason = decode_event(value, NOW)
        if event_problem(ev, NOW) is None:
            assert decoded == ev, (ev, reason)
        else:
            assert decoded is None and reason == event_problem(ev, NOW)

    try:
        run()
    finally:
        tally.report()
