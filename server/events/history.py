"""Bounded per-user recent history: the newest `per_user` items of at most `max_users` users (LRU)."""

from __future__ import annotations

import threading
from collections import OrderedDict, deque


class RecentHistory:
    def __init__(self, *, max_users: int, per_user: int) -> None:
        if max_users < 1 or per_user < 1:
            raise ValueError(f"max_users and per_user must be >= 1, got {max_users}, {per_user}")
        self.max_users = max_users
        self.per_user = per_user
        self._users: OrderedDict[str, deque[str]] = OrderedDict()
        self._lock = threading.Lock()

    def append(self, user_id: str, item_id: str) -> None:
        with self._lock:
            items = self._users.get(user_id)
            if items is None:
                items = self._users[user_id] = deque(maxlen=self.per_user)
                if len(self._users) > self.max_users:
                    self._users.popitem(last=False)
            else:
                self._users.move_to_end(user_id)
            items.append(item_id)

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
