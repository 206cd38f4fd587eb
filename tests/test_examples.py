import numpy as np
import pytest

from trainer.examples import stack_windows, windows_for_new


def targets_learned(windows):
    out = []
    for _, tgt, mask in windows:
        out.extend(int(x) for x in tgt[mask])
    return out


def check_alignment(seq, windows, T):
    """Every window is a left-padded contiguous slice of seq; targets[t] is the item after inputs[t]."""
    pos = {item: i for i, item in enumerate(seq)}
    assert len(pos) == len(seq), "helper needs distinct items"
    for inp, tgt, mask in windows:
        assert inp.shape == tgt.shape == mask.shape == (T,)
        assert inp.dtype == np.int64 and tgt.dtype == np.int64 and mask.dtype == bool
        n = int((inp != 0).sum())
        assert n >= 1
        assert (inp[:T - n] == 0).all() and (tgt[:T - n] == 0).all() and not mask[:T - n].any()
        start = pos[int(inp[T - n])]
        assert list(inp[T - n:]) == seq[start:start + n]
        assert list(tgt[T - n:]) == seq[start + 1:start + n + 1]


def test_small_example_exact():
    seq = [11, 12, 13, 14, 15]
    (w,) = windows_for_new(seq, n_new=2, T=3)
    inp, tgt, mask = w
    assert inp.tolist() == [12, 13, 14]
    assert tgt.tolist() == [13, 14, 15]
    assert mask.tolist() == [False, True, True]


def test_left_padding_short_sequence():
    seq = [7, 8, 9]
    (w,) = windows_for_new(seq, n_new=3, T=5)
    inp, tgt, mask = w
    assert inp.tolist() == [0, 0, 0, 7, 8]
    assert tgt.tolist() == [0, 0, 0, 8, 9]
    assert mask.tolist() == [False, False, False, True, True]  # 7 (first item ever) is never a target


@pytest.mark.parametrize("L,n_new,T", [(1, 1, 4), (2, 1, 4), (2, 2, 4), (10, 3, 4), (10, 9, 4), (10, 10, 3),
                                       (10, 50, 3), (25, 24, 5), (25, 7, 1), (6, 6, 1), (13, 12, 12), (13, 12, 6)])
def test_every_new_item_is_target_exactly_once(L, n_new, T):
    seq = list(range(101, 101 + L))
    ws = windows_for_new(seq, n_new, T)
    expected = seq[max(L - n_new, 1):]  # the last n_new items, minus the very first item of the user
    assert sorted(targets_learned(ws)) == expected
    assert seq[0] not in targets_learned(ws)
    check_alignment(seq, ws, T)


def test_no_new_events_gives_no_windows():
    assert windows_for_new([1, 2, 3, 4], n_new=0, T=3) == []
    assert windows_for_new([], n_new=0, T=3) == []
    assert windows_for_new([5], n_new=1, T=3) == []  # a single first item has no history


def test_more_new_than_T_gives_several_windows():
    seq = list(range(1, 11))  # 10 items, all new
    ws = windows_for_new(seq, n_new=10, T=3)
    assert len(ws) == 3
    got = [(w[0].tolist(), w[1].tolist(), w[2].tolist()) for w in ws]
    assert got == [
        ([7, 8, 9], [8, 9, 10], [True, True, True]),
        ([4, 5, 6], [5, 6, 7], [True, True, True]),
        ([1, 2, 3], [2, 3, 4], [True, True, True]),
    ]


def test_windows_use_context_before_new_items():
    seq = [1, 2, 3, 4, 5, 6, 7, 8]
    ws = windows_for_new(seq, n_new=4, T=3)  # new: 5..8
    assert [(w[0].tolist(), w[1].tolist(), w[2].tolist()) for w in ws] == [
        ([5, 6, 7], [6, 7, 8], [True, True, True]),
        ([2, 3, 4], [3, 4, 5], [False, False, True]),
    ]


def test_T_equals_one():
    seq = [4, 5, 6, 7]
    ws = windows_for_new(seq, n_new=3, T=1)
    assert [(w[0].tolist(), w[1].tolist(), w[2].tolist()) for w in ws] == [
        ([6], [7], [True]), ([5], [6], [True]), ([4], [5], [True])]


def test_repeated_items_are_each_targets():
    seq = [3, 3, 3, 9, 3]
    ws = windows_for_new(seq, n_new=5, T=2)
    learned = targets_learned(ws)
    assert sorted(learned) == [3, 3, 3, 9]
    pairs = sorted((int(i), int(t)) for inp, tgt, m in ws for i, t in zip(inp[m], tgt[m]))
    assert pairs == sorted([(3, 3), (3, 3), (3, 9), (9, 3)])


def test_stack_windows():
    ws = windows_for_new([1, 2, 3, 4, 5], n_new=4, T=2)
    inp, tgt, mask = stack_windows(ws)
    assert inp.shape == tgt.shape == mask.shape == (2, 2)
    assert inp.tolist() == [[3, 4], [1, 2]]
    assert mask.dtype == bool
    e_inp, e_tgt, e_mask = stack_windows([])
    assert e_inp.shape == (0, 0) and e_mask.dtype == bool and e_tgt.dtype == np.int64
