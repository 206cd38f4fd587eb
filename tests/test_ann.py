"""Retrieval chosen by measurement at engine build (trainer/export/ann.py), searched and re-checked by the
server (contracts/engine_format/item_index.py, server/engine/)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from contracts.engine_format.item_index import ItemIndex, SearchSettings
from contracts.eventlog import SqliteEventLog
from contracts.registry import ANN_CHECK_FILE, ANN_EXACT_FILE, ANN_FILE, ANN_META_FILE, Registry
from server.engine.engine import Engine, EngineRejected, RecommendQuery
from server.engine.manager import EngineManager, EngineManagerConfig, load_from_registry
from tests.conftest import SMALL_DATA, make_trainer, stream_events
from trainer.data.synthetic import generate
from trainer.export.ann import AnnOptions, choose_retrieval, exact_topk, recall_at_k

FAST = dict(time_per_measure_s=0.02, hnsw_builds=((16, 64),), batch_sizes=(1, 4))


def _clustered(n_items: int, n_queries: int, dim: int = 16, clusters: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    items = centres[rng.integers(clusters, size=n_items)] + 0.3 * rng.normal(size=(n_items, dim))
    queries = centres[rng.integers(clusters, size=n_queries)] + 0.3 * rng.normal(size=(n_queries, dim))
    norm = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return norm(items), norm(queries)


def test_recall_at_k_counts_overlap():
    assert recall_at_k(np.array([[1, 2, 3], [4, 5, 6]]), np.array([[3, 2, 9], [4, 5, 6]])) == 5 / 6
    assert recall_at_k(np.array([[-1, 2]]), np.array([[1, 2]])) == 0.5
    items = np.eye(4, dtype=np.float32)
    assert exact_topk(np.array([[0, 0.5, 1, 0]], np.float32), items, 2).tolist() == [[2, 1]]


def test_every_method_is_measured_and_the_cheapest_qualifying_one_wins():
    items, queries = _clustered(4000, 200)
    choice = choose_retrieval(items, queries, AnnOptions(k=20, **FAST), progress=lambda s: None)
    cands = {c["name"].split()[0]: c for c in choice.meta["candidates"]}
    assert set(cands) == {"exact", "hnsw", "ivf", "sq8", "pq4"}
    qualified = [c for c in choice.meta["candidates"] if c["qualified"]]
    assert all(c["recall_at_k"] >= 0.95 and set(c["us_per_query"]) == {"1", "4"} for c in qualified)
    cheapest = min(qualified, key=lambda c: c["mean_us_per_query"])
    assert choice.meta["kind"] == cheapest["name"].split()[0] and choice.meta["us_per_query"] == cheapest["us_per_query"]
    assert (choice.index is None) == (choice.meta["kind"] == "exact")
    assert choice.meta["tuning_queries"] + choice.meta["check_queries"] == 200 == 140 + len(choice.check_queries_QD)
    assert choice.meta["recall_holdout"] >= 0.9


def test_searches_are_timed_after_the_tower_and_charged_only_for_themselves():
    """With the engine's tower, each timed search follows a tower call of its batch size; the cost recorded is the
    pair's minus the tower's alone, so a slow tower (here 2 ms a call) makes no method look slow."""
    import time

    items, queries = _clustered(3000, 120, seed=3)
    calls = []

    def tower(batch):
        calls.append(batch)
        time.sleep(0.002)

    opts = AnnOptions(k=20, methods=("exact", "ivf"), **FAST)
    choice = choose_retrieval(items, queries, opts, tower=tower, progress=lambda s: None)
    assert choice.meta["timed_beside_tower"] and set(calls) == {1, 4}
    tower_us = choice.meta["tower_us_per_query"]
    assert tower_us["1"] >= 2000 and 500 <= tower_us["4"] < tower_us["1"]  # 2 ms a call, per query
    timed = [c for c in choice.meta["candidates"] if c["qualified"]]
    assert timed and all(c["us_per_query"]["1"] < 1500 for c in timed)  # the sleep is not charged to a search
    alone = choose_retrieval(items, queries, opts, progress=lambda s: None)
    assert not alone.meta["timed_beside_tower"] and alone.meta["tower_us_per_query"] is None


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "sq8", "pq4"])
def test_a_forced_index_reaches_the_target_on_held_out_queries(kind):
    items, queries = _clustered(3000, 200, seed=1)
    choice = choose_retrieval(items, queries, AnnOptions(k=20, methods=(kind,), **FAST), progress=lambda s: None)
    assert choice.meta["kind"] == kind and choice.index is not None
    settings = SearchSettings.from_meta(choice.meta)
    got = ItemIndex(choice.index, settings).search(choice.check_queries_QD, 20)[1]
    assert recall_at_k(got, exact_topk(choice.check_queries_QD, items, 20)) == choice.meta["recall_holdout"] >= 0.9


def test_a_child_engine_reuses_its_parents_method_and_says_so():
    items, queries = _clustered(3000, 150, seed=2)
    parent = choose_retrieval(items, queries, AnnOptions(k=20, methods=("ivf",), **FAST), progress=lambda s: None)
    child = choose_retrieval(items, queries[::-1].copy(), AnnOptions(k=20, **FAST), previous=parent.meta,
                             progress=lambda s: None)
    assert child.meta["reused_parent_choice"] and child.meta["kind"] == "ivf"
    assert [c["name"].split()[0] for c in child.meta["candidates"]] == ["ivf"]
    assert child.meta["build"] == parent.meta["build"]


def _centroids(index) -> np.ndarray:
    import faiss

    ivf = faiss.extract_index_ivf(index)
    return ivf.quantizer.reconstruct_n(0, ivf.nlist)


def test_an_ivf_child_starts_its_k_means_from_its_parents_centroids():
    items, queries = _clustered(3000, 150, seed=5)
    opts = dict(k=20, methods=("ivf",), **FAST)
    parent = choose_retrieval(items, queries, AnnOptions(**opts), progress=lambda s: None)
    parent_LD = _centroids(parent.index)
    moved = items + 0.02 * np.random.default_rng(6).normal(size=items.shape).astype(np.float32)
    moved /= np.linalg.norm(moved, axis=1, keepdims=True)

    def child(iterations):
        return choose_retrieval(moved, queries, AnnOptions(**opts, ivf_warm_iterations=iterations),
                                previous=parent.meta, parent_centroids_LD=parent_LD, progress=lambda s: None)

    as_is = child(0)
    assert np.array_equal(_centroids(as_is.index), parent_LD)
    assert as_is.meta["trained"] == "from the parent's centroids (0 iterations)" and as_is.meta["reused_parent_choice"]
    warm = child(2)
    warm_LD = _centroids(warm.index)
    assert not np.array_equal(warm_LD, parent_LD)
    assert np.abs(warm_LD - parent_LD).max() < 0.5  # moved from where they started, not re-drawn at random
    assert warm.meta["recall_holdout"] >= 0.9
    fresh = child(None)
    assert fresh.meta["trained"] == "fresh" and np.abs(_centroids(fresh.index) - parent_LD).max() > 0.5


def test_a_trainers_ivf_engines_train_from_their_parents_centroids(tmp_path):
    log = SqliteEventLog(tmp_path / "events.sqlite")
    log.append(list(generate(SMALL_DATA)))
    trainer = make_trainer(tmp_path, ann=AnnOptions(min_items=100, k=20, methods=("ivf",), **FAST))
    assert trainer.run_round().published_version == 1
    log.append(stream_events(seed=21))
    log.close()
    assert trainer.run_round().published_version == 2
    reg = Registry(tmp_path / "registry")
    metas = [json.loads((reg.engine_dir(v) / ANN_META_FILE).read_text()) for v in (1, 2)]
    assert [m["trained"] for m in metas] == ["fresh", "from the parent's centroids (2 iterations)"]
    assert metas[1]["kind"] == "ivf" and metas[1]["recall_holdout"] >= 0.95


def test_no_method_reaching_the_target_says_what_to_do():
    items, queries = _clustered(2000, 100, seed=3, clusters=2)
    with pytest.raises(ValueError, match="add 'exact' to AnnOptions.methods"):
        choose_retrieval(items, queries, AnnOptions(k=50, methods=("ivf",), nprobe_candidates=(1,),
                                                    target_recall=1.0, tuning_margin=0.0, **FAST), progress=lambda s: None)


@pytest.fixture(scope="module")
def hnsw_engine_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ann")
    log = SqliteEventLog(d / "events.sqlite")
    log.append(list(generate(SMALL_DATA)))
    log.close()
    trainer = make_trainer(d, ann=AnnOptions(min_items=100, k=20, methods=("hnsw",), **FAST))
    assert trainer.run_round().published_version == 1
    return d, trainer


def test_engine_with_an_index_matches_exact_search(hnsw_engine_dir):
    d, trainer = hnsw_engine_dir
    reg = Registry(d / "registry")
    manifest = reg.verify(1)
    assert {f.path for f in manifest.files} >= {ANN_FILE, ANN_META_FILE, ANN_CHECK_FILE, ANN_EXACT_FILE}
    meta = json.loads((reg.engine_dir(1) / ANN_META_FILE).read_text())
    assert json.loads(manifest.retrieval_json) == meta and meta["kind"] == "hnsw"
    assert meta["recall_at_k"] >= 0.95 and manifest.eval_metrics["ann_recall@20"] == meta["recall_at_k"]
    assert meta["timed_beside_tower"] and set(meta["tower_us_per_query"]) == {"1", "4"}  # the engine's own tower
    engine = Engine.load(reg.engine_dir(1), manifest)
    assert engine.ann is not None
    recall, target = engine.index_recall()
    assert recall == pytest.approx(meta["recall_holdout"]) and target == 0.95
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


def test_server_refuses_an_engine_whose_index_misses_its_recall(hnsw_engine_dir):
    d, _ = hnsw_engine_dir

    def degraded(registry, version, config):  # the same files, an index that visits almost nothing
        import faiss

        engine = load_from_registry(registry, version, config)
        items = engine.items_ND.numpy()
        ivf = faiss.index_factory(items.shape[1], "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
        ivf.train(items)
        ivf.add(items)
        engine.ann = ItemIndex(ivf, SearchSettings(kind="ivf", nprobe=1))
        return engine

    ok = EngineManager(Registry(d / "registry"), EngineManagerConfig())
    assert ok.load_verified(1).version == 1
    bad = EngineManager(Registry(d / "registry"), EngineManagerConfig(), loader=degraded)
    with pytest.raises(EngineRejected, match="index recall .* below the build's target 0.95"):
        bad.load_verified(1)


def test_the_check_at_load_uses_the_builds_exact_answers_after_re_deriving_a_few(tmp_path, monkeypatch):
    import contracts.engine_format.item_index as item_index
    from contracts.engine_format.item_index import SPOT_QUERIES, check_recall

    items, queries = _clustered(3000, 120, seed=7)
    choice = choose_retrieval(items, queries, AnnOptions(k=20, methods=("ivf",), **FAST), progress=lambda s: None)
    (tmp_path / ANN_META_FILE).write_text(json.dumps(choice.meta))
    np.save(tmp_path / ANN_CHECK_FILE, choice.check_queries_QD)
    index = ItemIndex(choice.index, SearchSettings.from_meta(choice.meta))
    derived = []
    real_exact_topk = item_index.exact_topk
    monkeypatch.setattr(item_index, "exact_topk", lambda q, *a: derived.append(len(q)) or real_exact_topk(q, *a))

    without = check_recall(index, items, tmp_path)  # an engine built before the answers were stored
    assert derived == [len(choice.check_queries_QD)] and without[0] == choice.meta["recall_holdout"]
    np.save(tmp_path / ANN_EXACT_FILE, choice.check_exact_QK.astype(np.int32))
    derived.clear()
    assert check_recall(index, items, tmp_path) == without
    assert derived == [SPOT_QUERIES]
    others = np.roll(items, 1, axis=0)  # the same vectors, other rows: answers that are not these items'
    with pytest.raises(ValueError, match=f"{ANN_EXACT_FILE} does not match the engine's items"):
        check_recall(index, others, tmp_path)


def test_an_engine_built_before_the_method_choice_loads_as_hnsw(tmp_path):
    """Engines published before issue 20 have items.hnsw and an ann.json without "kind" (HNSW only)."""
    import faiss

    from contracts.engine_format.item_index import load_item_index
    from contracts.registry import LEGACY_ANN_FILE

    items, queries = _clustered(2000, 20, seed=4)
    index = faiss.IndexHNSWFlat(items.shape[1], 16, faiss.METRIC_INNER_PRODUCT)
    index.add(items)
    faiss.write_index(index, str(tmp_path / LEGACY_ANN_FILE))
    (tmp_path / ANN_META_FILE).write_text(json.dumps({"M": 16, "ef_construction": 128, "ef_search": 128, "k": 20,
                                                      "recall_at_k": 0.99}))
    loaded = load_item_index(tmp_path)
    assert loaded.settings == SearchSettings(kind="hnsw", ef_search=128)
    assert recall_at_k(loaded.search(queries, 20)[1], exact_topk(queries, items, 20)) >= 0.9


def test_every_searching_thread_uses_the_engines_thread_count():
    """OpenMP's thread count is per OS thread: set only where the index was loaded, the server's compute thread
    searched with every core and an OpenMP worker spun beside it (1M items, pq4: P99 18.7 -> 5.8 ms at 300 QPS)."""
    import threading

    import faiss

    def in_a_new_thread(fn):
        out = []
        t = threading.Thread(target=lambda: out.append(fn()))
        t.start()
        t.join()
        return out[0]

    default = in_a_new_thread(faiss.omp_get_max_threads)
    want = default + 1  # differs from the default on any machine
    items_ND = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    hnsw = faiss.IndexHNSWFlat(8, 8, faiss.METRIC_INNER_PRODUCT)
    hnsw.add(items_ND)
    index = ItemIndex(hnsw, SearchSettings(kind="hnsw", ef_search=16), num_threads=want)  # loaded here

    def search_then_threads():
        index.search(items_ND[:2], 5)
        return faiss.omp_get_max_threads()

    assert in_a_new_thread(search_then_threads) == want
