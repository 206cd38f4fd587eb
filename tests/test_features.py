"""The item feature encoder and the feature item tower (trainer/features.py), and the cold-start study at its
debug size (trainer/studies/coldstart.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from contracts.catalog import CatalogRecord
from contracts.engine_format.item_features import FeatureConfig, bucket, featurize, text_tokens
from trainer.features import FeatureTwoTower, FeatureEncoder, combine_item_embedding
from trainer.loss import sampled_softmax_loss
from trainer.model_config import ModelConfig

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"
CFG = FeatureConfig(dim=32, cat_buckets=256, text_buckets=1024, max_cat_values=4, max_text_tokens=8,
                    numeric=("year", "price"))
RECORDS = [None,
           CatalogRecord(id="a", categorical={"genre": ["Comedy", "Drama"]}, numeric={"year": 1995},
                         text={"title": "Toy Story"}),
           CatalogRecord(id="b", categorical={"genre": "Horror"}, numeric={"year": 1980, "price": 3.5}),
           CatalogRecord(id="c", text={"title": "A very long title with many many words in it"}),
           CatalogRecord(id="d")]


def test_hashing_is_stable_and_tokens_are_words_then_ngrams():
    # Fixed values: a server hashing upserted items must get the rows training used (never change these).
    assert bucket("genre\x1fComedy", 1 << 14) == 2663 and bucket("title\x1fw:toy", 1 << 15) == 1008
    assert all(1 <= bucket(str(i), 7) <= 6 for i in range(200))
    assert text_tokens("Toy (1995)", 3) == ["w:toy", "w:1995", "c:#to", "c:toy", "c:oy#", "c:#19", "c:199",
                                            "c:995", "c:95#"]
    assert text_tokens("Go!", 0) == ["w:go"] and text_tokens("a", 4) == ["w:a"]


def test_featurize_shapes_padding_and_truncation():
    ft = featurize(RECORDS, CFG)
    assert ft.cat_NC.shape == (5, 4) and ft.text_NW.shape == (5, 8) and ft.num_NF.shape == (5, 2)
    assert ft.cat_NC.dtype == torch.int64 and ft.num_NF.dtype == torch.float32
    assert (ft.cat_NC[0] == 0).all() and (ft.text_NW[0] == 0).all() and (ft.present_NF[0] == 0).all()
    assert (ft.cat_NC[1] > 0).sum() == 2 and (ft.cat_NC[2] > 0).sum() == 1 and (ft.cat_NC[3] == 0).all()
    assert (ft.text_NW[3] > 0).all()  # truncated to W = 8 (10 words, plus n-grams)
    assert ft.text_NW[3].tolist() == [bucket(f"title\x1fw:{w}", 1024) for w in
                                      ("a", "very", "long", "title", "with", "many", "many", "words")]
    assert ft.present_NF.tolist()[1:3] == [[1.0, 0.0], [1.0, 1.0]] and ft.num_NF[2].tolist() == [1980.0, 3.5]
    again = featurize(RECORDS, CFG)
    assert all(torch.equal(x, y) for x, y in zip(ft, again))


def test_encoder_shapes_standardisation_and_export():
    torch.manual_seed(0)
    enc = FeatureEncoder(CFG).eval()
    ft = featurize(RECORDS, CFG)
    enc.fit_numeric(ft.num_NF, ft.present_NF)
    assert enc.num_mean_F.tolist() == pytest.approx([1987.5, 3.5]) and enc.num_std_F.tolist() == [7.5, 1.0]
    out = enc(*ft)
    assert out.shape == (5, 32) and torch.isfinite(out).all()
    # an all-padding row (no features) gets the bias-only vector, like item "d"
    assert torch.allclose(out[0], out[4])
    ep = torch.export.export(enc, tuple(ft))  # no data-dependent control flow: exportable as is
    assert torch.allclose(ep.module()(*ft), out, atol=1e-6)


def _tower(has_id: list[float], id_dropout: float = 0.0, seed: int = 0) -> FeatureTwoTower:
    mcfg = ModelConfig.tiny_debug()
    fcfg = FeatureConfig(dim=mcfg.dim, cat_buckets=256, text_buckets=1024, numeric=("year",), id_dropout=id_dropout)
    torch.manual_seed(seed)
    return FeatureTwoTower(mcfg, 5, fcfg, featurize(RECORDS, fcfg), torch.tensor(has_id))


def test_feature_only_vs_id_plus_features():
    m = _tower([0.0, 1.0, 1.0, 0.0, 0.0]).eval()
    rows = torch.arange(1, 5)
    feat_ND = m.features(*m.row_features(rows))
    id_ND = m.item_embedding(rows)
    got = m.encode_items(rows)
    assert torch.allclose(got[[2, 3]], F.normalize(feat_ND[[2, 3]], dim=-1), atol=1e-6)  # rows 3, 4: feature-only
    assert torch.allclose(got[[0, 1]], F.normalize(id_ND[[0, 1]] + feat_ND[[0, 1]], dim=-1), atol=1e-6)
    assert torch.equal(combine_item_embedding(id_ND, torch.zeros(4, 1), feat_ND), feat_ND)
    assert (m.encode_items(torch.tensor([0])) == 0).all()  # the pad row
    with torch.no_grad():  # changing an id row moves only the items that have one
        m.item_embedding.weight[1:5] += 1.0
    after = m.encode_items(rows)
    assert torch.allclose(after[[2, 3]], got[[2, 3]]) and not torch.allclose(after[[0, 1]], got[[0, 1]])


def test_determinism_and_id_dropout_only_in_training():
    a, b = _tower([0, 1, 1, 1, 1], id_dropout=0.5), _tower([0, 1, 1, 1, 1], id_dropout=0.5)
    rows = torch.tensor([1, 2, 3, 4, 1, 1, 2])
    a.eval(), b.eval()
    assert torch.equal(a.encode_items(rows), b.encode_items(rows))
    assert torch.equal(a.encode_items(rows), a.encode_items(rows))
    a.train()
    torch.manual_seed(1)
    outs = torch.stack([a.encode_items(rows) for _ in range(20)])
    assert not torch.allclose(outs[0], outs[1:].mean(0))  # some occurrences lost their id part
    c = _tower([0, 1, 1, 1, 1], id_dropout=0.0)
    c.train()  # the training path (unique rows) equals the eval path without dropout
    train_out = c.encode_items(rows)
    c.eval()
    assert torch.allclose(train_out, c.encode_items(rows), atol=1e-6)


def test_gradients_reach_the_encoder_through_the_training_loss():
    m = _tower([0, 1, 1, 0, 0]).train()
    hist = torch.tensor([[0, 1, 2], [1, 2, 1]])
    user_MD = m.user_states(hist)[:, -1]
    loss = sampled_softmax_loss(m, user_MD, torch.tensor([3, 4]), item_prob_R=torch.full((5,), 0.25), n_items=4,
                                n_random=3, temperature=0.1, generator=torch.Generator().manual_seed(0),
                                in_batch=False, logq=False)
    loss.backward()
    assert m.features.text_bag.weight.grad.abs().sum() > 0 and m.features.mlp_in.weight.grad.abs().sum() > 0
    assert m.item_embedding.weight.grad[[1, 2]].abs().sum() > 0  # history rows


def test_study_rejects_bad_config():
    from trainer.studies.coldstart import ColdStartConfig

    with pytest.raises(ValueError, match="holdout_frac"):
        ColdStartConfig(holdout_frac=1.0)
    with pytest.raises(ValueError, match="features.dim"):
        ColdStartConfig(features=FeatureConfig(dim=8))


@pytest.mark.skipif(not (ML100K / "u.data").is_file(), reason="ml-100k not in ../shared/data")
def test_coldstart_study_debug_size(tmp_path, capsys):
    """The whole study at its debug size (120 users, tiny tower, 2 epochs): splits, both trainings, every scorer."""
    from trainer.studies.coldstart import main

    out = tmp_path / "r.json"
    assert main(["--debug", "--data", str(ML100K), "--out", str(out)]) == 0
    import json

    r = json.loads(out.read_text())
    s = r["cold"]["split"]
    assert s["items"] == 1682 and s["held_out_items"] == 336 and s["warm_items"] == 1346
    assert 0 < s["cold_targets"] <= s["held_out_events"]
    cold = r["cold"]["cold_targets"]
    assert set(cold) == {"feature_model", "feature_model_all_items_feature_only", "id_only_model",
                         "popularity_in_top_genre", "top_genre_only", "popularity"}
    assert all(0.0 <= v <= 1.0 for m in cold.values() for v in m.values())
    assert cold["popularity"]["recall@20"] == 0.0  # held-out items have no training count: always last
    for part in ("cold", "warm"):
        for log in r[part]["train"].values():
            assert log["epochs_run"] == 2 and log["epoch_loss"][1] < log["epoch_loss"][0]
    assert set(r["warm"]["metrics"]) == {"id_only_model", "feature_model", "popularity"}
    assert "cold: " in capsys.readouterr().out
