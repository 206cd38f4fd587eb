"""Item id -> row vocabularies, shared by the engines of one lineage in a process.

The trainer's vocabulary only grows: a new engine's `item_ids.json` is its parent's with new ids
appended. Building the id -> row dict afresh for every engine costs a 100k-item catalogue ~80 ms of
Python and a 1M-item one about a second, all of it competing with the event loop for the GIL during
a swap. So engines share one append-only Vocabulary: each engine knows its own item count `n` and
treats rows beyond it as unknown, and a new engine whose id list extends a live vocabulary's (checked
on the file's bytes, so sharing is exact) parses and inserts only the new ids.

Readers (request threads) and the one writer (the loading thread, under the manager's lock) need no
lock: list.append and dict item assignment are atomic, and readers never look beyond their `n`.
"""

from __future__ import annotations

import json
import threading
import weakref


class Vocabulary:
    """Append-only: ids[row - 1] is the id of row `row` (row 0 is padding); row_of is the inverse."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.row_of: dict[str, int] = {}
        self.body = b"["  # the JSON text of `ids` without its closing bracket
        self._count_at: dict[int, int] = {1: 0}  # len(body) of each id list seen -> its id count

    def extend(self, body: bytes, new_ids: list[str]) -> None:
        """Append new_ids (the id list is now `body`); all or nothing."""
        if len(set(new_ids)) != len(new_ids) or any(item in self.row_of for item in new_ids):
            dup = next(x for i, x in enumerate(new_ids) if x in self.row_of or x in new_ids[:i])
            raise ValueError(f"item id {dup!r} appears twice in the engine's item_ids")
        for i, item in enumerate(new_ids, start=len(self.ids) + 1):
            self.row_of[item] = i
            self.ids.append(item)  # after its row: a reader bounded by an older n never sees it
        self.body = body
        self._count_at[len(body)] = len(self.ids)

    def count_for(self, body: bytes) -> int | None:
        """Ids in the list `body` (a prefix of this vocabulary's) if that list was seen, else None."""
        return self._count_at.get(len(body))


def _body(raw: bytes) -> bytes:
    text = raw.strip()
    if not (text.startswith(b"[") and text.endswith(b"]")):
        raise ValueError("item_ids is not a JSON list")
    return text[:-1].rstrip()


def _extends(longer: bytes, shorter: bytes) -> bool:
    """Does the JSON list body `longer` hold every element of `shorter` first (or equal it)?"""
    if not longer.startswith(shorter):
        return False
    rest = longer[len(shorter):].lstrip()
    return shorter == b"[" or not rest or rest.startswith(b",")


class VocabularyPool:
    """The live vocabularies of this process (weakly held: one goes with the last engine using it)."""

    def __init__(self) -> None:
        self._live: weakref.WeakSet[Vocabulary] = weakref.WeakSet()
        self._lock = threading.Lock()

    def vocabulary_for(self, raw: bytes) -> tuple[Vocabulary, int]:
        """A vocabulary whose first n ids are the JSON id list `raw`, and that n."""
        body = _body(raw)
        with self._lock:
            for vocab in list(self._live):
                if _extends(vocab.body, body):  # the same or an older list of this lineage
                    n = vocab.count_for(body)
                    if n is not None:
                        return vocab, n
                elif _extends(body, vocab.body):  # extends it: parse and add only the new ids
                    tail = body[len(vocab.body):].lstrip().removeprefix(b",")
                    vocab.extend(body, json.loads(b"[" + tail + b"]"))
                    return vocab, len(vocab.ids)
            vocab = Vocabulary()
            vocab.extend(body, json.loads(raw))
            self._live.add(vocab)
            return vocab, len(vocab.ids)


VOCABULARIES = VocabularyPool()  # process-wide on purpose, like the compiled graphs: engines share memory
