"""Channel pruning's latency-aware projection: the per-layer latency table and the exchange."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from conftest import learner_cfg

keras = pytest.importorskip("keras")

from pocketflow.errors import ConfigError, PocketFlowError  # noqa: E402
from pocketflow.export import to_tflite  # noqa: E402
from pocketflow.learners import LEARNERS  # noqa: E402
from pocketflow.learners.channel_pruning.counts import COUNT, allowed_counts, to_params  # noqa: E402
from pocketflow.learners.channel_pruning.latency_table import LatencyTable, side_counts  # noqa: E402
from pocketflow.metrics import TFLiteRunner, tflite_interpreter  # noqa: E402
from pocketflow.zoo import build_model  # noqa: E402


@pytest.fixture(scope="module")
def resnet():
    keras.utils.set_random_seed(0)
    return build_model("resnet20", (28, 28, 1), 10)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    import os
    path = tmp_path_factory.mktemp("latency") / "latency_table.json"
    old = os.environ.get("POCKETFLOW_CACHE")
    os.environ["POCKETFLOW_CACHE"] = str(path.parent)
    yield path
    if old is None:
        os.environ.pop("POCKETFLOW_CACHE")
    else:
        os.environ["POCKETFLOW_CACHE"] = old


def learner(**kw):
    return LEARNERS.get("channel_pruning")(learner_cfg("channel_pruning", ratio_range=[0.1, 1.0], **kw))


def test_table_is_measured_once_cached_and_reproduces_its_measurements(resnet, cache, capsys):
    lr = learner()
    table = lr.latency_table(resnet)
    assert "measured" in capsys.readouterr().out and cache.exists()
    disk = json.loads(cache.read_text())
    (machine, entries), = disk.items()
    assert len(entries) == len(table._t) and all(set(v) == {"b1_t1", "b32_t1"} for v in entries.values())
    # every Conv2D/Dense of the model is in the table; the s1 convs share one signature
    names = [n for n in lr.graph(resnet).order if type(resnet.get_layer(n)).__name__ in ("Conv2D", "Dense")]
    assert list(table.layers) == names
    sig = {table._key(table.layers[n], 16, 16) for n in ("s1b1_conv1", "s1b2_conv2", "s1b3_conv1")}
    assert len(sig) == 1
    for setting in table.settings:
        s = f"b{setting[0]}_t{setting[1]}"
        full = sum(entries[table._key(sp, sp["full_in"], sp["full_out"])][s] for sp in table.layers.values())
        assert table.model_ms({}, setting) == pytest.approx(full, rel=1e-9)
        spec = table.layers["s3b2_conv1"]  # 64 -> 64 at 7x7: measured output counts are predicted exactly
        for c in spec["out"]:
            assert table.layer_ms("s3b2_conv1", 64, c, setting) == pytest.approx(entries[table._key(spec, 64, c)][s])
        assert spec["out"][-3:] == [16, 32, 64] and spec["in"][-3:] == [16, 32, 64]
    # a second learner reads the cache: nothing measured, the same predictions
    again = learner().latency_table(resnet)
    assert "measured" not in capsys.readouterr().out
    half = {gr.id: gr.size // 2 for gr in lr.graph(resnet).prunable}
    assert again.cost(half) == table.cost(half) < 1.0


def test_latency_aware_projection_meets_the_target_with_less_predicted_latency(resnet, cache):
    aware, plain, off = learner(), learner(latency_aware=False), learner(exchange_range=0.0)
    g = aware.graph(resnet)
    start = {f"ratio/{gr.name}": 1.0 for gr in g.prunable}
    p_aware = aware.project(resnet, start, "flops", 2.0)
    p_plain = plain.project(resnet, start, "flops", 2.0)
    assert off.project(resnet, start, "flops", 2.0) == p_plain
    table = aware.latency_table(resnet)
    eff = {}
    for name, lr, p in (("aware", aware, p_aware), ("plain", plain, p_plain)):
        r = lr.predict_ratio(resnet, p, "flops")
        assert 2.0 <= r <= 2.02
        counts = lr._counts(g, p)
        for gr in g.prunable:  # on the tile grid, never below the ratio_range floor
            assert counts[gr.id] in allowed_counts(gr.size, 1, 32) and counts[gr.id] >= 0.1 * gr.size
        eff[name] = table.cost(counts) * r  # predicted latency / FLOPs kept: lower is better
    # never worse by its own table; how much better depends on this machine's fresh measurement
    # (0.66-0.87 of plain on 13 tables measured here): the >= 5% gain is asserted on a fixed table
    # below, and measured on the channel-pruning benchmark page
    assert eff["aware"] <= eff["plain"] * (1 + 1e-9), eff
    # the search's points stay distinct: another start projects elsewhere, also on target
    rng = np.random.default_rng(0)
    other = aware.project(resnet, {k: float(rng.uniform(0.3, 1.0)) for k in start}, "flops", 2.0)
    assert 2.0 <= aware.predict_ratio(resnet, other, "flops") <= 2.02
    p3 = aware.project(resnet, start, "params", 3.0)
    assert 3.0 <= aware.predict_ratio(resnet, p3, "params") <= 3.03


def _synthetic(noise: int | None = None):
    """A latency table from given numbers: 1 us + 1 us per 1000 MACs (at the input resolution),
    half that per MAC for the layers reading 28x28 maps; with `noise` (a seed), every entry
    scaled by up to +-35% at random, as a fresh measurement on a loaded machine might be."""
    rng = np.random.default_rng(noise)

    def measure(spec, cin, cout):
        h = spec["spatial"][0] if spec["spatial"] else 1
        k = spec["cfg"].get("kernel_size") or (1, 1)
        ms = (1.0 + h * h * k[0] * k[1] * cin * cout * 1e-6) * (0.5 if h >= 28 else 1.0)
        return {f"b{b}_t{t}": ms * (1.0 if noise is None else float(np.exp(rng.uniform(-0.3, 0.3))))
                for b, t in ((1, 1), (32, 1))}
    return measure


@pytest.mark.parametrize("noise", [None, *range(5)])
def test_latency_aware_projection_stays_on_the_tile_grid_whatever_the_table_says(resnet, noise):
    """With the table above (noise None) the exchange used to settle 4% past the FLOPs target
    (its repair accepted up to 5%), where no tile step fits; the top-up then finished with single
    channels and kept 17 of s2b1_conv2's 32. Candidates now end within the projection's 1%."""
    lr, plain = learner(), learner(latency_aware=False)
    g = lr.graph(resnet)
    table = LatencyTable(resnet, g, side_counts(g, 1, 32, 0.1), measure=_synthetic(noise))
    assert list(table.layers) == [n for n in g.order if type(resnet.get_layer(n)).__name__ in ("Conv2D", "Dense")]
    lr._tables[(id(resnet), "float")] = (resnet, table)  # the learner uses this table, nothing is measured
    start = {f"ratio/{gr.name}": 1.0 for gr in g.prunable}
    for metric, target in (("flops", 2.0), ("params", 3.0), ("flops", 3.0)):
        p, p_plain = lr.project(resnet, start, metric, target), plain.project(resnet, start, metric, target)
        counts, r = lr._counts(g, p), lr.predict_ratio(resnet, p, metric)
        assert target <= r <= target * 1.01, (metric, target, r)
        assert not [k for k in p if k.startswith(COUNT)], p
        for gr in g.prunable:
            assert counts[gr.id] in allowed_counts(gr.size, 1, 32) and counts[gr.id] >= 0.1 * gr.size, (gr.name, counts)
        # never worse than the plain projection by the table's own measure (latency per MAC kept)
        r_plain = plain.predict_ratio(resnet, p_plain, metric)
        assert table.cost(counts) * r <= table.cost(plain._counts(g, p_plain)) * r_plain * (1 + 1e-9)
    if noise is None:  # the exchange did move channels here (the case that went off the grid), and it pays
        p, p_plain = lr.project(resnet, start, "flops", 2.0), plain.project(resnet, start, "flops", 2.0)
        assert lr._counts(g, p) != plain._counts(g, p_plain)
        eff = {n: table.cost(x._counts(g, q)) * x.predict_ratio(resnet, q, "flops")
               for n, x, q in (("aware", lr, p), ("plain", plain, p_plain))}
        assert eff["aware"] < 0.95 * eff["plain"], eff


def test_params_carry_exact_counts_only_off_the_grid(resnet):
    """A top-up that grows an off-grid count onto the grid drops its old `count/` entry (which
    would otherwise override the new count)."""
    lr = learner()
    g = lr.graph(resnet)
    full = {gr.id: gr.size for gr in g.prunable}
    gr = g.group("s2b1_conv2")
    p = to_params(g, {COUNT + gr.name: 17, "other": 1}, {**full, gr.id: 16}, 1, 32)
    assert COUNT + gr.name not in p and p["other"] == 1 and lr._counts(g, p) == {**full, gr.id: 16}
    p = to_params(g, {}, {**full, gr.id: 17}, 1, 32)
    assert p[COUNT + gr.name] == 17 and lr._counts(g, p) == {**full, gr.id: 17}


def _fastest(blobs: dict, rounds: int = 5, batch: int = 32) -> dict:
    x = np.random.default_rng(0).random((batch, 28, 28, 1), dtype=np.float32)
    runners = {k: TFLiteRunner(b, threads=1, batch=batch) for k, b in blobs.items()}
    best = {k: float("inf") for k in blobs}
    for _ in range(rounds):  # interleaved: load from other jobs hits every model alike
        for k, r in runners.items():
            r(x)
            for _ in range(5):
                t0 = time.perf_counter()
                r(x)
                best[k] = min(best[k], time.perf_counter() - t0)
    return best


def test_latency_aware_architecture_is_measurably_faster_and_adds_no_ops(resnet, cache):
    g = learner().graph(resnet)
    start = {f"ratio/{gr.name}": 1.0 for gr in g.prunable}
    blobs = {}
    for name, lr in (("aware", learner()), ("plain", learner(latency_aware=False))):
        counts = lr._counts(g, lr.project(resnet, start, "flops", 2.0))
        blobs[name] = to_tflite(g.prune(resnet, {gid: np.arange(k) for gid, k in counts.items()}))
    blobs["original"] = to_tflite(resnet)

    def ops(blob):
        return sorted(d["op_name"] for d in tflite_interpreter(blob)._get_ops_details())
    assert ops(blobs["aware"]) == ops(blobs["plain"]) == ops(blobs["original"])  # surgery adds no op
    t = _fastest(blobs)
    assert t["aware"] < t["plain"] < t["original"], t


def test_latency_settings_are_validated():
    with pytest.raises(ConfigError, match="latency_settings"):
        learner_cfg("channel_pruning", latency_settings=[[1]])
    with pytest.raises(ConfigError, match="exchange_range"):
        learner_cfg("channel_pruning", exchange_range=-0.1)


def test_prepare_search_builds_the_table_before_the_first_projection(resnet, cache):
    """The search calls prepare_search before its clock starts: the one-off table is not charged
    to the first trial's projection; targets the exchange does not serve build nothing."""
    lr = learner()
    lr.prepare_search(resnet, "packed_size")
    assert lr._tables == {}
    lr.prepare_search(resnet, "flops")
    table = lr.latency_table(resnet)
    assert lr._tables[(id(resnet), "float")][1] is table and table.cost({}) == pytest.approx(1.0)
    off = learner(latency_aware=False)
    off.prepare_search(resnet, "flops")
    assert off._tables == {}


# -- int8 deploys -----------------------------------------------------------------------------------

def _convnet(width: int = 32):
    """Three 3x3 convs (the last strided) + GAP + Dense on 28x28x1: small enough to time in seconds,
    wide enough that 25% of its channels is clearly faster than all of them."""
    L = keras.layers
    keras.utils.set_random_seed(0)
    inp = keras.Input((28, 28, 1), name="input")
    x = L.Conv2D(width, 3, padding="same", activation="relu", name="c1")(inp)
    x = L.Conv2D(width, 3, padding="same", activation="relu", name="c2")(x)
    x = L.Conv2D(2 * width, 3, strides=2, padding="same", activation="relu", name="c3")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, L.Dense(10, name="logits")(x))


@pytest.fixture(scope="module")
def convnet():
    from pocketflow.learners.channel_pruning.groups import analyse
    m = _convnet()
    return m, analyse(m)


class _Counting(LatencyTable):
    """A real table that counts its (real) measurements."""
    calls = 0

    def _measure(self, spec, cin, cout):
        type(self).calls += 1
        return super()._measure(spec, cin, cout)


def test_int8_table_entries_are_cached_under_their_own_keys(convnet, tmp_path, capsys):
    m, g = convnet
    path = tmp_path / "latency_table.json"
    sides = side_counts(g, 1, 32, 0.5)
    tables = {}
    for deploy in ("float", "int8"):
        _Counting.calls = 0
        tables[deploy] = _Counting(m, g, sides, settings=((1, 1),), cache=path, deploy=deploy)
        assert _Counting.calls == len(tables[deploy]._t) > 0, deploy  # nothing shared: all measured
        assert f"for the {deploy} latency table" in capsys.readouterr().out
    f, q = tables["float"], tables["int8"]
    assert list(f.layers) == list(q.layers) == ["c1", "c2", "c3", "logits"] and q.deploy == "int8"
    assert not set(f._t) & set(q._t)
    (_, entries), = json.loads(path.read_text()).items()
    assert set(entries) == set(f._t) | set(q._t)
    for key in f._t:  # the float key format is the one caches were written with
        sig = json.loads(key)
        assert len(sig) == 5 and json.dumps([*sig, "int8"], sort_keys=True) in q._t
    # a second int8 table loads everything from the cache: no measurement, the same predictions
    _Counting.calls = 0
    again = _Counting(m, g, sides, settings=((1, 1),), cache=path, deploy="int8")
    assert _Counting.calls == 0 and "measured" not in capsys.readouterr().out
    assert again._t == q._t
    half = {gr.id: gr.size // 2 for gr in g.prunable}
    assert again.cost(half) == q.cost(half) < 1.0
    with pytest.raises(PocketFlowError, match="deploy"):
        LatencyTable(m, g, sides, cache=path, deploy="float16")


def test_pruned_ms_int8_times_a_full_integer_file(convnet, monkeypatch):
    from pocketflow import metrics
    from pocketflow.learners.channel_pruning.latency_table import pruned_ms
    m, g = convnet
    seen = []

    class Recording(TFLiteRunner):  # the real interpreter; records which file it was given
        def __init__(self, model, *a, **kw):
            super().__init__(model, *a, **kw)
            seen.append((self.inp["dtype"], self.out["dtype"], dict(self.inp)["shape"].tolist()))
    monkeypatch.setattr(metrics, "TFLiteRunner", Recording)
    counts = {gr.id: gr.size // 4 for gr in g.prunable}
    t8 = pruned_ms(m, g, counts, deploy="int8")
    tf = pruned_ms(m, g, counts)
    assert t8 > 0 and tf > 0
    assert seen == [(np.int8, np.int8, [1, 28, 28, 1]), (np.float32, np.float32, [1, 28, 28, 1])]
    with pytest.raises(PocketFlowError, match="deploy"):
        pruned_ms(m, g, counts, deploy="int4")


def test_int8_table_ranks_prunings_as_measured(convnet, tmp_path):
    from pocketflow.learners.channel_pruning.latency_table import pruned_ms
    m, g = convnet
    table = LatencyTable(m, g, side_counts(g, 1, 32, 0.25), settings=((1, 1),), cache=tmp_path / "t.json",
                         deploy="int8")
    full = {gr.id: gr.size for gr in g.prunable}
    quarter = {gr.id: gr.size // 4 for gr in g.prunable}
    predicted = table.cost(quarter)
    assert 0 < predicted < 0.7 * table.cost(full) and table.cost(full) == pytest.approx(1.0)
    measured = {k: min(pruned_ms(m, g, c, deploy="int8") for _ in range(3)) for k, c in
                (("full", full), ("quarter", quarter))}
    assert measured["quarter"] < measured["full"], measured


def test_int8_counts_between_close_measurements_cost_the_next_step(convnet):
    """int8 kernels pad both channel counts to a tile (8 on AVX2): with measurements every 4th count,
    9-11 channels cost what 12 does (linear from 8 would say less); across the wide 16..32 gap of the
    tile-32 grid the table stays linear. Float keeps linear interpolation everywhere."""
    m, g = convnet

    def staircase(spec, cin, cout):  # 1 us per 8-channel tile on each side
        return {"b1_t1": float(np.ceil(cin / 8) * np.ceil(cout / 8))}
    sides = side_counts(g, 1, 32, 0.1)
    q = LatencyTable(m, g, sides, settings=((1, 1),), measure=staircase, deploy="int8")
    f = LatencyTable(m, g, sides, settings=((1, 1),), measure=staircase)
    spec = q.layers["c3"]  # 32 -> 64
    assert spec["out"] == [7, 8, 12, 16, 32, 64] and spec["in"] == [4, 8, 12, 16, 32]
    for c in (9, 10, 11, 13, 16):
        assert q.layer_ms("c3", 32, c, (1, 1)) == pytest.approx(staircase(spec, 32, c)["b1_t1"])
        assert q.layer_ms("c3", c, 64, (1, 1)) == pytest.approx(staircase(spec, c, 64)["b1_t1"])
    assert f.layer_ms("c3", 32, 9, (1, 1)) < q.layer_ms("c3", 32, 9, (1, 1))
    assert q.layer_ms("c3", 32, 24, (1, 1)) == pytest.approx(f.layer_ms("c3", 32, 24, (1, 1))) == pytest.approx(12.0)


def test_latency_target_of_an_int8_shipping_run_is_against_the_float_baseline_file(trained_seed_cnn, small_data):
    """A `latency` ratio is the float baseline file's time over the shipped file's: with an int8
    ship, the unpruned point predicts float/int8 (not 1), from timings of both file types."""
    from pocketflow.targets import Shipped
    lr = LEARNERS.get("channel_pruning")(learner_cfg("channel_pruning"))
    full = {k: 1.0 for k in lr.default_params(trained_seed_cnn)}
    assert lr.predict_ratio(trained_seed_cnn, full, "latency") == 1.0  # float ship: the same file
    lr.ship(Shipped(deploy="int8", representative=small_data.representative()))
    r = lr.predict_ratio(trained_seed_cnn, full, "latency")
    kinds = {key[1] for key in lr._latency}
    assert kinds == {"float", "int8"} and r != 1.0 and 0.05 < r < 20
    g = lr.graph(trained_seed_cnn)
    counts = lr._counts(g, full)
    assert r == lr._latency_ms(trained_seed_cnn, g, counts, "float") / lr._latency_ms(trained_seed_cnn, g, counts, "int8")
