"""The latency-aware exchange: re-round a projected point so a per-layer latency table
predicts less time per MAC kept, at the same FLOPs or params target.

Pruning a channel saves the same MACs wherever it is, but not the same time: below XNNPACK's
output tile a producer costs the same at 12 channels as at 16, a 28x28 layer costs more per MAC
than a 7x7 one, while readers' cost falls with every input channel. Each group may take any
allowed count within `width` (in preserve ratio) of its ratio on the projection's line
(`region`), never below the ratio_range floor. Local search (`Exchange.search`): set one group
to another count, then restore the target greedily (`Exchange.repair`: most predicted latency
per MAC removed first, or least added back), score by predicted latency / MACs kept (the
latency-to-FLOPs speedup ratio), keep the best while it improves by 0.2%.

Every candidate is on the tile grid and within the projection's tolerance of the target, so
the projection's top-up after the exchange never needs its off-grid fallback: which point the
measured table prefers decides where the channels go, never whether they leave the grid.
"""
from __future__ import annotations

import numpy as np

from pocketflow.learners.channel_pruning.counts import PREFIX, allowed_counts


def region(groups, center: dict, m: int, t: int, width: float, lo: float, max_counts: int = 9) -> dict:
    """Group id -> the allowed counts the exchange may give it, ascending."""
    out = {}
    for gr in groups:
        ok = allowed_counts(gr.size, m, t)
        r = min(1.0, float(center.get(PREFIX + gr.name, 1.0)))
        ok = ok[ok >= min(lo * gr.size - 1e-9, ok[-1])]
        inside = (ok >= (r - width) * gr.size - 1e-9) & (ok <= (r + width) * gr.size + 1e-9)
        above, below = np.flatnonzero(ok >= r * gr.size - 1e-9), np.flatnonzero(ok <= r * gr.size + 1e-9)
        for i in (above[:1], below[-1:]):  # the grid neighbours of r are always in
            inside[i] = True
        reg = ok[inside]
        if len(reg) > max_counts:  # fine grids (channel_tile 0): evenly spread counts, neighbours kept
            keep = set(np.linspace(0, len(reg) - 1, max_counts).round().astype(int).tolist())
            keep |= {int(i) for i in np.flatnonzero(np.isin(reg, ok[np.concatenate([above[:1], below[-1:]])]))}
            reg = reg[sorted(keep)]
        out[gr.id] = reg
    return out


class Exchange:
    """The search over `region` at one target: `base / cost(counts) >= ratio` must hold, and a
    candidate counts only within `tol` of it (`ratio * (1 + tol)`, the projection's tolerance).
    `grid` (group id -> every allowed count, ascending) holds the steps that may finish a repair
    the region's steps cannot: without them a candidate could rest up to a few % past the target."""

    def __init__(self, groups, region: dict, cost, base: float, ratio: float, table, grid: dict,
                 tol: float = 0.01):
        self.groups, self.region, self._raw, self.base, self.ratio = groups, region, cost, base, ratio
        self.table, self.grid, self.tol, self._memo = table, grid, tol, {}

    def cost(self, c: dict) -> float:
        key = tuple(c.items())  # candidates keep the group order (an equal dict in another order only misses)
        if key not in self._memo:
            self._memo[key] = self._raw(c)
        return self._memo[key]

    def meets(self, c: dict) -> bool:
        return self.cost(c) * self.ratio <= self.base

    def score(self, c: dict) -> float:
        """Predicted latency per MAC (or param) kept: lower is better."""
        return self.table.cost(c) * self.base / max(1, self.cost(c))

    def close(self, c: dict) -> bool:
        """Meets the target and is within `tol` of it."""
        return self.meets(c) and self.base / max(1, self.cost(c)) <= self.ratio * (1 + self.tol)

    def step(self, c: dict, gid: int, d: int, counts: dict | None = None) -> int | None:
        """The count `d` steps of `counts` (default: the region) from group `gid`'s current one,
        or None past either end."""
        reg = (self.region if counts is None else counts)[gid]
        i = int(np.searchsorted(reg, c[gid])) + d
        return int(reg[i]) if 0 <= i < len(reg) and reg[i] != c[gid] else None

    def _down(self, c: dict, fixed) -> dict | None:
        """Steps down, most predicted latency per cost removed first, until the target holds."""
        t = self.table
        while not self.meets(c):
            best = None
            for gr in self.groups:
                down = None if gr.id == fixed else self.step(c, gr.id, -1)
                if down is not None:
                    trial = {**c, gr.id: down}
                    gain = (t.cost(c) - t.cost(trial)) / max(1, self.cost(c) - self.cost(trial))
                    if best is None or gain > best[0]:
                        best = (gain, trial)
            if best is None:
                return None
            c = best[1]
        return c

    def _up(self, c: dict, fixed, counts: dict | None = None) -> dict:
        """Steps up (of `counts`, default the region), least predicted latency per cost added
        first, while the target still holds, until within `tol` of it."""
        t = self.table
        while self.base / max(1, self.cost(c)) > self.ratio * (1 + self.tol):
            best = None
            for gr in self.groups:
                up = None if gr.id == fixed else self.step(c, gr.id, +1, counts)
                if up is not None:
                    trial = {**c, gr.id: up}
                    if self.meets(trial):
                        price = (t.cost(trial) - t.cost(c)) / max(1, self.cost(trial) - self.cost(c))
                        if best is None or price < best[0]:
                            best = (price, trial)
            if best is None:
                break
            c = best[1]
        return c

    def repair(self, c: dict, fixed) -> dict | None:
        """`c` brought back to the target without moving group `fixed`, or None if it cannot be."""
        c = self._down(c, fixed)
        if c is None:
            return None
        c = self._up(c, fixed)
        if not self.close(c):  # the region's steps stop short: finish on the whole grid
            c = self._up(c, fixed, self.grid)
        return c if self.close(c) else None

    def _best_move(self, counts: dict):
        best = None
        for gr in self.groups:
            for k in self.region[gr.id]:
                if k == counts[gr.id]:
                    continue
                trial = self.repair({**counts, gr.id: int(k)}, gr.id)
                if trial is not None:
                    sc = self.score(trial)
                    if best is None or sc < best[0]:
                        best = (sc, trial)
        return best

    def search(self, start: dict) -> dict:
        """From the projected counts `start`: the best counts found (`start` if none is better)."""
        counts = {gr.id: int(self.region[gr.id][np.argmin(np.abs(self.region[gr.id] - start[gr.id]))])
                  for gr in self.groups}
        counts = self.repair(counts, None) or start
        if not self.meets(counts) or self.score(start) <= self.score(counts):
            counts = start
        best_s = self.score(counts)
        for _ in range(2 * len(self.groups)):
            best = self._best_move(counts)
            if best is None or best[0] >= best_s * (1 - 2e-3):
                break
            best_s, counts = best
        return counts
