"""Channel counts: which counts a group may keep, ratios <-> counts, and the greedy top-ups
that bring a projected point back up to its target with integer channels."""
from __future__ import annotations

import numpy as np

PREFIX = "ratio/"  # the search space: one preserve ratio per prunable group
COUNT = "count/"   # exact counts off the tile grid, written by the projection only when the target needs them


def allowed_counts(size: int, multiple: int = 1, tile: int = 0) -> np.ndarray:
    """The channel counts a group of `size` may keep, ascending (always including `size`).

    Multiples of `multiple`; with a `tile`, counts above half a tile must also be multiples of
    the whole tile. XNNPACK computes a layer's output channels in register tiles: on this
    machine (AVX-512) 1-16 output channels cost the same, 17-31 cost more than 32, and 33-63 as
    much as 64 (docs/benchmarks/channel_pruning.md), so 45 of 64 channels save nothing in the
    layer that produces them. Counts up to half a tile stay fine-grained: there the producer's
    cost is flat and the readers' cost falls with every channel.
    """
    c = np.arange(1, size + 1)
    ok = c % max(1, multiple) == 0
    if tile > 1:
        ok &= (c <= tile // 2) | (c % tile == 0)
    ok[-1] = True
    if not ok[:-1].any() and size > 1:  # e.g. multiple > size: allow the smallest step
        ok[min(size, max(1, multiple)) - 1] = True
    return c[ok]


def channels(ratio: float, size: int, multiple: int = 1, tile: int = 0) -> int:
    """Channels kept of `size` at preserve `ratio`: the nearest allowed count (ties: the larger)."""
    if ratio >= 1:
        return size
    ok = allowed_counts(size, multiple, tile)
    want = max(0.0, ratio) * size
    return int(ok[np.argmin(np.abs(ok - want) - 1e-9 * ok)])


def next_count(count: int, size: int, multiple: int, tile: int) -> int | None:
    """The next allowed count above `count`, or None at the full width."""
    ok = allowed_counts(size, multiple, tile)
    above = ok[ok > count]
    return int(above[0]) if len(above) else None


def to_params(g, params: dict, counts: dict, m: int, t: int) -> dict:
    """`params` holding `counts`: a `ratio/` entry per prunable group, and an exact `count/` entry
    only for a count its ratio does not give back (one off the grid). Earlier `count/` entries
    go: a stale one would override the count written here."""
    out = {k: v for k, v in params.items() if not k.startswith(COUNT)}
    for gr in g.prunable:
        k = int(counts[gr.id])
        out[PREFIX + gr.name] = k / gr.size
        if channels(k / gr.size, gr.size, m, t) != k:
            out[COUNT + gr.name] = k
    return out


def top_k(scores: np.ndarray, k: int, tie: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of the `k` largest scores (ties broken by `tie`, then by index)."""
    tie = np.zeros_like(scores) if tie is None else tie
    order = np.lexsort((np.arange(len(scores)), -tie, -scores))
    return np.sort(order[:k])


def greedy(g, counts: dict, cost, base, ratio: float, m: int, t: int) -> dict:
    """Add the allowed channel step that keeps the most cost while base / cost >= ratio, until none does."""
    while True:
        best = None
        for gr in g.prunable:
            nxt = next_count(counts[gr.id], gr.size, m, t)
            if nxt is not None:
                trial = {**counts, gr.id: nxt}
                c = cost(trial)
                if c * ratio <= base and (best is None or c > best[0]):
                    best = (c, trial)
        if best is None:
            return counts
        counts = best[1]


def top_up(g, params: dict, counts: dict, cost, base, ratio: float, m: int, t: int, tol: float = 0.01) -> dict:
    """`params` with the counts grown greedily on the tile grid; if tile-sized steps cannot get
    within `tol` of the target, finished with single steps of `m` (a few groups then leave the
    tile grid and get exact `count/` entries; the target comes first). That fallback is for grids
    too coarse for the target (all groups wide, e.g. VGG-small); the latency-aware exchange hands
    over points already within `tol` on the grid, so it never leads here."""
    counts = greedy(g, counts, cost, base, ratio, m, t)
    if t and base / max(1, cost(counts)) > ratio * (1 + tol):
        counts = greedy(g, counts, cost, base, ratio, m, 0)
    return to_params(g, params, counts, m, t)


def top_up_latency(g, params: dict, counts: dict, speedup, ratio: float, m: int, t: int, budget: int = 16) -> dict:
    """Channel counts jump (tiles), so the measured latency along `scale` jumps too and the
    bisection can stop well past the target. Add channels back, one allowed step of one group
    at a time, largest MACs gain first, while the measured `speedup(counts)` still meets the
    target; at most `budget` extra measurements (each is a TFLite conversion)."""
    tried: set = set()
    while len(tried) < budget:
        cands = []
        for gr in g.prunable:
            nxt = next_count(counts[gr.id], gr.size, m, t)
            if nxt is not None:
                trial = {**counts, gr.id: nxt}
                key = tuple(sorted(trial.items()))
                if key not in tried:
                    cands.append((g.macs(trial), key, trial))
        if not cands:
            break
        for _, key, trial in sorted(cands, key=lambda c: -c[0]):
            if len(tried) >= budget:
                break
            tried.add(key)
            if speedup(trial) >= ratio:
                counts = trial
                break
        else:
            break
    return to_params(g, params, counts, m, t)
