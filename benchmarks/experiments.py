"""Simulated experiments through the real system: does the hit-rate analysis pick the right engine, how many
impressions does it take, and how often does it declare a winner between two identical engines (A/A)?

`python -m benchmarks.experiments --out bench-results/experiments` runs a real `livetower serve` process and a
real `livetower attribution join` process; simulated users call Recommend and log what they clicked, with the
response's impression id, through LogEvents.

Ground truth: engine 1 (trained) is the truth. Each user's truth set = its top-`truth_k` items from engine 1 for
the user's history. The engines under test are copies of engine 1 whose item matrix got Gaussian noise of scale
sigma (rows renormalised): more noise, fewer truth items shown, fewer hits. Control = sigma_control; "better" =
less noise; "worse" = more; the A/A arm is a byte-identical copy of the control's files. A user clicks each shown
truth item with probability `click_p` (so hit rates stay well below 1) and now and then an item that was not shown
(a joined event that is not a hit). An impression with >= 1 click on a shown item is a hit.

Results: JSON (every run, the settings) and a PNG under --out; a summary table on stdout.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from benchmarks.processes import free_port, start_server, stop_server
from benchmarks.swap import stage
from contracts.client import Client
from contracts.outcome import ArmCounts, OutcomeTest, diff_bounds, experiment_decision, noninferiority
from contracts.registry import ITEMS_FILE, Registry
from contracts.rollout import CanaryPolicy, RolloutState
from proto import livetower_v1_pb2 as pb

TOKEN = "experiments-benchmark-admin-token"


@dataclass(kw_only=True, frozen=True, slots=True)
class SimConfig:
    users: int = 1500           # simulated users (the synthetic data's)
    items: int = 1000           # catalogue size of the synthetic data
    truth_k: int = 20           # size of each user's truth set
    k: int = 10                 # items shown per impression
    click_p: float = 0.05       # chance a user clicks a shown truth item
    stray_p: float = 0.2        # chance an impression also gets a click on an item it did not show
    # Item-matrix noise. Measured on the benchmark's engine (400 users, k=10 of a top-20 truth): sigma 1.0 shows
    # 7.1 truth items (hit rate 0.30 at click_p 0.05), 1.5 shows 4.7 (0.21), 2.0 shows 3.3 (0.15).
    sigma_control: float = 1.5
    sigma_better: float = 1.0
    sigma_worse: float = 2.0
    rate: float = 250.0         # Recommend calls per second, all users together
    seed: int = 0


def publish_noisy(src: Registry, version: int, dst: Registry, sigma: float, seed: int) -> int:
    """A copy of `version` whose item embeddings got N(0, sigma^2 / D) noise per coordinate, renormalised."""
    staging, manifest = stage(src, version, dst)
    items_ND = np.load(staging / ITEMS_FILE)
    rng = np.random.default_rng(seed)
    noisy_ND = items_ND + rng.normal(0, sigma / np.sqrt(items_ND.shape[1]), items_ND.shape).astype(np.float32)
    noisy_ND /= np.linalg.norm(noisy_ND, axis=1, keepdims=True)
    np.save(staging / ITEMS_FILE, noisy_ND.astype(np.float32))
    return dst.publish(staging, manifest)


def prepare(src: Path, cfg: SimConfig) -> dict[str, list[str]]:
    """Train engine 1 once (cached in src); returns each user's recent history (newest last)."""
    from contracts.eventlog import SqliteEventLog
    from trainer.config import TrainConfig
    from trainer.data.synthetic import SyntheticConfig, generate
    from trainer.loop import Trainer

    events = list(generate(SyntheticConfig(n_users=cfg.users, n_items=cfg.items, events_per_user=30)))
    reg = Registry(src / "registry")
    if not reg.versions():
        log = SqliteEventLog(src / "events.sqlite")
        log.append_all(events)
        trainer = Trainer(TrainConfig.tiny_debug(epochs_per_round=3, round_min_events=1), log, reg, src / "trainer")
        result = trainer.run_round()
        if result is None or not result.published_version:
            trainer.publish(result.metrics, "benchmark")  # the truth needs an engine, not a passed gate
        log.close()
    histories: dict[str, list[str]] = {}
    for ev in events:
        histories.setdefault(ev.user_id, []).append(ev.item_id)
    return {u: h[-10:] for u, h in histories.items()}


class Users:
    """Simulated users: call Recommend at a fixed total rate and log their clicks with the impression id."""

    def __init__(self, target: str, histories: dict[str, list[str]], truth: dict[str, set[str]], cfg: SimConfig,
                 threads: int = 3) -> None:
        self.target, self.histories, self.truth, self.cfg = target, histories, truth, cfg
        self.users = sorted(histories)
        self.stop = threading.Event()
        self.calls = 0
        self.errors: dict[str, int] = {}
        self._threads = [threading.Thread(target=self._run, args=(i, threads), daemon=True) for i in range(threads)]

    def __enter__(self) -> "Users":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(30)

    def _run(self, index: int, n: int) -> None:
        rng = random.Random(self.cfg.seed * 1000 + index)
        c = Client(self.target, timeout_s=10)
        period, pending, seq = n / self.cfg.rate, [], 0
        next_t = time.monotonic()
        while not self.stop.is_set():
            next_t += period
            user = rng.choice(self.users)
            try:
                r = c.recommend(user, k=self.cfg.k, history=self.histories[user])
                self.calls += 1
            except grpc.RpcError as e:  # counted by code; the run reports them
                self.errors[e.code().name] = self.errors.get(e.code().name, 0) + 1
                continue
            now_ms = int(time.time() * 1000)
            clicked = [i for i in r.item_ids if i in self.truth[user] and rng.random() < self.cfg.click_p]
            if rng.random() < self.cfg.stray_p:
                clicked.append(f"item-{rng.randrange(1, self.cfg.items + 1)}")
            for item in clicked:
                seq += 1
                pending.append(pb.Event(event_id=f"sim-{self.cfg.seed}-{index}-{seq}", user_id=user, item_id=item,
                                        action="click", weight=1.0, timestamp_ms=now_ms,
                                        impression_id=r.impression_id))
            if len(pending) >= 20:
                c.log_events(pending)
                pending = []
            time.sleep(max(0.0, next_t - time.monotonic()))
        if pending:
            c.log_events(pending)
        c.close()


def run_experiment(admin: Client, name: str, arms: list[pb.ExperimentArm], test: dict, timeout_s: float) -> dict:
    t0 = time.monotonic()
    admin.start_experiment(pb.StartExperimentRequest(name=name, arms=arms, **test))
    while True:
        time.sleep(0.5)
        x = admin.experiment()
        if not x.running:
            break
        if time.monotonic() - t0 > timeout_s:
            x = admin.stop_experiment(f"benchmark timeout after {timeout_s:.0f}s")
            break
    return {"name": name, "decision": x.decision, "winner_version": x.winner_version, "reason": x.reason,
            "seconds": round(time.monotonic() - t0, 1),
            "arms": [{"name": a.name, "version": a.version, "impressions": a.impressions,
                      "hits": a.hit_impressions, "hit_rate": round(a.hit_rate, 4), "state": a.state} for a in x.arms],
            "impressions": sum(a.impressions for a in x.arms)}


def simulated_aa(rate: float, test: OutcomeTest, runs: int, seed: int, step: int = 50, *,
                 naive: bool = False) -> dict:
    """The same decision code on binomial streams at the measured control hit rate (looked at every `step`
    impressions per arm): the A/A false-winner rate with many more runs than the live ones afford.
    naive: the baseline a dashboard without a sequential test gives: the fixed z-bound read at every look."""
    rng = np.random.default_rng(seed)
    winners, ns = 0, []
    for _ in range(runs):
        n, h = np.zeros(2, int), np.zeros(2, int)
        while True:
            h += rng.binomial(step, [rate, rate])
            n += step
            control, arm = ArmCounts(n[0], h[0]), ArmCounts(n[1], h[1])
            if naive:
                won = n[0] >= test.min_impressions and diff_bounds(arm, control, test).lo > 0
                action = "winner" if won else "no_winner" if n[0] >= test.horizon else "wait"
            else:
                action = experiment_decision(control, {"a": arm}, test).action
            if action != "wait":
                winners += action == "winner"
                ns.append(int(n.sum()))
                break
    return {"runs": runs, "false_winners": winners, "rate": winners / runs, "hit_rate": rate,
            "median_impressions": float(np.median(ns)), "look_every": step}


def simulated_noninferiority(rate: float, margin: float, test: OutcomeTest, runs: int, seed: int,
                             step: int = 50) -> dict:
    """The canary criterion at its boundary: a canary whose hit rate is truly `margin` below stable's must be
    promoted (pass) in at most alpha of the runs; and how often an equal canary passes, after how many."""
    rng = np.random.default_rng(seed)
    out = {}
    for label, canary_rate in (("worse_by_margin", rate - margin), ("equal", rate)):
        passes, ns = 0, []
        for _ in range(runs):
            n, h = np.zeros(2, int), np.zeros(2, int)
            while True:
                h += rng.binomial(step, [canary_rate, rate])
                n += step
                v = noninferiority(ArmCounts(n[0], h[0]), ArmCounts(n[1], h[1]), test, margin)
                if v.action != "wait":
                    passes += v.action == "pass"
                    ns.append(int(n.sum()))
                    break
        out[label] = {"runs": runs, "promoted": passes, "rate": passes / runs,
                      "median_impressions": float(np.median(ns))}
    return {"hit_rate": rate, "margin": margin, "look_every": step, **out}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    for r in results["abn_runs"]:
        for arm in r["arms"]:
            a.scatter(arm["name"], arm["hit_rate"], color="C2" if arm["state"] == "winner" else "C0")
    a.set_title("live A/B/N: hit rate per arm at the decision (green: winner)", fontsize=10)
    a.set_ylabel("hit rate")
    runs = {"A/B/N": results["abn_runs"], "A/A": results["aa_runs"]}
    b.bar(list(runs), [np.median([r["impressions"] for r in rs]) if rs else 0 for rs in runs.values()])
    b.set_title("live: median impressions until the decision", fontsize=10)
    sim = results["simulated_aa"]
    c.bar(list(sim), [100 * r["rate"] for r in sim.values()], color=["C0", "C0", "C3"])
    c.axhline(100 * results["config"]["alpha"], color="k", linestyle="--", label="alpha")
    c.set_title(f"simulated A/A: false winners ({sim['fixed']['runs']} runs each, a look every "
                f"{sim['fixed']['look_every']})", fontsize=10)
    c.set_ylabel("% of runs")
    c.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench-results/experiments"))
    ap.add_argument("--source", type=Path, default=Path("bench-results/experiments-source"),
                    help="data dir with the trained truth engine (made once, reused)")
    ap.add_argument("--abn-runs", type=int, default=4)
    ap.add_argument("--aa-runs", type=int, default=4)
    ap.add_argument("--test", choices=("sequential", "fixed"), default="sequential")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--horizon", type=int, default=3000, help="settled impressions per arm")
    ap.add_argument("--simulated-aa-runs", type=int, default=2000)
    ap.add_argument("--margin", type=float, default=0.02, help="the simulated canary's non-inferiority margin")
    ap.add_argument("--rate", type=float, default=250.0, help="Recommend calls per second")
    args = ap.parse_args(argv)
    cfg = SimConfig(rate=args.rate)
    args.out.mkdir(parents=True, exist_ok=True)
    print("preparing the truth engine …", flush=True)
    histories = prepare(args.source, cfg)
    src = Registry(args.source / "registry")
    data = args.out / "data"
    shutil.rmtree(data, ignore_errors=True)
    dst = Registry(data / "registry")
    truth_v = dst.publish(*stage(src, 1, dst))
    control = publish_noisy(src, 1, dst, cfg.sigma_control, seed=1)
    better = publish_noisy(src, 1, dst, cfg.sigma_better, seed=2)
    worse = publish_noisy(src, 1, dst, cfg.sigma_worse, seed=3)
    twin = dst.publish(*stage(dst, control, dst))  # byte-identical to the control: A/A
    dst.write_rollout(RolloutState(stable=truth_v, policy=CanaryPolicy(mode="manual")))
    (data / "admin.token").write_text(TOKEN + "\n")
    (data / "admin.token").chmod(0o600)
    admin_port = free_port()
    proc, port = start_server(data, ["--threads", "1"], args.out / "server.log", admin_port=admin_port)
    joiner = None
    target = f"127.0.0.1:{port}"
    admin = Client(target, admin_target=f"127.0.0.1:{admin_port}", admin_token=TOKEN, timeout_s=60)
    try:
        import subprocess
        import sys

        print("truth sets from engine 1 …", flush=True)
        truth = {u: set(admin.recommend(u, k=cfg.truth_k, history=h).item_ids) for u, h in histories.items()}
        admin.start_canary(control, 0.5)
        admin.promote("benchmark: the control")
        joiner = subprocess.Popen([sys.executable, "-m", "livetower", "attribution", "join", "--data-dir", str(data),
                                   "--grace-s", "1", "--poll-interval-s", "0.2"],
                                  stdout=open(args.out / "joiner.log", "w"), stderr=subprocess.STDOUT)
        test = dict(test=args.test, alpha=args.alpha, horizon=args.horizon, min_impressions=200, settle_s=2.0)
        results: dict = {"config": {**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__}, **test},
                         "versions": {"truth": truth_v, "control": control, "better": better, "worse": worse,
                                      "twin": twin}, "abn_runs": [], "aa_runs": []}
        with Users(target, histories, truth, cfg) as users:
            for i in range(args.abn_runs):
                r = run_experiment(admin, f"abn-{i}", [pb.ExperimentArm(name="better", version=better, fraction=0.3),
                                                       pb.ExperimentArm(name="worse", version=worse, fraction=0.3)],
                                   test, timeout_s=600)
                r["right_winner"] = r["winner_version"] == better
                results["abn_runs"].append(r)
                print(f"A/B/N {i}: {r['decision']} v{r['winner_version']} after {r['impressions']} impressions, "
                      f"{r['seconds']}s: {[(a['name'], a['hit_rate']) for a in r['arms']]}", flush=True)
            for i in range(args.aa_runs):
                r = run_experiment(admin, f"aa-{i}", [pb.ExperimentArm(name="twin", version=twin, fraction=0.5)],
                                   test, timeout_s=900)
                results["aa_runs"].append(r)
                print(f"A/A {i}: {r['decision']} after {r['impressions']} impressions, {r['seconds']}s: "
                      f"{[(a['name'], a['hit_rate']) for a in r['arms']]}", flush=True)
            results["requests"], results["request_errors"] = users.calls, users.errors
        control_rate = float(np.mean([r["arms"][0]["hit_rate"] for r in results["aa_runs"]])) \
            if results["aa_runs"] else 0.2
        results["simulated_aa"] = {t: simulated_aa(control_rate, OutcomeTest(test=t, alpha=args.alpha,
                                                                             horizon=args.horizon),
                                                   args.simulated_aa_runs, seed=11) for t in ("sequential", "fixed")}
        results["simulated_aa"]["naive_peeking"] = simulated_aa(
            control_rate, OutcomeTest(test="fixed", alpha=args.alpha, horizon=args.horizon), args.simulated_aa_runs,
            seed=11, naive=True)
        results["simulated_canary"] = simulated_noninferiority(
            control_rate, args.margin, OutcomeTest(test=args.test, alpha=args.alpha, horizon=args.horizon * 10),
            args.simulated_aa_runs // 4, seed=12)
    finally:
        admin.close()
        if joiner is not None:
            joiner.terminate()
            joiner.wait(30)
        stop_server(proc)
    (args.out / "experiments.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "experiments.png")
    abn, aa, sim = results["abn_runs"], results["aa_runs"], results["simulated_aa"]
    print(f"\nA/B/N: right winner in {sum(r['right_winner'] for r in abn)}/{len(abn)} runs; impressions to the "
          f"decision median {np.median([r['impressions'] for r in abn]):.0f} "
          f"(range {min(r['impressions'] for r in abn)}-{max(r['impressions'] for r in abn)})" if abn else "")
    print(f"A/A live: {sum(r['decision'] == 'winner' for r in aa)}/{len(aa)} declared a winner" if aa else "")
    for t, r in sim.items():
        print(f"A/A simulated, {t} test ({r['runs']} runs at hit rate {r['hit_rate']:.3f}, looked at every "
              f"{r['look_every']} impressions per arm up to {args.horizon}): false winners {r['false_winners']} "
              f"({100 * r['rate']:.2f} %, alpha {args.alpha})")
    c = results["simulated_canary"]
    print(f"canary non-inferiority simulated (margin {c['margin']}, {c['worse_by_margin']['runs']} runs each): "
          f"promoted when worse by the margin {100 * c['worse_by_margin']['rate']:.2f} % (alpha {args.alpha}); "
          f"when equal {100 * c['equal']['rate']:.1f} % after a median {c['equal']['median_impressions']:.0f} "
          "impressions")
    print(f"requests {results['requests']}, errors {results['request_errors']}; results in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
