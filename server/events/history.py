"""Bounded per-user recent history: the newest `per_user` items of the most recently active users, at most
`max_users` of them and at most `max_bytes` in all (estimated), least recently active evicted first.

The byte estimate counts what CPython holds per user and per item (the id strings, the deque, the dict
slot); it errs high, so the real heap stays below `max_bytes` (tests/test_bounded_state.py checks it with
tracemalloc). Without it, a count bound alone lets 100k users x 50 ids of 256 characters take ~1.6 GB.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict, deque

DEFAULT_MAX_BYTES = 256 << 20
# Per user besides its id string: the OrderedDict slot and link node, the deque with its first block.
# Per item besides its id string: the deque slot (later blocks amortised into it).
USER_OVERHEAD_BYTES = 900
ITEM_OVERHEAD_BYTES = 16


def _str_bytes(s: str) -> int:
    return sys.getsizeof(s)


class RecentHistory:
    def __init__(self, *, max_users: int, per_user: int, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        """max_bytes: the estimated total (ids + per-user and per-item overheads) the histories may hold."""
        if max_users < 1 or per_user < 1:
            raise ValueError(f"max_users and per_user must be >= 1, got {max_users}, {per_user}")
        if max_bytes < USER_OVERHEAD_BYTES:
            raise ValueError(f"max_bytes must be >= {USER_OVERHEAD_BYTES} (one user), got {max_bytes}")
        self.max_users = max_users
        self.per_user = per_user
        self.max_bytes = max_bytes
        self._users: OrderedDict[str, deque[str]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        """The estimated bytes held now (<= max_bytes after every append)."""
        return self._bytes

    def append(self, user_id: str, item_id: str) -> None:
        cost = _str_bytes(item_id) + ITEM_OVERHEAD_BYTES
        with self._lock:
            items = self._users.get(user_id)
            if items is None:
                items = self._users[user_id] = deque(maxlen=self.per_user)
                self._bytes += USER_OVERHEAD_BYTES + _str_bytes(user_id)
            else:
                self._users.move_to_end(user_id)
            if len(items) == self.per_user:
                self._bytes -= _str_bytes(items[0]) + ITEM_OVERHEAD_BYTES
            items.append(item_id)
            self._bytes += cost
            # Least recently active first; the user just appended to is the newest, so it goes last of all.
            while len(self._users) > self.max_users or (self._bytes > self.max_bytes and len(self._users) > 1):
                self._evict_oldest()
            while self._bytes > self.max_bytes and len(items) > 1:  # one user alone over the budget
                self._bytes -= _str_bytes(items.popleft()) + ITEM_OVERHEAD_BYTES

    def _evict_oldest(self) -> None:
        user_id, items = self._users.popitem(last=False)
        self._bytes -= USER_OVERHEAD_BYTES + _str_bytes(user_id) + sum(_str_bytes(i) for i in items) \
            + ITEM_OVERHEAD_BYTES * len(items)

    def get(self, user_id: str) -> list[str]:
        """The user's recent items, newest last ([] when unknown)."""
        with self._lock:
            items = self._users.get(user_id)
            return list(items) if items is not None else []

    def __len__(self) -> int:
        return len(self._users)

    def sample(self, n: int) -> list[list[str]]:
        """Histories of up to n most recently active users (for shadow scoring)."""
        with self._lock:
            users = list(self._users.values())[-n:]
            return [list(items) for items in users]
