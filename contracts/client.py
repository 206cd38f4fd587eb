"""A small synchronous client over the native API (for the CLI, examples and tests).

Data calls go to `target`, EngineAdmin calls to `admin_target` (the server's admin listener, its own port).
`tls` (contracts/tls.py ClientTls) secures both channels; None: plaintext (a localhost server).
`producer_token` is sent with LogEvents to a server that requires producer credentials.
"""

from __future__ import annotations

import time

import grpc

from contracts.tls import ClientTls, channel
from proto import livetower_v1_pb2 as pb
from proto import livetower_v1_pb2_grpc as pb_grpc

LEASE_HOLDER_KEY = "livetower-lease-holder"  # trailing metadata of a fleet replica's refusal: the holder's HOST:PORT


class Client:
    def __init__(self, target: str, *, admin_target: str | None = None, timeout_s: float = 5.0,
                 admin_token: str | None = None, producer_token: str | None = None,
                 tls: ClientTls | None = None) -> None:
        self.channel = channel(target, tls)
        self.admin_channel = channel(admin_target, tls) if admin_target else None
        self._tls = tls
        self._admin_md = (("authorization", f"Bearer {admin_token}"),) if admin_token else ()
        self._producer_md = (("authorization", f"Bearer {producer_token}"),) if producer_token else ()
        self.recommender = pb_grpc.RecommenderStub(self.channel)
        self._admin = pb_grpc.EngineAdminStub(self.admin_channel) if self.admin_channel else None
        self.timeout_s = timeout_s

    @property
    def admin(self) -> pb_grpc.EngineAdminStub:
        if self._admin is None:
            raise ValueError("admin calls go to the server's admin listener: pass admin_target (the admin port, "
                             "default localhost:50052; --admin-target)")
        return self._admin

    def _change(self, method: str, request, timeout_s: float):
        """A rollout-changing admin call. A fleet replica that does not hold the decision lease refuses it with
        FAILED_PRECONDITION and the holder's admin address in LEASE_HOLDER_KEY trailing metadata: the call is
        then sent there once (same token and TLS), as a Kafka client follows NOT_LEADER."""
        try:
            return getattr(self.admin, method)(request, timeout=timeout_s, metadata=self._admin_md)
        except grpc.RpcError as e:
            holder = dict(e.trailing_metadata() or ()).get(LEASE_HOLDER_KEY) \
                if e.code() == grpc.StatusCode.FAILED_PRECONDITION else None
            if not holder:
                raise
        with channel(holder, self._tls) as ch:
            return getattr(pb_grpc.EngineAdminStub(ch), method)(request, timeout=timeout_s, metadata=self._admin_md)

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
        return self.recommender.LogEvents(pb.LogEventsRequest(events=events), timeout=self.timeout_s,
                                          metadata=self._producer_md)

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
        return self._change("StartCanary", pb.StartCanaryRequest(version=version, fraction=fraction),
                            max(self.timeout_s, 120.0))

    def promote(self, reason: str = "") -> pb.GetRolloutResponse:
        return self._change("Promote", pb.PromoteRequest(reason=reason), self.timeout_s)

    def rollback(self, reason: str = "") -> pb.GetRolloutResponse:
        return self._change("Rollback", pb.RollbackRequest(reason=reason), max(self.timeout_s, 120.0))

    def set_policy(self, policy: pb.CanaryPolicy) -> pb.GetRolloutResponse:
        return self._change("SetPolicy", pb.SetPolicyRequest(policy=policy), self.timeout_s)

    def start_experiment(self, request: pb.StartExperimentRequest) -> pb.Experiment:
        # Loads every arm's engine inside the call: allow for large ones.
        return self._change("StartExperiment", request, max(self.timeout_s, 300.0))

    def experiment(self) -> pb.Experiment:
        return self.admin.GetExperiment(pb.GetExperimentRequest(), timeout=self.timeout_s, metadata=self._admin_md)

    def stop_experiment(self, reason: str = "", promote_version: int = 0) -> pb.Experiment:
        return self._change("StopExperiment", pb.StopExperimentRequest(reason=reason, promote_version=promote_version),
                            max(self.timeout_s, 120.0))

    def close(self) -> None:
        self.channel.close()
        if self.admin_channel is not None:
            self.admin_channel.close()
