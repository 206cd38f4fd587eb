"""The online item-id vocabulary: id -> embedding row. Row 0 is padding; rows only ever get added."""

from __future__ import annotations

from typing import Iterable

MIN_TABLE_ROWS = 1024


def table_rows_for(num_items: int) -> int:
    """Embedding-table capacity for num_items: the next power of two above num_items + 1 (pad row).

    Capacity changes rarely, so consecutive engines keep the same architecture hash (same graph
    shapes) until the catalogue doubles.
    """
    need = num_items + 1
    rows = MIN_TABLE_ROWS
    while rows < need:
        rows *= 2
    return rows


class ItemVocab:
    def __init__(self, ids: Iterable[str] = ()) -> None:
        self.ids: list[str] = []             # row r <-> ids[r - 1]
        self.row_of: dict[str, int] = {}
        for i in ids:
            self.add(i)

    def add(self, item_id: str) -> int:
        row = self.row_of.get(item_id)
        if row is None:
            self.ids.append(item_id)
            row = self.row_of[item_id] = len(self.ids)
        return row

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_rows(self) -> int:
        """Rows in use including the pad row."""
        return len(self.ids) + 1
