"""HNSW index: built and tuned at engine build for large catalogues, used by the engine for top-k."""

from __future__ import annotations

import json

import numpy as np

from contracts.eventlog import SqliteEventLog
from contracts.registry import ANN_FILE, ANN_META_FILE, Registry
from server.engine.engine import Engine, RecommendQuery
from tests.conftest import SMALL_DATA, make_trainer
from trainer.data.synthetic import generate
from trainer.export.ann import AnnOptions, exact_topk, recall_at_k


def test_recall_at_k_counts_overlap():
    assert recall_at_k(np.array([[1, 2, 3], [4, 5, 6]]), np.array([[3, 2, 9], [4, 5, 6]])) == 5 / 6
    items = np.eye(4, dtype=np.float32)
    assert exact_topk(np.array([[0, 0.5, 1, 0]], np.float32), items, 2).tolist() == [[2, 1]]


def test_engine_with_ann_matches_exact(tmp_path):
    log = SqliteEventLog(tmp_path / "events.sqlite")
    log.append(list(generate(SMALL_DATA)))
    log.close()
    trainer = make_trainer(tmp_path, ann=AnnOptions(min_items=100, k=20, M=16))
    assert trainer.run_round().published_version == 1
    reg = Registry(tmp_path / "registry")
    manifest = reg.verify(1)
    assert {f.path for f in manifest.files} >= {ANN_FILE, ANN_META_FILE}
    meta = json.loads((reg.engine_dir(1) / ANN_META_FILE).read_text())
    assert meta["recall_at_k"] >= 0.95 and manifest.eval_metrics["ann_recall@20"] == meta["recall_at_k"]
    engine = Engine.load(reg.engine_dir(1), manifest)
    assert engine.ann is not None
    exact = Engine.load(reg.engine_dir(1), manifest)
    exact.ann = None
    overlaps = []
    for u in range(30):
        q = RecommendQuery(trainer.vocab.ids[u:u + 5], 20, exclude_seen=True)
        got, want = engine.recommend_batch([q])[0], exact.recommend_batch([q])[0]
        assert len(got.item_ids) == 20 and not set(q.history) & set(got.item_ids)
        assert got.scores == sorted(got.scores, reverse=True)
        overlaps.append(len(set(got.item_ids) & set(want.item_ids)) / 20)
    assert np.mean(overlaps) >= 0.95
