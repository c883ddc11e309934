"""Weak Pareto dominance: which rows of a cost table no other row is at least as good as in every column."""

from __future__ import annotations

import bisect

import numpy as np

__all__ = ["nondominated", "nondominated_within"]

_BLOCK_CELLS = 1 << 22  # comparisons held at once by the general (more than three columns) case


def nondominated(pts: np.ndarray) -> np.ndarray:
    """Ascending indices of the rows of `pts` [n, d] that no other row weakly dominates (of equal rows, the first).

    Row j weakly dominates row i when `pts[j] <= pts[i]` in every column. Rows are visited in lexicographic
    order, so only earlier rows can dominate a later one: with two columns that is a running minimum, with
    three a staircase of the earlier rows' last two columns, otherwise blocks of pairwise comparisons.
    """
    n, dims = pts.shape
    if n < 2:
        return np.arange(n)
    order = np.lexsort(pts.T[::-1])  # stable: equal rows stay in index order, so the first of them is kept
    p = pts[order]
    if dims == 1:
        keep = np.concatenate([[True], p[1:, 0] < p[0, 0]])
    elif dims == 2:
        prev_min = np.minimum.accumulate(np.concatenate([[np.inf], p[:-1, 1]]))
        keep = p[:, 1] < prev_min
    elif dims == 3:
        keep = np.zeros(n, dtype=bool)
        xs: list[float] = []  # staircase of kept rows: ascending in column 1, strictly descending in column 2
        ys: list[float] = []
        for i, (x, y) in enumerate(p[:, 1:].tolist()):
            k = bisect.bisect_right(xs, x)
            if k and ys[k - 1] <= y:
                continue  # an earlier row is no worse in every column
            keep[i] = True
            end = k
            while end < len(xs) and ys[end] >= y:
                end += 1
            xs[k:end] = [x]
            ys[k:end] = [y]
    else:
        keep = np.ones(n, dtype=bool)
        step = int(np.clip(_BLOCK_CELLS // (n * dims), 1, 512))
        for start in range(0, n, step):
            end = min(n, start + step)
            blk = p[start:end]
            dom = np.all(p[None, :end, :] <= blk[:, None, :], axis=2)  # [b, end]: row j <= row i everywhere
            dom &= np.arange(end)[None, :] < np.arange(start, end)[:, None]
            keep[start:end] = ~dom.any(axis=1)
    return np.sort(order[keep])


def nondominated_within(groups: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """[n] True where column i of `keys` [d, n] is kept by `nondominated` among the columns of its group."""
    keep = np.zeros(len(groups), dtype=bool)
    order = np.argsort(groups, kind="stable")  # stable: index order inside a group, so ties keep the first
    for seg in np.split(order, np.flatnonzero(np.diff(groups[order])) + 1):
        keep[seg[nondominated(keys[:, seg].T)]] = True
    return keep
