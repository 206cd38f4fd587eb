"""Shared, append-only item vocabularies: engines of one lineage share one id -> row dict."""

from __future__ import annotations

import json

import pytest

from server.engine.vocabulary import VocabularyPool


def raw(ids: list[str]) -> bytes:
    return json.dumps(ids).encode()  # as trainer/export/build.py writes item_ids.json


def test_an_extended_id_list_shares_the_vocabulary_and_parses_only_new_ids():
    pool = VocabularyPool()
    v1, n1 = pool.vocabulary_for(raw(["a", "b", "c"]))
    v2, n2 = pool.vocabulary_for(raw(["a", "b", "c", "d", "e"]))
    assert v2 is v1 and (n1, n2) == (3, 5)
    assert v1.ids == ["a", "b", "c", "d", "e"] and v1.row_of == {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}
    again, n = pool.vocabulary_for(raw(["a", "b", "c"]))  # an older engine (a rollback): same vocabulary
    assert again is v1 and n == 3
    same, n = pool.vocabulary_for(raw(["a", "b", "c", "d", "e"]))
    assert same is v1 and n == 5


def test_another_lineage_gets_its_own_vocabulary():
    pool = VocabularyPool()
    v1, _ = pool.vocabulary_for(raw(["a", "b"]))
    for other in (["ab"], ["b", "a"], ["a", "bb"], ["x"]):  # byte prefixes that are not list prefixes too
        v, n = pool.vocabulary_for(raw(other))
        assert v is not v1 and v.ids == other and n == len(other)
    assert v1.ids == ["a", "b"]


def test_an_unseen_older_list_is_built_afresh_not_miscounted():
    pool = VocabularyPool()
    v, _ = pool.vocabulary_for(raw(["a", "b", "c"]))
    older, n = pool.vocabulary_for(raw(["a", "b"]))  # a prefix never loaded in this process
    assert n == 2 and older.ids[:2] == ["a", "b"]


def test_duplicate_ids_are_refused():
    with pytest.raises(ValueError, match="twice"):
        VocabularyPool().vocabulary_for(raw(["a", "b", "a"]))
    pool = VocabularyPool()
    v, _ = pool.vocabulary_for(raw(["a", "b"]))
    with pytest.raises(ValueError, match="twice"):
        pool.vocabulary_for(raw(["a", "b", "c", "a"]))
    assert v.ids == ["a", "b"] and set(v.row_of) == {"a", "b"}  # unchanged: all or nothing
    assert pool.vocabulary_for(raw(["a", "b", "c"])) == (v, 3)


def test_not_a_list_is_refused():
    with pytest.raises(ValueError, match="JSON list"):
        VocabularyPool().vocabulary_for(b'{"a": 1}')


def test_an_engine_sees_only_its_own_items_of_a_shared_vocabulary():
    from server.engine.engine import _ItemIds, _Rows

    pool = VocabularyPool()
    v, n_old = pool.vocabulary_for(raw(["a", "b"]))
    pool.vocabulary_for(raw(["a", "b", "c"]))  # a newer engine extends it
    rows, ids = _Rows(v.row_of, v.ids, n_old), _ItemIds(v.ids, n_old)
    assert rows.get("b") == 2 and rows.get("c") is None and "c" not in rows and len(rows) == 2
    with pytest.raises(KeyError):
        rows["c"]
    assert list(ids) == ["a", "b"] and ids[-1] == "b" and ids[:5] == ["a", "b"] and list(rows) == ["a", "b"]
    with pytest.raises(IndexError):
        ids[2]
