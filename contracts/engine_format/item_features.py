"""Item features as the engine format defines them: which features an engine's item encoder reads
(FeatureConfig) and how catalogue records become its integer inputs (featurize). Shared by the trainer, which
trains and exports the encoder, and the server, which encodes upserted items with it: the same record must hash
to the same rows in both (trainer/features.py has the design).

Every categorical (name, value) pair and every text token is hashed with BLAKE2b (stable across processes,
unlike Python's salted hash()) into a fixed vocabulary; row 0 is padding. N items, C categorical slots, W text
tokens, F numeric features.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from contracts.catalog import CatalogRecord

PAD_BUCKET = 0  # bucket 0 of each hashed vocabulary is padding (zero vector, no gradient)
_WORD_RE = re.compile(r"[0-9a-z]+")


@dataclass(kw_only=True, frozen=True, slots=True)
class FeatureConfig:
    """The item feature encoder's shape and the hashing that feeds it."""

    dim: int = 64                    # D: output size = the tower's dim (ModelConfig.dim)
    cat_buckets: int = 1 << 14       # rows of the hashed (feature name, value) vocabulary (16,384; row 0 padding):
                                     # ~1 MiB at D=64; the ml-100k genres need 19, a shop's brands many thousand
    text_buckets: int = 1 << 15      # rows of the hashed (feature name, token) vocabulary (32,768; row 0 padding)
    max_cat_values: int = 32         # C: categorical values kept per item (all categorical features together)
    max_text_tokens: int = 96        # W: text tokens kept per item (words first, then char n-grams)
    char_ngram: int = 3              # n of the char n-grams over each word (0 = words only)
    numeric: tuple[str, ...] = ()    # the numeric features used, in column order (F = len); others are ignored
    id_dropout: float = 0.5          # training: drop an occurrence's id embedding with this probability

    def __post_init__(self) -> None:
        for name in ("dim", "max_cat_values", "max_text_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"FeatureConfig.{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("cat_buckets", "text_buckets"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 2:
                raise ValueError(f"FeatureConfig.{name} must be an int >= 2 (row 0 is padding), "
                                 f"got {getattr(self, name)!r}")
        if not isinstance(self.char_ngram, int) or self.char_ngram < 0:
            raise ValueError(f"FeatureConfig.char_ngram must be an int >= 0, got {self.char_ngram!r}")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"FeatureConfig.id_dropout must be in [0, 1), got {self.id_dropout}")
        if len(set(self.numeric)) != len(self.numeric):
            raise ValueError(f"FeatureConfig.numeric has duplicates: {self.numeric}")


# ---- 1. records -> tensors ----

def bucket(key: str, n_buckets: int) -> int:
    """A stable hash of key into 1..n_buckets - 1 (0 is padding)."""
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")
    return 1 + h % (n_buckets - 1)


def text_tokens(text: str, char_ngram: int) -> list[str]:
    """Lower-cased words, then the char n-grams of each "#word#" (words shorter than n give none)."""
    words = _WORD_RE.findall(text.lower())
    grams = [f"#{w}#"[i:i + char_ngram] for w in words for i in range(len(w) + 3 - char_ngram)] \
        if char_ngram else []
    return [f"w:{w}" for w in words] + [f"c:{g}" for g in grams]


class FeatureTensors(NamedTuple):
    """Hashed features of N items (row i = item i; padding where absent)."""
    cat_NC: Tensor       # int64 categorical buckets, PAD_BUCKET-padded
    text_NW: Tensor      # int64 text-token buckets, PAD_BUCKET-padded
    num_NF: Tensor       # float32 raw numeric values (0 where absent)
    present_NF: Tensor   # float32 1 where the numeric feature is present, else 0

    def index(self, rows_N: Tensor) -> FeatureTensors:
        return FeatureTensors(*(t[rows_N] for t in self))


def featurize(records: Sequence[CatalogRecord | None], cfg: FeatureConfig) -> FeatureTensors:
    """records[i] -> row i of each tensor; None (e.g. the pad row) -> an all-padding row."""
    N, C, W, Fn = len(records), cfg.max_cat_values, cfg.max_text_tokens, len(cfg.numeric)
    cat_NC = torch.zeros(N, C, dtype=torch.int64)
    text_NW = torch.zeros(N, W, dtype=torch.int64)
    num_NF = torch.zeros(N, Fn)
    present_NF = torch.zeros(N, Fn)
    for i, r in enumerate(records):
        if r is None:
            continue
        cats = [bucket(f"{name}\x1f{v}", cfg.cat_buckets) for name, vals in sorted(r.categorical.items())
                for v in vals][:C]
        cat_NC[i, :len(cats)] = torch.tensor(cats, dtype=torch.int64)
        words, grams = [], []
        for name, text in sorted(r.text.items()):
            for t in text_tokens(text, cfg.char_ngram):
                (words if t.startswith("w:") else grams).append(bucket(f"{name}\x1f{t}", cfg.text_buckets))
        toks = (words + grams)[:W]
        text_NW[i, :len(toks)] = torch.tensor(toks, dtype=torch.int64)
        for j, name in enumerate(cfg.numeric):
            if name in r.numeric:
                num_NF[i, j], present_NF[i, j] = r.numeric[name], 1.0
    return FeatureTensors(cat_NC, text_NW, num_NF, present_NF)


def feature_config_json(cfg: FeatureConfig) -> dict:
    return {**asdict(cfg), "numeric": list(cfg.numeric)}


def feature_config_from_json(d: dict) -> FeatureConfig:
    return FeatureConfig(**{**d, "numeric": tuple(d.get("numeric", ()))})
