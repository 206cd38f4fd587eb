"""Experiments and the canary's hit-rate criterion through a real server, a real joiner and simulated users whose
clicks come from a ground truth (engine 1's own top-10): a noisier engine shows fewer truth items, earns fewer hits.
"""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest

from benchmarks.experiments import publish_noisy
from benchmarks.swap import stage
from contracts.attribution import JoinConfig, Joiner
from contracts.client import Client
from contracts.registry import Registry
from contracts.rollout import CanaryPolicy, RolloutState
from proto import livetower_v1_pb2 as pb
from tests.conftest import ADMIN_TOKEN, client_for, running_server, server_config, wait_for

MANUAL = CanaryPolicy(mode="manual")
USERS = [f"user-{i}" for i in range(120)]


def history_of(user: str) -> list[str]:
    i = int(user.split("-")[1])
    return [f"item-{i % 250 + 1}", f"item-{(i * 7) % 250 + 1}", f"item-{(i * 13) % 250 + 1}"]


class ClickingUsers:
    """Two client threads: Recommend for random users, click each shown truth item with probability 0.5 (the
    event names the impression). Records every (user, arm, version) seen."""

    def __init__(self, port: int, truth: dict[str, set[str]]) -> None:
        self.port, self.truth, self.stop = port, truth, threading.Event()
        self.seen: dict[str, set[tuple[str, int]]] = {}
        self.errors = 0
        self.threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(2)]

    def _run(self, t: int) -> None:
        rng, c, seq = random.Random(t), Client(f"127.0.0.1:{self.port}", timeout_s=10), 0
        while not self.stop.is_set():
            user = rng.choice(USERS)
            try:
                r = c.recommend(user, k=10, history=history_of(user))
            except grpc.RpcError:
                self.errors += 1
                continue
            self.seen.setdefault(user, set()).add((r.arm, r.engine_version))
            now = int(time.time() * 1000)
            events = []
            for item in r.item_ids:
                if item in self.truth[user] and rng.random() < 0.5:
                    seq += 1
                    events.append(pb.Event(event_id=f"t{t}-{seq}", user_id=user, item_id=item, action="click",
                                           weight=1.0, timestamp_ms=now, impression_id=r.impression_id))
            if events:
                c.log_events(events)
            time.sleep(0.002)
        c.close()

    def __enter__(self) -> "ClickingUsers":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


class JoinerThread:
    def __init__(self, data_dir) -> None:
        self.joiner = Joiner(data_dir, JoinConfig(grace_s=0.5, poll_interval_s=0.05))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.joiner.run, args=(self.stop,), daemon=True)

    def __enter__(self) -> "JoinerThread":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(30)
        self.joiner.close()


def truth_sets(client: Client) -> dict[str, set[str]]:
    return {u: set(client.recommend(u, k=10, history=history_of(u)).item_ids) for u in USERS}


def test_abn_experiment_promotes_the_better_arm_through_the_live_loop(trained_dir):
    reg = Registry(trained_dir / "registry")
    noisy_control = publish_noisy(reg, 1, reg, 1.0, seed=1)   # 2
    clean = reg.publish(*stage(reg, 1, reg))                  # 3: engine 1's files (the truth itself)
    noisiest = publish_noisy(reg, 1, reg, 3.0, seed=2)        # 4
    reg.write_rollout(RolloutState(stable=1, policy=MANUAL))
    with running_server(server_config(trained_dir, policy=MANUAL)) as (server, port):
        c = client_for(server, port, timeout_s=60)
        wait_for(lambda: server.manager.stable is not None, 30, "engine 1")
        with pytest.raises(grpc.RpcError) as e:
            c.experiment()
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        truth = truth_sets(c)
        c.start_canary(noisy_control, 0.5)
        assert c.promote("the control").stable_version == noisy_control
        arms = [pb.ExperimentArm(name="clean", version=clean, fraction=0.3),
                pb.ExperimentArm(name="noisiest", version=noisiest, fraction=0.3)]
        for bad, code, words in (
                ([pb.ExperimentArm(name="clean", version=clean, fraction=0.7), arms[1]], "INVALID_ARGUMENT", "sum to"),
                ([pb.ExperimentArm(name="x", version=99, fraction=0.2)], "NOT_FOUND", "not published"),
                ([pb.ExperimentArm(name="Bad Name", version=clean, fraction=0.2)], "INVALID_ARGUMENT", "name")):
            with pytest.raises(grpc.RpcError) as e:
                c.start_experiment(pb.StartExperimentRequest(name="bad", arms=bad))
            assert e.value.code().name == code and words in e.value.details(), e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            c.start_experiment(pb.StartExperimentRequest(name="bad", arms=arms, alpha=0.9))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "alpha" in e.value.details()
        assert server.manager.experiment is None and c.rollout().stable_version == noisy_control  # nothing changed

        x = c.start_experiment(pb.StartExperimentRequest(name="noise", arms=arms, min_impressions=60,
                                                         settle_s=0.3, promote_winner=True))
        assert x.running and [a.name for a in x.arms] == ["stable", "clean", "noisiest"]
        with pytest.raises(grpc.RpcError) as e:
            c.start_canary(noisiest, 0.1)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "experiment" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            c.start_experiment(pb.StartExperimentRequest(name="second", arms=arms[:1]))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with JoinerThread(trained_dir), ClickingUsers(port, truth) as users:
            x = wait_for(lambda: next((r for r in [c.experiment()] if not r.running), None), 120,
                         "the experiment's decision", interval_s=0.2)
        assert users.errors == 0
        assert x.decision == "winner" and x.winner_version == clean, x
        by_name = {a.name: a for a in x.arms}
        assert by_name["clean"].state == "winner" and by_name["clean"].hit_rate > by_name["stable"].hit_rate
        assert by_name["clean"].impressions >= 60 and by_name["stable"].impressions >= 60
        ro = c.rollout()
        assert ro.stable_version == clean and server.manager.experiment is None
        actions = [(e.action, e.version, e.actor) for e in ro.history[-3:]]
        assert actions == [("experiment", 0, "operator"), ("experiment_end", clean, "auto"),
                           ("promote", clean, "auto")], actions
        # sticky: during the experiment each user was served by one arm (a user seen after the promotion also
        # saw the new stable)
        arms_of = {u: {arm for arm, v in seen if v != clean or arm == "clean"} for u, seen in users.seen.items()}
        assert all(len(a) == 1 for a in arms_of.values()), arms_of
        assert {next(iter(a)) for a in arms_of.values()} == {"stable", "clean", "noisiest"}
        c.close()


def test_canary_outcome_criterion_rolls_back_a_worse_engine_and_promotes_an_equal_one(trained_dir):
    """The shadow's ranking checks are off here (min_topk_overlap 0, max_score_drift 1), and so are the latency
    ratios (a test process's GIL makes a new engine's first requests slow), so hit rate is what tells the noisy
    engine apart."""
    policy = CanaryPolicy(mode="auto", fraction=0.5, min_duration_s=0.2, max_duration_s=1.0, min_requests=20,
                          shadow_samples=10, shadow_qps=200.0, min_topk_overlap=0.0, max_score_drift=1.0,
                          max_p99_ratio=1000.0,
                          outcome_test="sequential", outcome_margin=0.02, outcome_min_impressions=60,
                          outcome_settle_s=0.3)
    reg = Registry(trained_dir / "registry")
    with running_server(server_config(trained_dir, policy=policy)) as (server, port):
        c = client_for(server, port, timeout_s=60)
        wait_for(lambda: server.manager.stable is not None, 30, "engine 1")
        truth = truth_sets(c)
        with JoinerThread(trained_dir), ClickingUsers(port, truth):
            noisy = publish_noisy(reg, 1, reg, 3.0, seed=5)
            ro = wait_for(lambda: (r := c.rollout()).rolled_back.get(noisy) and r, 120, "the noisy canary's rollback")
            assert "hit rate" in ro.rolled_back[noisy] and "worse than stable" in ro.rolled_back[noisy], ro
            a = ro.analysis
            assert a.canary_impressions >= 60 and a.hit_rate_hi < -0.02 and a.canary_hit_rate < a.stable_hit_rate
            twin = reg.publish(*stage(reg, 1, reg))
            ro = wait_for(lambda: (r := c.rollout()).stable_version == twin and r, 120, "the twin's promotion")
            assert "hit rate" in ro.history[-1].reason and ro.history[-1].action == "promote", ro.history[-1]
            assert ro.analysis.hit_rate_lo > -0.02
        c.close()


def test_experiments_cli(trained_dir, capsys, monkeypatch):
    from livetower.cli import main

    reg = Registry(trained_dir / "registry")
    copy = reg.publish(*stage(reg, 1, reg))
    reg.write_rollout(RolloutState(stable=1, policy=MANUAL))
    with running_server(server_config(trained_dir, policy=MANUAL)) as (server, port):
        wait_for(lambda: server.manager.stable is not None, 30, "engine 1")
        monkeypatch.setenv("LIVETOWER_ADMIN_TOKEN", ADMIN_TOKEN)
        auth = ["--admin-target", f"127.0.0.1:{server.admin_port}"]
        capsys.readouterr()
        assert main(["experiments", "start", "aa", "--arm", f"twin={copy}:0.5", "--test", "fixed", *auth]) == 0
        out = capsys.readouterr().out
        assert "experiment 'aa' running" in out and "fixed test" in out and "twin" in out, out
        c = Client(f"127.0.0.1:{port}")
        arms = {c.recommend(u, k=5, history=history_of(u)).arm for u in USERS[:40]}
        assert arms == {"stable", "twin"}
        c.close()
        assert main(["experiments", "show", *auth]) == 0
        assert "requests" in capsys.readouterr().out
        assert main(["experiments", "stop", "--promote", str(copy), "--reason", "cli", *auth]) == 0
        out = capsys.readouterr().out
        assert "ended: stopped (engine 2)" in out and "cli" in out, out
        assert server.manager.stable.version == copy
        assert main(["experiments", "stop", *auth]) == 1
        assert "FAILED_PRECONDITION" in capsys.readouterr().err


def test_a_follower_process_routes_like_the_leader_and_follows_its_decision(trained_dir):
    """Two managers on one registry, as `serve --workers 2` runs them: the follower loads the arms from
    rollout.json on its poll, gives every user the same arm as the leader, and follows the stop and promotion
    without loading the winner again."""
    from contracts.outcome import OutcomeTest
    from contracts.rollout import ExperimentArm
    from server.engine.manager import EngineManager, EngineManagerConfig

    reg = Registry(trained_dir / "registry")
    b = reg.publish(*stage(reg, 1, reg))
    c = publish_noisy(reg, 1, reg, 1.0, seed=3)
    reg.write_rollout(RolloutState(stable=1, policy=MANUAL))
    cfg = EngineManagerConfig(warmup_calls=0)
    leader, follower = EngineManager(reg, cfg), EngineManager(reg, EngineManagerConfig(warmup_calls=0, leader=False))
    leader.poll_once()
    follower.poll_once()
    leader.start_experiment("x", [ExperimentArm(name="b", version=b, fraction=0.25),
                                  ExperimentArm(name="c", version=c, fraction=0.25)], OutcomeTest())
    assert follower.route("user-1")[1] == "stable" or follower.experiment is None
    follower.poll_once()
    users = [f"user-{i}" for i in range(400)]
    routes = [(leader.route(u)[1], leader.route(u)[0].version) for u in users]
    assert routes == [(follower.route(u)[1], follower.route(u)[0].version) for u in users]
    assert {r for r in routes} == {("stable", 1), ("b", b), ("c", c)}
    winner = follower.experiment.engines["b"]
    leader.stop_experiment(reason="test", winner_version=b, promote=True)
    assert leader.stable.version == b and leader.experiment is None
    follower.poll_once()
    assert follower.experiment is None and follower.stable is winner  # the arm's engine, not a second load
    assert {follower.route(u)[1] for u in users} == {"stable"}
    st = reg.read_rollout()
    assert st.stable == b and not st.experiment.running and st.experiment.decision == "stopped"
