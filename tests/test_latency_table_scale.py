"""The latency table at keras.applications scale (docs/latency_table.md): equal layer shapes are
measured once (across layers and models), a cached table measures nothing, and the reduced set
of measured counts predicts what measuring every count the projection can reach would."""
from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from pocketflow.learners.channel_pruning import latency_table as LT  # noqa: E402
from pocketflow.learners.channel_pruning.counts import allowed_counts  # noqa: E402
from pocketflow.learners.channel_pruning.groups import analyse  # noqa: E402


def staircase(spec, cin, cout):
    """MACs with the output channels rounded up to a 32-channel tile: what XNNPACK's float convs
    cost to first order, and linear between tile multiples (so interpolation there is exact)."""
    h = np.prod(spec["spatial"]) if spec["spatial"] else 1
    k = np.prod(spec["cfg"].get("kernel_size") or (1, 1))
    ms = float(h * k * cin * np.ceil(cout / 32) * 32 * 1e-6)
    return {"b1_t1": ms, "b32_t1": 20 * ms}


class Counting(LT.LatencyTable):
    """A table that records its measurements (given numbers, through the disk cache)."""
    calls: list = []

    def _measure(self, spec, cin, cout):
        type(self).calls.append(self._key(spec, cin, cout))
        return staircase(spec, cin, cout)


@pytest.fixture(scope="module")
def densenet():
    keras.utils.set_random_seed(0)
    m = keras.applications.DenseNet121(weights=None, input_shape=(32, 32, 3), classes=10)
    return m, analyse(m)


def test_equal_shapes_are_measured_once_and_a_cached_table_measures_nothing(densenet, tmp_path, capsys):
    m, g = densenet
    sides, cache = LT.side_counts(g, 1, 32, 0.2), tmp_path / "t.json"
    Counting.calls = []
    table = Counting(m, g, sides, cache=cache)
    pairs = [(n, i, o) for n, sp in table.layers.items() for i, o in table._pairs(sp)]
    assert len(Counting.calls) == len(set(Counting.calls)) == len(table._t)  # each shape once
    assert len(Counting.calls) < 0.5 * len(pairs)  # DenseNet's blocks share most of theirs
    out = capsys.readouterr().out
    assert f"measuring {len(Counting.calls)} layer shapes" in out and "latency table 25/" in out
    # the same table again: answered from the cache, nothing measured, the same predictions
    Counting.calls = []
    again = Counting(m, g, sides, cache=cache)
    assert Counting.calls == [] and "measur" not in capsys.readouterr().out
    half = {gr.id: int(allowed_counts(gr.size, 1, 32)[len(allowed_counts(gr.size, 1, 32)) // 2]) for gr in g.prunable}
    assert again.cost(half) == table.cost(half) < 1.0
    # another model: only the shapes the first one did not have are measured (without its
    # classifier, the last block's channels reach the output: pinned, measured at full width)
    other = keras.applications.DenseNet121(weights=None, input_shape=(32, 32, 3), classes=10, include_top=False)
    go = analyse(other)
    Counting.calls = []
    t2 = Counting(other, go, LT.side_counts(go, 1, 32, 0.2), cache=cache)
    assert 0 < len(Counting.calls) < 0.2 * len(t2._t) and not set(Counting.calls) & set(table._t)


def test_reduced_table_predicts_what_the_full_table_would(densenet, monkeypatch):
    """Measuring every reachable count and each layer's own input width (the full table) against
    the thinned, shared counts: on a cost that is linear between tile multiples they agree at every
    count the projection can reach (they differ on a real machine only by how far the measured
    curve bends between the counts the thinning skips, see docs/latency_table.md)."""
    m, g = densenet
    sides = LT.side_counts(g, 1, 32, 0.2)
    reduced = LT.LatencyTable(m, g, sides, measure=staircase)
    monkeypatch.setattr(LT, "_thin", lambda counts: sorted(set(int(c) for c in counts)))
    monkeypatch.setattr(LT, "_ref_in", lambda lay, ins: len(lay))
    full = LT.LatencyTable(m, g, sides, measure=staircase)
    assert len(full._t) > 1.5 * len(reduced._t)
    assert any(sp["ref_in"] != sp["full_in"] for sp in reduced.layers.values())  # concat readers
    for name, sp in full.layers.items():
        for cin, cout in full._pairs(sp):
            for s in full.settings:
                assert reduced.layer_ms(name, cin, cout, s) == pytest.approx(full.layer_ms(name, cin, cout, s),
                                                                             rel=1e-9), (name, cin, cout)
    rng = np.random.default_rng(0)
    for _ in range(20):  # whole-model predictions at random points of the tile grid
        c = {gr.id: int(rng.choice(allowed_counts(gr.size, 1, 32)[allowed_counts(gr.size, 1, 32) >= 0.2 * gr.size]))
             for gr in g.prunable}
        assert reduced.cost(c) == pytest.approx(full.cost(c), rel=1e-9)
