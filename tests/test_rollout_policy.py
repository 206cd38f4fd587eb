"""CanaryPolicy exists twice, as a dataclass (contracts/rollout.py) and as the proto message operators send:
the two must name the same fields with compatible types, and convert both ways without loss."""

from __future__ import annotations

import dataclasses

import pytest
from google.protobuf.descriptor import FieldDescriptor

from contracts.rollout import CanaryPolicy
from proto import livetower_v1_pb2 as pb

PROTO_TYPE = {str: FieldDescriptor.TYPE_STRING, float: FieldDescriptor.TYPE_DOUBLE, int: FieldDescriptor.TYPE_INT32}


def test_dataclass_and_message_have_the_same_fields_in_order_with_matching_types():
    py = [(f.name, type(f.default)) for f in dataclasses.fields(CanaryPolicy)]
    msg = [(f.name, f.type) for f in pb.CanaryPolicy.DESCRIPTOR.fields]
    assert [n for n, _ in py] == [n for n, _ in msg]
    for (name, py_type), (_, proto_type) in zip(py, msg):
        assert PROTO_TYPE[py_type] == proto_type, name


def test_round_trip_of_every_field_set_away_from_its_default():
    changed = dict(mode="manual", fraction=0.25, min_requests=17, min_duration_s=2.5, max_duration_s=99.0,
                   max_p99_ratio=2.25, max_error_rate=0.05, min_topk_overlap=0.35, max_score_drift=0.65,
                   shadow_samples=31, shadow_qps=7.5, outcome_test="fixed", outcome_margin=0.03, outcome_alpha=0.01,
                   outcome_effect=0.05, outcome_horizon=5000, outcome_min_impressions=300, outcome_settle_s=2.0,
                   small_step_events=-1, small_step_shadow_samples=7, small_step_shadow_qps=9.5,
                   behind_hold_s=0.75, small_step_interval_s=0.5)
    assert set(changed) == {f.name for f in dataclasses.fields(CanaryPolicy)}  # a new field needs a value here
    policy = CanaryPolicy(**changed)
    assert all(getattr(policy, n) != getattr(CanaryPolicy(), n) for n in changed)
    assert CanaryPolicy.from_proto(policy.to_proto()) == policy


def test_empty_message_means_defaults_and_a_bad_value_names_the_field():
    assert CanaryPolicy.from_proto(pb.CanaryPolicy()) == CanaryPolicy()
    assert CanaryPolicy.from_proto(pb.CanaryPolicy(mode="manual")) == CanaryPolicy(mode="manual")
    with pytest.raises(ValueError, match="fraction"):
        CanaryPolicy.from_proto(pb.CanaryPolicy(fraction=1.5))
