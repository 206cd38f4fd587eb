"""Next-item training windows from per-user item sequences.

A window is (inputs_T, targets_T, mask_T): inputs left-padded with row 0, targets[t] = the item
after inputs[t], mask[t] = whether targets[t] is a new event to learn from. With the causal user
tower, the output at position t is exactly the user embedding the server would compute for the
history inputs[:t+1], so one forward pass trains T next-item examples.
"""

from __future__ import annotations

import numpy as np


def windows_for_new(seq: list[int], n_new: int, T: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Windows whose masked targets are exactly the last n_new items of seq (each once).

    seq holds the user's rows, oldest first: the context before the new events plus the n_new new
    ones. The first item of a user's life has no history and is never a target.
    """
    L = len(seq)
    first = max(L - n_new, 1)  # index of the first target to learn
    out = []
    end = L  # targets are seq[..end) in this window
    while end > first:
        a = max(0, end - 1 - T)
        inp = seq[a:end - 1]
        tgt = seq[a + 1:end]
        n = len(inp)
        inputs_T = np.zeros(T, np.int64)
        targets_T = np.zeros(T, np.int64)
        mask_T = np.zeros(T, bool)
        inputs_T[T - n:] = inp
        targets_T[T - n:] = tgt
        mask_T[T - n:] = np.arange(a + 1, end) >= first
        out.append((inputs_T, targets_T, mask_T))
        end = a + 1
    return out


def stack_windows(windows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]):
    """-> inputs_WT, targets_WT, mask_WT arrays."""
    if not windows:
        return (np.zeros((0, 0), np.int64),) * 2 + (np.zeros((0, 0), bool),)
    return tuple(np.stack(x) for x in zip(*windows))


def left_pad(rows: list[int], T: int) -> np.ndarray:
    """(T,) the newest T rows, right-aligned, zero (padding) on the left."""
    out = np.zeros(T, np.int64)
    rows = rows[-T:]
    if rows:
        out[T - len(rows):] = rows
    return out
