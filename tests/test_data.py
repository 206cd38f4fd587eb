import dataclasses
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from trainer.data.movielens import load_ml100k
from trainer.data.synthetic import SyntheticConfig, generate

SMALL = SyntheticConfig(n_users=150, n_items=200, n_clusters=10, events_per_user=20, seed=7)
REPO = Path(__file__).resolve().parents[1]
ML100K = REPO.parent / "shared" / "data" / "ml-100k"


def test_synthetic_deterministic_for_seed():
    a = list(generate(SMALL))
    b = list(generate(SMALL))
    assert a == b
    c = list(generate(SyntheticConfig(n_users=150, n_items=200, n_clusters=10, events_per_user=20, seed=8)))
    assert [e.item_id for e in a] != [e.item_id for e in c]
    assert a[0].event_id.startswith("syn7-") and c[0].event_id.startswith("syn8-")


def test_synthetic_shape_and_order():
    evs = list(generate(SMALL))
    assert len(evs) == 150 * 20
    ts = [e.timestamp_ms for e in evs]
    assert ts == sorted(ts)
    assert ts[0] > SMALL.start_ms
    assert len({e.event_id for e in evs}) == len(evs)
    assert len({e.user_id for e in evs}) == 150
    assert Counter(e.user_id for e in evs) == {f"user-{u}": 20 for u in range(150)}
    assert all(e.action == "click" and e.weight == 1.0 for e in evs)
    items = {e.item_id for e in evs}
    assert items <= {f"item-{i}" for i in range(200)}
    # per user, event index j follows time: event ids of a user appear as -0, -1, ...
    per_user = defaultdict(list)
    for e in evs:
        per_user[e.user_id].append(int(e.event_id.rsplit("-", 1)[1]))
    assert all(js == list(range(20)) for js in per_user.values())
    # a user's consecutive events are strictly later
    last = {}
    for e in evs:
        assert e.timestamp_ms > last.get(e.user_id, 0)
        last[e.user_id] = e.timestamp_ms


def test_synthetic_user_prefix():
    cfg = SyntheticConfig(n_users=3, n_items=10, n_clusters=2, events_per_user=2, user_prefix="new-")
    evs = list(generate(cfg))
    assert {e.user_id for e in evs} == {"new-0", "new-1", "new-2"}
    assert {e.event_id.rsplit("-", 1)[0] for e in evs} == {"syn0-new-0", "syn0-new-1", "syn0-new-2"}


def cluster_of_items(cfg):
    # generate() assigns clusters with the first draw of the world RNG (world_seed; older code: seed)
    seed = getattr(cfg, "world_seed", cfg.seed)
    return np.random.default_rng(seed).permutation(cfg.n_items) % cfg.n_clusters


@pytest.mark.parametrize("seed", [7, 8])
def test_synthetic_has_planted_cluster_structure(seed):
    cfg = dataclasses.replace(SMALL, seed=seed)
    evs = list(generate(cfg))
    item_cluster = cluster_of_items(cfg)
    seqs = defaultdict(list)
    for e in evs:
        seqs[e.user_id].append(int(e.item_id.split("-")[1]))
    same = total = 0
    for s in seqs.values():
        for a, b in zip(s, s[1:]):
            same += item_cluster[a] == item_cluster[b]
            total += 1
    frac = same / total
    assert frac > 0.6, frac  # chance is 1 / n_clusters = 0.1; planted ~0.75
    # and independent of cluster ids: next-item given previous item is far from uniform
    trans = defaultdict(Counter)
    for s in seqs.values():
        for a, b in zip(s, s[1:]):
            trans[a][b] += 1
    a, nxt = max(trans.items(), key=lambda kv: sum(kv[1].values()))
    top_p = nxt.most_common(1)[0][1] / sum(nxt.values())
    assert top_p > 10 / SMALL.n_items


def test_synthetic_world_seed_keeps_items_and_changes_users():
    if not hasattr(SMALL, "world_seed"):
        pytest.skip("SyntheticConfig has no world_seed")
    a = list(generate(dataclasses.replace(SMALL, seed=1, world_seed=3)))
    b = list(generate(dataclasses.replace(SMALL, seed=2, world_seed=3)))
    c = list(generate(dataclasses.replace(SMALL, seed=1, world_seed=4)))
    assert [e.item_id for e in a] != [e.item_id for e in b]
    assert [e.item_id for e in a] != [e.item_id for e in c]
    assert [e.timestamp_ms for e in a] == [e.timestamp_ms for e in c]  # behaviour RNG untouched by the world


@pytest.mark.parametrize("kw,field", [
    (dict(n_users=0), "n_users"), (dict(n_items=0), "n_items"), (dict(n_clusters=0), "n_clusters"),
    (dict(events_per_user=0), "events_per_user"), (dict(step_ms=0), "step_ms"),
    (dict(drift_prob=1.5), "drift_prob"), (dict(in_cluster_prob=-0.1), "in_cluster_prob"),
])
def test_synthetic_config_validation(kw, field):
    with pytest.raises(ValueError, match=rf"SyntheticConfig\.{field} "):
        SyntheticConfig(**kw)


def test_synthetic_config_clusters_vs_items():
    with pytest.raises(ValueError, match=r"n_clusters \(11\) must be <= n_items \(10\)"):
        SyntheticConfig(n_items=10, n_clusters=11)
    SyntheticConfig(n_items=10, n_clusters=10, drift_prob=0, in_cluster_prob=1)  # boundaries are valid


def write_udata(d, lines):
    d.mkdir(parents=True, exist_ok=True)
    (d / "u.data").write_text("".join("\t".join(map(str, r)) + "\n" for r in lines))


def test_movielens_fake_file(tmp_path):
    d = tmp_path / "ml"
    write_udata(d, [
        (5, 10, 3, 900),
        (2, 11, 4, 800),
        (5, 12, 1, 850),
        (5, 13, 5, 850),   # tie with the previous line, same user: file order kept
        (5, 9, 2, 850),    # and again
        (3, 14, 2, 1000),
    ])
    evs = load_ml100k(d)
    assert [(e.user_id, e.item_id) for e in evs][:1] == [("u2", "m11")]
    assert [e.timestamp_ms for e in evs] == [800_000, 850_000, 850_000, 850_000, 900_000, 1_000_000]
    assert [e.item_id for e in evs if e.user_id == "u5"] == ["m12", "m13", "m9", "m10"]
    assert [e.item_id for e in evs] == ["m11", "m12", "m13", "m9", "m10", "m14"]
    e = evs[0]
    assert (e.event_id, e.user_id, e.item_id, e.action, e.weight, e.timestamp_ms) == \
        ("ml100k-2-11", "u2", "m11", "rate", 4.0, 800_000)
    assert [e.weight for e in evs] == [4.0, 1.0, 5.0, 2.0, 3.0, 2.0]


def test_movielens_ties_across_users_stay_time_ordered(tmp_path):
    d = tmp_path / "ml"
    write_udata(d, [(9, 1, 3, 100), (1, 2, 3, 100), (9, 3, 3, 100), (1, 4, 3, 50)])
    evs = load_ml100k(d)
    assert [e.timestamp_ms for e in evs] == [50_000, 100_000, 100_000, 100_000]
    assert [e.item_id for e in evs if e.user_id == "u9"] == ["m1", "m3"]
    assert len({e.event_id for e in evs}) == 4


def test_movielens_missing_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_ml100k(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*u\.data"):
        load_ml100k(tmp_path / "empty")


@pytest.mark.skipif(not (ML100K / "u.data").is_file(), reason=f"{ML100K}/u.data not present")
def test_movielens_real_100k():
    evs = load_ml100k(ML100K)
    assert len(evs) == 100_000
    ts = [e.timestamp_ms for e in evs]
    assert all(a <= b for a, b in zip(ts, ts[1:]))
    assert len({e.event_id for e in evs}) == 100_000
    assert len({e.user_id for e in evs}) == 943 and len({e.item_id for e in evs}) == 1682
    assert {e.weight for e in evs} == {1.0, 2.0, 3.0, 4.0, 5.0}
