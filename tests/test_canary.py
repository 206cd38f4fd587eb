"""Canary rollouts over real gRPC: sticky split, operator and automatic decisions, bad engines
(refused at load, raising, slow, garbage scores) never reaching 100%, auth, and restarts."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import grpc
import numpy as np
import pytest

from contracts.client import Client
from contracts.registry import ITEMS_FILE, MANIFEST, Registry, manifest_from_json
from contracts.rollout import CanaryPolicy
from proto import livetower_v1_pb2 as pb
from server.engine import manager as manager_mod
from server.engine.canary import CanaryStats, analyse, in_canary, ks_distance, quality_vouch, topk_overlap
from tests.conftest import ADMIN_TOKEN, LATENCY_POLICY, make_trainer, running_server, server_config, stream_events, wait_for

MANUAL = CanaryPolicy(mode="manual", min_duration_s=0.2, max_duration_s=1.0, min_requests=20, shadow_samples=10,
                      shadow_qps=200.0)


# ---------------------------------------------------------------- unit: split and analysis

def test_split_is_sticky_sized_and_salted_by_version():
    users = [f"user-{i}" for i in range(20_000)]
    salt = bytes(range(16))
    in_v2 = [in_canary(u, 2, 0.1, salt) for u in users]
    assert in_v2 == [in_canary(u, 2, 0.1, salt) for u in users]  # sticky
    assert 0.09 < np.mean(in_v2) < 0.11
    in_v3 = [in_canary(u, 3, 0.1, salt) for u in users]
    assert 0.08 < np.mean(np.array(in_v2) == np.array(in_v3)) < 0.99 and in_v2 != in_v3  # another slice
    assert not in_canary("", 2, 0.99, salt)
    grown = [in_canary(u, 2, 0.3, salt) for u in users]  # raising the fraction keeps everyone already in
    assert all(g for g, s in zip(grown, in_v2) if s)
    other = [in_canary(u, 2, 0.1, b"another secret!!") for u in users]  # without the secret: another slice
    assert 0.08 < np.mean(np.array(in_v2) == np.array(other)) < 0.99 and in_v2 != other


def test_canary_salt_is_secret_random_persisted_and_shared(tmp_path):
    """Made once, kept in rollout.json across restarts and shared by every Registry of the same root; never in
    the API's rollout answer (server/servicer.py copies named fields only)."""
    from contracts.registry import Registry

    salt = Registry(tmp_path).canary_salt()
    assert len(salt) == 16 and salt != bytes(16)
    assert Registry(tmp_path).canary_salt() == salt  # a restart or another replica: the same split
    assert Registry(tmp_path / "other").canary_salt() != salt  # random per registry
    st = Registry(tmp_path).read_rollout()
    st.record("policy", 0, "test", "a later write keeps the salt")
    Registry(tmp_path).write_rollout(st)
    assert Registry(tmp_path).canary_salt() == salt
    assert "canary_salt" not in {f.name for f in pb.GetRolloutResponse.DESCRIPTOR.fields}


def test_overlap_and_ks():
    assert topk_overlap(["a", "b"], ["a", "b"], 100) == 1.0
    assert topk_overlap(list("abcde"), list("vwxyz"), 100) < 0
    assert abs(topk_overlap([str(i) for i in range(100)], [str(i) for i in range(50, 150)], 300) - 0.25) < 1e-9
    assert ks_distance([1, 2, 3], [1, 2, 3]) == 0.0
    assert ks_distance([0.0] * 50, [1.0] * 50) == 1.0


def _stats(*, overlap=0.9, drift_shift=0.0, engine_ratio=1.0, canary_lat=0.002, errors=0, n=300, shadow=50,
           age_s=10.0, stalled=0) -> CanaryStats:
    """stalled: that many of the n canary requests took 0.44 s (a paused process), the rest canary_lat."""
    st = CanaryStats()
    st.started -= age_s
    rng = np.random.default_rng(0)
    for i in range(n):
        st.observe(False, 0.002 * rng.uniform(0.9, 1.1), error=False)
        st.observe(True, 0.44 if i < stalled else canary_lat * rng.uniform(0.9, 1.1), error=False)
    for _ in range(errors):
        st.observe(True, 0.0, error=True)
    for _ in range(shadow):
        s = list(rng.uniform(0.5, 0.9, 10))
        st.add_shadow(overlap, [x + drift_shift for x in s], s, 0.001 * engine_ratio, 0.001)
    return st


@pytest.mark.parametrize("kwargs,action,words", [
    (dict(), "promote", "live P99 ratio"),
    (dict(errors=10), "rollback", "error rate"),
    (dict(errors=10, age_s=0.0, shadow=0), "rollback", "error rate"),  # errors roll back before any window
    (dict(overlap=0.05), "rollback", "overlap"),
    (dict(drift_shift=-0.5), "rollback", "score drift"),
    (dict(engine_ratio=4.0), "rollback", "engine CPU time ratio"),
    (dict(canary_lat=0.01), "rollback", "live P99"),
    (dict(age_s=0.0), "wait", "min_duration_s"),
    (dict(shadow=3), "wait", "shadow sample"),
    (dict(n=5), "wait", "live sample"),
    (dict(n=5, age_s=100.0), "promote", "shadow comparison alone"),
])
def test_analysis_verdicts(kwargs, action, words):
    v = analyse(_stats(**kwargs), CanaryPolicy(min_duration_s=5, max_duration_s=60, min_requests=200,
                                                shadow_samples=20))
    assert v.action == action and words in v.reason, v


@pytest.mark.parametrize("stalled,age_s,action,words", [
    (1, 10.0, "wait", "rests on fewer than 3 canary requests"),
    (2, 10.0, "wait", "rests on fewer than 3 canary requests"),
    (1, 100.0, "promote", "on the shadow comparison"),  # max_duration_s: decided without the lone outlier
    (3, 10.0, "rollback", "at least 3 canary requests over"),
])
def test_a_live_p99_breach_needs_several_slow_canary_requests(stalled, age_s, action, words):
    """40 requests per arm: P99 is about the slowest one, so one stalled canary request breaches max_p99_ratio
    (0.44 s against 2 ms) without being a regression; three are."""
    policy = CanaryPolicy(min_duration_s=5, max_duration_s=60, min_requests=40, shadow_samples=20)
    v = analyse(_stats(n=40, stalled=stalled, age_s=age_s), policy)
    assert v.figures["p99_ratio"] > policy.max_p99_ratio
    assert v.action == action and words in v.reason, v


def test_trainer_gate_vouches_for_expected_ranking_change_but_not_errors_or_latency():
    gate = {"gate_passed": 1.0, "gate_baseline_version": 3.0, "holdout_users": 500.0,
            "model_recall@10": 0.08, "serving_recall@10": 0.05}
    vouch = quality_vouch(gate, 3)
    assert vouch is not None and "stable 3" in vouch
    assert quality_vouch(gate, 4) is None  # evidence against another stable version counts for nothing
    assert quality_vouch({**gate, "gate_passed": 0.0}, 3) is None and quality_vouch({}, 3) is None
    policy = CanaryPolicy(min_duration_s=5, max_duration_s=60, min_requests=200, shadow_samples=20)
    v = analyse(_stats(overlap=0.05, drift_shift=-0.5), policy, vouch=vouch)
    assert v.action == "promote" and "accepted" in v.reason and "overlap" in v.reason, v
    for kwargs, words in ((dict(errors=10), "error rate"), (dict(canary_lat=0.01), "live P99"),
                          (dict(engine_ratio=4.0), "engine CPU time ratio")):
        v = analyse(_stats(overlap=0.05, **kwargs), policy, vouch=vouch)
        assert v.action == "rollback" and words in v.reason, v


# ---------------------------------------------------------------- integration helpers

def publish_v2(data_dir, seed: int = 10) -> int:
    trainer = make_trainer(data_dir)
    trainer.event_log.append(stream_events(seed=seed))
    return trainer.run_round().published_version


def republish_modified(data_dir, version: int, change) -> int:
    """Publish a copy of `version` with change(staging_dir, manifest) applied (a properly published engine)."""
    import shutil

    reg = Registry(data_dir / "registry")
    staging = reg.staging_dir()
    shutil.copytree(reg.engine_dir(version), staging, dirs_exist_ok=True)
    manifest = manifest_from_json((staging / MANIFEST).read_text())
    (staging / MANIFEST).unlink()
    change(staging, manifest)
    return reg.publish(staging, manifest)


class Traffic:
    """Background clients: many users, counts outcomes and (version, canary) per user."""

    def __init__(self, port: int, n_threads: int = 2) -> None:
        self.port, self.done = port, threading.Event()
        self.outcomes: Counter = Counter()
        self.seen: dict[str, set] = {}
        self.threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(n_threads)]

    def _run(self, t: int) -> None:
        c = Client(f"127.0.0.1:{self.port}", timeout_s=10)
        i = t
        while not self.done.is_set():
            user = f"user-{i % 400}"
            try:
                r = c.recommend(user, k=20, history=[f"item-{i % 250 + 1}", f"item-{(i * 7) % 250 + 1}"])
                self.outcomes["OK"] += 1
                self.seen.setdefault(user, set()).add((r.engine_version, r.canary))
            except grpc.RpcError as e:
                self.outcomes[e.code().name] += 1
            i += 2
        c.close()

    def __enter__(self) -> "Traffic":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        for t in self.threads:
            t.join(30)


def admin_client(server, port: int) -> Client:
    """Data calls on port, admin calls on the server's admin listener."""
    return Client(f"127.0.0.1:{port}", admin_target=f"127.0.0.1:{server.admin_port}", admin_token=ADMIN_TOKEN,
                  timeout_s=30)


# ---------------------------------------------------------------- integration: operator flow, auth, restart

def test_manual_canary_sticky_promote_and_rollback(trained_dir):
    with running_server(server_config(trained_dir, policy=MANUAL)) as (server, port):
        c = admin_client(server, port)
        wait_for(lambda: server.manager.stable is not None, 30, "engine 1")
        assert publish_v2(trained_dir) == 2
        time.sleep(0.5)  # manual mode: the new version waits for an operator
        ro = c.rollout()
        assert ro.stable_version == 1 and ro.canary_version == 0 and list(ro.pending_versions) == [2]
        ro = c.start_canary(2, 0.3)
        assert ro.canary_version == 2 and abs(ro.canary_fraction - 0.3) < 1e-9
        with Traffic(port) as traffic:
            wait_for(lambda: len(traffic.seen) >= 400, 30, "every user served")
        assert sum(traffic.outcomes.values()) == traffic.outcomes["OK"]
        assert all(len(s) == 1 for s in traffic.seen.values()), "a user saw both versions during the canary"
        canary_users = {u for u, s in traffic.seen.items() if s == {(2, True)}}
        assert {u for u, s in traffic.seen.items() if s == {(1, False)}} | canary_users == set(traffic.seen)
        salt = server.manager.canary_salt
        assert salt == Registry(trained_dir / "registry").canary_salt()  # the registry's secret, as persisted
        assert canary_users == {u for u in traffic.seen if in_canary(u, 2, 0.3, salt)}
        assert 0.2 < len(canary_users) / len(traffic.seen) < 0.4
        a = c.rollout().analysis
        assert a.canary_requests > 0 and a.stable_requests > 0 and a.verdict  # analysed, not acted on (manual)
        with pytest.raises(grpc.RpcError) as e:
            c.start_canary(1)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "in canary" in e.value.details()
        ro = c.promote("looks good")
        assert ro.stable_version == 2 and ro.canary_version == 0
        assert c.recommend("user-1", k=5).engine_version == 2
        ro = c.rollback("regression found later")  # no canary: back to the previous stable
        assert ro.stable_version == 1 and 2 in ro.rolled_back
        assert [(e.action, e.version, e.actor) for e in ro.history][-3:] == [
            ("canary", 2, "operator"), ("promote", 2, "operator"), ("rollback", 2, "operator")]
        assert ro.history[-2].reason == "looks good"
        with pytest.raises(grpc.RpcError) as e:
            c.start_canary(99)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        c.close()


def test_admin_calls_need_the_token_and_change_nothing(trained_dir):
    with running_server(server_config(trained_dir, policy=MANUAL)) as (server, port):
        wait_for(lambda: server.manager.stable is not None, 30, "engine 1")
        assert publish_v2(trained_dir) == 2
        before = _rollout_without_lease_renewal(trained_dir)
        for token in (None, "wrong-token-but-long-enough"):
            c = Client(f"127.0.0.1:{port}", admin_target=f"127.0.0.1:{server.admin_port}", admin_token=token)
            for call in (lambda: c.start_canary(2, 0.5), c.promote, c.rollback, c.rollout, c.list_engines,
                         lambda: c.set_policy(pb.CanaryPolicy(mode="auto"))):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "authorization: Bearer" in e.value.details() and ADMIN_TOKEN not in e.value.details()
            assert c.recommend("user-1", k=3).engine_version == 1  # the data plane needs no token
            c.close()
        assert _rollout_without_lease_renewal(trained_dir) == before
        assert server.manager.canary is None


def _rollout_without_lease_renewal(data_dir) -> dict:
    """rollout.json but the lease's expiry, which the holder renews on its own timer whatever the admin calls do
    (CI: renewed between the two reads, 1796559717825 -> 1796559720377)."""
    state = json.loads((data_dir / "registry" / "rollout.json").read_text())
    state.pop("leader_until_ms")
    return state


def test_set_policy_validates_and_persists(trained_dir):
    with running_server(server_config(trained_dir, policy=MANUAL)) as (server, port):
        c = admin_client(server, port)
        with pytest.raises(grpc.RpcError) as e:
            c.set_policy(pb.CanaryPolicy(mode="auto", fraction=1.5))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "fraction must be in (0, 1)" in e.value.details()
        ro = c.set_policy(pb.CanaryPolicy(mode="auto", fraction=0.25, min_requests=50))
        assert ro.policy.mode == "auto" and ro.policy.fraction == 0.25 and ro.policy.shadow_samples == 100
        saved = json.loads((trained_dir / "registry" / "rollout.json").read_text())["policy"]
        assert saved["fraction"] == 0.25 and saved["min_requests"] == 50
        c.close()


def test_restart_mid_canary_keeps_stable_and_canary(trained_dir):
    config = server_config(trained_dir, policy=MANUAL)
    with running_server(config) as (server, port):
        c = admin_client(server, port)
        wait_for(lambda: server.manager.stable is not None, 30, "engine 1")
        assert publish_v2(trained_dir) == 2
        c.start_canary(2, 0.5)
        served_before = {u: c.recommend(u, k=3, history=["item-1"]).engine_version for u in map(str, range(50))}
        c.close()
    with running_server(config) as (server, port):
        c = admin_client(server, port)
        wait_for(lambda: server.manager.canary is not None, 30, "the canary to be restored")
        ro = c.rollout()
        assert (ro.stable_version, ro.canary_version, ro.canary_fraction) == (1, 2, 0.5)
        assert {u: c.recommend(u, k=3, history=["item-1"]).engine_version for u in served_before} == served_before
        c.close()


# ---------------------------------------------------------------- integration: automatic decisions, bad engines

def test_auto_mode_canaries_and_promotes_a_good_engine(trained_dir):
    with running_server(server_config(trained_dir)) as (server, port):
        c = admin_client(server, port)
        wait_for(lambda: server.manager.stable is not None, 30, "engine 1")
        with Traffic(port) as traffic:
            t0 = time.monotonic()
            assert publish_v2(trained_dir) == 2
            wait_for(lambda: server.manager.stable.version == 2, 30, "engine 2 to be promoted")
            decided_s = time.monotonic() - t0
        assert traffic.outcomes["OK"] == sum(traffic.outcomes.values())
        ro = c.rollout()
        actions = [(e.action, e.version, e.actor) for e in ro.history]
        assert actions[-2:] == [("canary", 2, "auto"), ("promote", 2, "auto")], actions
        assert "overlap" in ro.history[-1].reason and ro.analysis.verdict == "promote"
        print(f"\npublish -> promoted in {decided_s:.1f}s; {ro.history[-1].reason}")
        c.close()


def _slow(engine):
    class Slow:
        def __getattr__(self, name):
            return getattr(engine, name)

        def recommend_batch(self, queries):
            t = time.thread_time()
            while time.thread_time() - t < 0.02:  # burns CPU like a slow engine would
                pass
            return engine.recommend_batch(queries)

    return Slow()


def _raising(engine):
    class Raising:
        def __getattr__(self, name):
            return getattr(engine, name)

        def recommend_batch(self, queries):
            raise RuntimeError("boom: engine fault injected by the test")

    return Raising()


@pytest.mark.parametrize("fault", ["raises", "slow"])
def test_faulty_canary_is_rolled_back_without_failed_requests(trained_dir, monkeypatch, fault):
    wrap = {"raises": _raising, "slow": _slow}[fault]
    real = manager_mod.load_from_registry
    monkeypatch.setattr(manager_mod, "load_from_registry",
                        lambda reg, v, cfg: wrap(real(reg, v, cfg)) if v == 2 else real(reg, v, cfg))
    with running_server(server_config(trained_dir, policy=LATENCY_POLICY)) as (server, port):
        c = admin_client(server, port)
        wait_for(lambda: server.manager.stable is not None, 30, "engine 1")
        with Traffic(port) as traffic:
            assert publish_v2(trained_dir) == 2
            wait_for(lambda: 2 in server.manager.rollout.rolled_back, 30, f"the {fault} canary to be rolled back")
            time.sleep(0.3)
        ro = c.rollout()
        assert ro.stable_version == 1 and ro.canary_version == 0
        assert traffic.outcomes["OK"] == sum(traffic.outcomes.values()), traffic.outcomes  # no failed request
        assert {v for s in traffic.seen.values() for v, _ in s} <= {1, 2}
        reason = ro.rolled_back[2]
        assert ("error rate" in reason) if fault == "raises" else ("ratio" in reason), reason
        time.sleep(0.5)
        assert server.manager.canary is None  # auto mode does not retry a rolled-back version
        c.close()


def test_garbage_scores_are_rolled_back(trained_dir):
    with running_server(server_config(trained_dir)) as (server, port):
        c = admin_client(server, port)
        wait_for(lambda: server.manager.stable is not None, 30, "engine 1")

        def garbage(staging, manifest):  # a valid, checksummed engine whose item vectors are noise
            items = np.load(staging / ITEMS_FILE)
            noise = np.random.default_rng(0).standard_normal(items.shape).astype(np.float32)
            np.save(staging / ITEMS_FILE, noise / np.linalg.norm(noise, axis=1, keepdims=True))

        assert republish_modified(trained_dir, 1, garbage) == 2
        wait_for(lambda: 2 in server.manager.rollout.rolled_back, 30, "the garbage canary to be rolled back")
        reason = c.rollout().rolled_back[2]
        assert "overlap" in reason or "drift" in reason, reason
        assert server.manager.stable.version == 1
        c.close()


def test_engine_failing_parity_is_refused_and_never_serves(trained_dir):
    with running_server(server_config(trained_dir)) as (server, port):
        c = admin_client(server, port)
        wait_for(lambda: server.manager.stable is not None, 30, "engine 1")

        def wrong_golden(staging, manifest):
            manifest.golden.user_embeddings[0] += 0.5

        assert republish_modified(trained_dir, 1, wrong_golden) == 2
        wait_for(lambda: 2 in server.manager.rollout.refused, 30, "engine 2 to be refused")
        ro = c.rollout()
        assert "golden parity" in ro.refused_reasons[2] and ro.canary_version == 0 and ro.stable_version == 1
        assert ro.history[-1].action == "refuse"
        c.close()


def test_cli_engines_commands(trained_dir, capsys, monkeypatch):
    from livetower.cli import main

    with running_server(server_config(trained_dir, policy=MANUAL)) as (server, port):
        wait_for(lambda: server.manager.stable is not None, 30, "engine 1")
        assert publish_v2(trained_dir) == 2
        monkeypatch.setenv("LIVETOWER_ADMIN_TOKEN", ADMIN_TOKEN)  # the token never goes in argv
        auth = ["--admin-target", f"127.0.0.1:{server.admin_port}"]
        capsys.readouterr()
        assert main(["engines", "canary", "2", "--fraction", "0.4", *auth]) == 0
        assert "canary: 2 on 40% of users" in capsys.readouterr().out
        assert main(["engines", "promote", "--reason", "from the cli", *auth]) == 0
        out = capsys.readouterr().out
        assert "stable: 2" in out and "promote  v2" in out and "from the cli" in out
        assert main(["engines", "policy", "--set", "mode=auto", "--set", "min_requests=7", *auth]) == 0
        policy = json.loads(capsys.readouterr().out)
        assert policy["mode"] == "auto" and policy["min_requests"] == 7
        assert main(["engines", "list", *auth]) == 0
        assert "serving: 2" in capsys.readouterr().out
        monkeypatch.setenv("LIVETOWER_ADMIN_TOKEN", "x" * 20)
        assert main(["engines", "rollback", *auth]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert server.manager.stable.version == 2


def test_retired_engines_are_freed_off_the_request_path_once_no_request_holds_them(tmp_path):
    import weakref

    from server.engine.manager import EngineManager, EngineManagerConfig

    class Old:  # stands in for an Engine
        pass

    m = EngineManager(Registry(tmp_path / "registry"), EngineManagerConfig())
    idle, in_flight = Old(), Old()
    gone, still = weakref.ref(idle), weakref.ref(in_flight)
    m._retire(idle)
    m._retire(in_flight)
    held_by_a_request = in_flight
    del idle, in_flight
    assert m.release_retired() == 1  # the one a request still holds stays retired
    assert gone() is None and still() is not None
    del held_by_a_request
    assert m.release_retired() == 0 and still() is None
