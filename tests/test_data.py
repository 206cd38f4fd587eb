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


# ---- one u.data parser for both loaders: outputs identical to the two parsers it replaced

def old_load_ml100k(directory):
    """The events loader before the parsers were merged (kept verbatim as the reference)."""
    from proto import livetower_v1_pb2 as pb

    rows = []
    with open(Path(directory) / "u.data") as f:
        for line_no, line in enumerate(f):
            user, item, rating, ts = line.split("\t")
            rows.append((int(ts), int(user), line_no, int(item), float(rating)))
    rows.sort()
    return [pb.Event(event_id=f"ml100k-{u}-{i}", user_id=f"u{u}", item_id=f"m{i}", action="rate",
                     weight=r, timestamp_ms=ts * 1000) for ts, u, _, i, r in rows]


def old_load_ml100k_sequences(path):
    """The sequences loader before the parsers were merged (kept verbatim as the reference): (items, times, n_items)."""
    arr = np.loadtxt(Path(path) / "u.data", dtype=np.int64, ndmin=2)
    order = np.lexsort((np.arange(len(arr)), arr[:, 3], arr[:, 0]))
    arr = arr[order]
    bounds = np.flatnonzero(np.diff(arr[:, 0])) + 1
    starts, ends = np.r_[0, bounds], np.r_[bounds, len(arr)]
    return ([arr[a:b, 1].copy() for a, b in zip(starts, ends)], [arr[a:b, 3].copy() for a, b in zip(starts, ends)],
            int(arr[:, 1].max()))


TIED_UDATA = [  # timestamp ties within a user (file order kept) and across users (user id order, then file order)
    (5, 10, 3, 900), (12, 3, 4, 850), (2, 11, 4, 800), (5, 12, 1, 850), (5, 13, 5, 850), (12, 7, 2, 850),
    (5, 9, 2, 850), (3, 14, 2, 1000), (2, 1, 5, 850), (12, 14, 1, 800), (3, 2, 3, 1000), (5, 1, 4, 100),
]


def assert_same_as_old(d):
    from trainer.data.sequences import load_ml100k_sequences

    new, old = load_ml100k(d), old_load_ml100k(d)
    assert [e.SerializeToString() for e in new] == [e.SerializeToString() for e in old]
    seq = load_ml100k_sequences(d)
    items, times, n_items = old_load_ml100k_sequences(d)
    assert seq.n_items == n_items and len(seq.items) == len(items) and len(seq.times) == len(times)
    for a, b in zip(seq.items + seq.times, items + times):
        assert a.dtype == b.dtype == np.int64 and a.tolist() == b.tolist()
    return new, seq


def test_ml100k_loaders_share_one_parser_and_match_the_old_ones(tmp_path, monkeypatch):
    import trainer.data.movielens as ml
    import trainer.data.sequences as sq

    d = tmp_path / "ml"
    write_udata(d, TIED_UDATA)
    new, seq = assert_same_as_old(d)
    # by hand: time, then user, then file line
    assert [e.event_id for e in new] == ["ml100k-5-1", "ml100k-2-11", "ml100k-12-14", "ml100k-2-1", "ml100k-5-12",
                                         "ml100k-5-13", "ml100k-5-9", "ml100k-12-3", "ml100k-12-7", "ml100k-5-10",
                                         "ml100k-3-14", "ml100k-3-2"]
    assert [s.tolist() for s in seq.items] == [[11, 1], [14, 2], [1, 12, 13, 9, 10], [14, 3, 7]]  # users 2, 3, 5, 12
    assert seq.times[2].tolist() == [100, 850, 850, 850, 900]
    rows = ml.read_udata(d / "u.data")
    assert rows.dtype == np.int64 and rows.tolist() == [list(r) for r in TIED_UDATA]  # file order, as written
    calls = []
    monkeypatch.setattr(ml, "read_udata", lambda p: calls.append(p) or rows)
    monkeypatch.setattr(sq, "read_udata", ml.read_udata)
    ml.load_ml100k(d), sq.load_ml100k_sequences(d)
    assert len(calls) == 2  # both go through the one parser


def test_read_udata_rejects_a_wrong_column_count(tmp_path):
    from trainer.data.movielens import read_udata

    (tmp_path / "u.data").write_text("1\t2\t3\n")
    with pytest.raises(ValueError, match="4 tab-separated columns"):
        read_udata(tmp_path / "u.data")


@pytest.mark.skipif(not (ML100K / "u.data").is_file(), reason=f"{ML100K}/u.data not present")
def test_ml100k_loaders_match_the_old_ones_on_the_real_file():
    assert_same_as_old(ML100K)
