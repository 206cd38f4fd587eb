"""The replay study end to end on a small synthetic stream: streamer + trainer thread + scoring + JSON/PNG."""

from __future__ import annotations

import json

import pytest

from benchmarks import replay
from benchmarks.replay_eval import score_popularity


def test_tiny_replay_writes_the_three_series(tmp_path, capsys):
    out = tmp_path / "replay"
    rc = replay.main(["--dataset", "synthetic", "--speedup", "500", "--eval-every", "600", "--out", str(out),
                      "--quick", "--max-events", "3000", "--warmup-events", "600", "--round-min-events", "200",
                      "--round-interval-s", "0.5",
                      "--gate-min-ratio", "0"])
    assert rc == 0, capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert (out / "results.png").stat().st_size > 0
    assert res["events"] == 3000 and len(res["publishes"]) >= 1
    assert res["publishes"][0]["version"] == 1
    rows = res["windows"]
    assert res["warmup_events"] == 600 and res["first_engine"]["trained_events"] == 600
    assert len(rows) == 4 and rows[0]["start"] == 600 and rows[-1]["end"] == 3000
    for series in ("continuous", "frozen", "popularity"):
        means = res["summary"][series]["all"]
        assert means["events"] > 0 and 0.0 <= means["ndcg@10"] <= means["recall@10"] <= 1.0
    # The frozen and continuous series score the same events; popularity scores every event.
    assert res["summary"]["frozen"]["all"]["events"] == res["summary"]["continuous"]["all"]["events"]
    assert sum(r["popularity"]["events"] for r in rows) == 2400  # every streamed event
    printed = capsys.readouterr().out
    assert "continuous R/N@10" in printed and "mean all" in printed


def test_popularity_uses_only_earlier_events_and_excludes_seen_items():
    import numpy as np

    # events: (user, item): a a b a c a | the last query of user 1 has seen item 0 -> it is excluded.
    users = [0, 1, 0, 2, 0, 1]
    items = np.array([0, 0, 1, 0, 2, 1])
    pos = np.array([0, 0, 1, 0, 2, 1])
    seq_idx = [np.array([0, 1, 2]), np.array([0, 1]), np.array([0])]
    hit, gain = score_popularity(users, pos, seq_idx, items, n_items=3, k=1)
    # e0: item 0 never seen -> miss; e1: item 0 top -> hit; e2: item 1 unseen -> miss; e3: hit;
    # e4: item 2 unseen -> miss; e5: user 1 saw item 0, so item 1 (count 1) is top-1 -> hit.
    assert hit.tolist() == [0, 1, 0, 1, 0, 1] and gain.tolist() == [0, 1, 0, 1, 0, 1]


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="ReplayConfig.speedup"):
        replay.ReplayConfig(speedup=0)
    with pytest.raises(ValueError, match="ReplayConfig.dataset"):
        replay.ReplayConfig(dataset="ml-1m")
