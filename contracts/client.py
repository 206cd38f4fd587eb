"""A small synchronous client over the native API (for the CLI, examples and tests)."""

from __future__ import annotations

import time

import grpc

from proto import livetower_v1_pb2 as pb
from proto import livetower_v1_pb2_grpc as pb_grpc


class Client:
    def __init__(self, target: str, *, timeout_s: float = 5.0, admin_token: str | None = None) -> None:
        self.channel = grpc.insecure_channel(target)
        self._admin_md = (("authorization", f"Bearer {admin_token}"),) if admin_token else ()
        self.recommender = pb_grpc.RecommenderStub(self.channel)
        self.admin = pb_grpc.EngineAdminStub(self.channel)
        self.timeout_s = timeout_s

    def wait_ready(self, timeout_s: float) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout_s)

    def recommend(self, user_id: str, k: int = 10, history: list[str] | None = None,
                  exclude_seen: bool = False) -> pb.RecommendResponse:
        return self.recommender.Recommend(pb.RecommendRequest(user_id=user_id, k=k, history=history or [],
                                                              exclude_seen=exclude_seen), timeout=self.timeout_s)

    def score(self, user_id: str, candidate_ids: list[str], history: list[str] | None = None) -> pb.ScoreResponse:
        return self.recommender.Score(pb.ScoreRequest(user_id=user_id, history=history or [],
                                                      candidate_ids=candidate_ids), timeout=self.timeout_s)

    def log_events(self, events: list[pb.Event]) -> pb.LogEventsResponse:
        return self.recommender.LogEvents(pb.LogEventsRequest(events=events), timeout=self.timeout_s)

    def log_event(self, user_id: str, item_id: str, action: str = "click", weight: float = 1.0) -> pb.LogEventsResponse:
        now = int(time.time() * 1000)
        ev = pb.Event(event_id=f"cli-{user_id}-{item_id}-{time.time_ns()}", user_id=user_id, item_id=item_id,
                      action=action, weight=weight, timestamp_ms=now)
        return self.log_events([ev])

    # ---- admin (needs admin_token)
    def list_engines(self) -> pb.ListEnginesResponse:
        return self.admin.ListEngines(pb.ListEnginesRequest(), timeout=self.timeout_s, metadata=self._admin_md)

    def rollout(self) -> pb.GetRolloutResponse:
        return self.admin.GetRollout(pb.GetRolloutRequest(), timeout=self.timeout_s, metadata=self._admin_md)

    def start_canary(self, version: int, fraction: float = 0.0) -> pb.GetRolloutResponse:
        # Loading and checking the engine happens inside the call: allow for a large one.
        return self.admin.StartCanary(pb.StartCanaryRequest(version=version, fraction=fraction),
                                      timeout=max(self.timeout_s, 120.0), metadata=self._admin_md)

    def promote(self, reason: str = "") -> pb.GetRolloutResponse:
        return self.admin.Promote(pb.PromoteRequest(reason=reason), timeout=self.timeout_s, metadata=self._admin_md)

    def rollback(self, reason: str = "") -> pb.GetRolloutResponse:
        return self.admin.Rollback(pb.RollbackRequest(reason=reason), timeout=max(self.timeout_s, 120.0),
                                   metadata=self._admin_md)

    def set_policy(self, policy: pb.CanaryPolicy) -> pb.GetRolloutResponse:
        return self.admin.SetPolicy(pb.SetPolicyRequest(policy=policy), timeout=self.timeout_s,
                                    metadata=self._admin_md)

    def close(self) -> None:
        self.channel.close()
