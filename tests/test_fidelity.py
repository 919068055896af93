"""The ranking stage before each trial's fine-tune (`search.rank`, pocketflow.hpo.fidelity), on the
real sample in tests/data: BatchNorm re-estimation, zero-budget candidates of every learner, the
prune-by-rank rule, a search with the stage on, and the config key."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest

from conftest import SMALL_NPZ, assert_one_line_error, learner_cfg, run_cli_inprocess

optuna = pytest.importorskip("optuna")


def _bn_model(seed: int = 0):
    import keras
    keras.utils.set_random_seed(seed)
    inp = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(6, 3, name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Dropout(0.5, name="drop")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, name="conv2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(10, name="logits")(x))


def test_bn_reestimation_recovers_the_data_statistics_and_touches_nothing_else(small_data):
    from pocketflow.hpo.fidelity import reestimate_bn
    model = _bn_model()
    bn, bn2 = model.get_layer("bn"), model.get_layer("bn2")
    for b in (bn, bn2):  # statistics of some other network
        b.moving_mean.assign(np.full(b.moving_mean.shape, 5.0, "float32"))
        b.moving_variance.assign(np.full(b.moving_variance.shape, 100.0, "float32"))
    others = {v.path: v.numpy() for v in model.variables if "moving" not in v.path}
    x = small_data.x_train[:512]
    assert reestimate_bn(model, x) == 2
    conv = model.get_layer("conv")(x).numpy()  # bn's input
    np.testing.assert_allclose(bn.moving_mean.numpy(), conv.mean((0, 1, 2)), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(bn.moving_variance.numpy(), conv.var((0, 1, 2)), rtol=0.05)
    # bn2 sees bn's output normalized with batch statistics, dropout off: close to its input at inference
    import keras
    upto = keras.Model(model.input, model.get_layer("conv2").output)
    h = upto(x, training=False).numpy()
    np.testing.assert_allclose(bn2.moving_mean.numpy(), h.mean((0, 1, 2)), rtol=0.1, atol=0.02)
    np.testing.assert_allclose(bn2.moving_variance.numpy(), h.var((0, 1, 2)), rtol=0.15)
    for v in model.variables:  # kernels, biases, gamma, beta: unchanged
        if "moving" not in v.path:
            np.testing.assert_array_equal(v.numpy(), others[v.path])
    assert bn.momentum == 0.99 and model.get_layer("drop").rate == 0.5


ZERO_BUDGET = {"full_precision": {}, "weight_sparsity": {"sparsity": 0.8}, "uniform_quant": {"bits": 4},
               "nonuniform_quant": {"bits": 3},
               "channel_pruning": {"preserve_ratio": 0.5, "latency_aware": False},
               "chain": {"steps": ["weight_sparsity", "nonuniform_quant", "uniform_quant"]},
               "chain_cp": {"name": "chain", "steps": ["channel_pruning", "weight_sparsity"],
                            "channel_pruning": {"latency_aware": False}}}


@pytest.mark.parametrize("case", list(ZERO_BUDGET))
def test_every_learner_compresses_with_a_zero_budget_and_never_fine_tunes(small_data, monkeypatch, case):
    """`Budget(epochs=0)`: the compressed deploy model, no trainer started (a chain skips every
    step's), the ratio the learner predicts; a deploy model with BN gets it re-estimated."""
    from pocketflow.hpo.fidelity import score
    from pocketflow.learners import LEARNERS, Budget
    from pocketflow.training import Trainer
    kw = dict(ZERO_BUDGET[case])
    name = kw.pop("name", case)
    learner = LEARNERS.get(name)(learner_cfg(name, **kw))
    model = _bn_model()
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("a zero budget fine-tuned"))
    params = learner.default_params(model)
    comp = learner.compress(model, params, small_data, Budget(epochs=0))
    assert comp.history is None and comp.deploy.predict(small_data.x_val[:4], verbose=0).shape == (4, 10)
    if name != "full_precision":
        metric = "flops" if case == "channel_pruning" else "packed_size"
        predicted, measured = learner.predict_ratio(model, params, metric), learner.measure(model, comp, metric)
        # (a chain's architecture step is an estimate in its prediction)
        rel = 0.1 if case == "chain_cp" else 0.02
        assert measured > 1.2 and measured == pytest.approx(predicted, rel=rel), (predicted, measured)
    r = score(learner, model, params, small_data, Budget(epochs=0), images=200)
    assert 0 <= r["val_acc"] <= 1 and r["seconds"] > 0
    folds = "uniform_quant" in kw.get("steps", [name])  # its prepare folds BN into the kernels
    assert r["bn_layers"] == (0 if folds else 2)


def _trial(number, stage_acc=None, initial=False, state="COMPLETE"):
    attrs = {"initial": True} if initial else {}
    if stage_acc is not None:
        attrs["stages"] = [{"stage": "zero_shot", "val_acc": stage_acc, "seconds": 1.0}]
    return types.SimpleNamespace(number=number, user_attrs=attrs,
                                 state=getattr(optuna.trial.TrialState, state))


def test_prune_by_rank_waits_for_the_warmup_and_spares_the_recipes():
    from pocketflow.hpo.fidelity import verdict
    ranked = [_trial(i, acc) for i, acc in enumerate([0.8, 0.6, 0.7])]
    low = _trial(3, 0.5)
    assert verdict(ranked[:2] + [low], low, 0.5, "zero_shot", keep=0.5, warmup=3) is None  # 2 ranked < warmup
    why = verdict(ranked + [low], low, 0.5, "zero_shot", keep=0.5, warmup=3)
    assert why.startswith("by rank: zero_shot val_acc 0.5000 below 0.7000")
    assert verdict(ranked + [low], low, 0.75, "zero_shot", keep=0.5, warmup=3) is None  # above the median
    recipe = _trial(3, 0.1, initial=True)
    assert verdict(ranked + [recipe], recipe, 0.1, "zero_shot", keep=0.5, warmup=3) is None
    assert verdict(ranked + [low], low, 0.5, "zero_shot", keep=1.0, warmup=3) is None  # keep all: rank only
    assert verdict(ranked + [low], low, 0.5, "short", keep=0.5, warmup=3) is None  # other stage: not comparable


def test_a_search_with_the_rank_stage_records_every_stage_and_prunes_by_rank(trained_seed_cnn, tmp_path,
                                                                              monkeypatch, capsys):
    """Recipes (enqueued first) and the warm-up always fine-tune; later trials that rank in the
    bottom share are pruned before their fine-tune, and say so."""
    from pocketflow import api
    from pocketflow.hpo.study import holds_slot
    from pocketflow.learners import LEARNERS
    path = tmp_path / "seed.keras"
    trained_seed_cnn.save(path)
    recipes = [{"sparsity/conv": 0.99, "sparsity/logits": 0.5}, {"sparsity/conv": 0.0, "sparsity/logits": 0.9}]
    monkeypatch.setattr(LEARNERS.get("weight_sparsity"), "initial_points", lambda self, model: recipes)
    warmup = 3
    cfg = {"name": "ranked", "seed": 0, "data": {"name": "npz", "path": str(SMALL_NPZ), "val_split": 0.1},
           "model": {"name": str(path)},
           "learner": {"name": "weight_sparsity", "fine_tune": {"epochs": 1, "steps": 1, "batch_size": 64,
                                                                 "verbose": False}},
           "target": {"metric": "packed_size", "ratio": 4.0},
           "search": {"optimizer": "random", "trials": 8, "trial_steps": 3, "pruner": "none",
                      "rank": {"stage": "zero_shot", "keep": 0.4, "warmup": warmup, "images": 200}},
           "export": {"formats": ["keras"], "verify": False}}
    res = api.compress(cfg, output=str(tmp_path / "runs"))
    out = capsys.readouterr().out
    study = optuna.load_study(study_name="ranked", storage=f"sqlite:///{tmp_path / 'runs' / 'ranked' / 'study.db'}")
    trials = [t for t in study.get_trials() if holds_slot(t)]
    assert len(trials) == 8
    for t in trials:
        stages = t.user_attrs["stages"]
        assert stages[0]["stage"] == "zero_shot" and stages[0]["seconds"] > 0
        assert t.intermediate_values[0] == stages[0]["val_acc"]  # the pruner's step 0
        if t.state.name == "COMPLETE":
            assert [s["stage"] for s in stages] == ["zero_shot", "fine_tune"] and stages[1]["steps"] == 3
            assert stages[1]["val_acc"] == t.value
    pruned = [t for t in trials if t.user_attrs.get("pruned_by") == "rank"]
    assert pruned, [(t.number, t.user_attrs["stages"][0]["val_acc"]) for t in trials]
    assert all(t.state.name == "PRUNED" and len(t.user_attrs["stages"]) == 1 for t in pruned)
    assert min(t.number for t in pruned) >= warmup
    assert all(t.state.name == "COMPLETE" for t in trials if t.user_attrs.get("initial"))
    assert sum(1 for t in trials if t.user_attrs.get("initial")) == 2
    for t in pruned:
        assert f"trial {t.number} [" in out and "pruned: by rank: zero_shot val_acc" in out
    rank = res.metrics["search"]["rank"]
    assert rank["ranked"] == 8 and rank["pruned_by_rank"] == len(pruned) and rank["stage"] == "zero_shot"
    assert json.loads((res.run_dir / "best" / "metrics.json").read_text())["search"]["rank"] == rank


def test_the_rank_key_is_validated_in_one_line(tmp_path):
    from pocketflow.config import SCHEMA, load_config
    from pocketflow.hpo.fidelity import STAGES
    assert SCHEMA["search"].schema["rank"].schema["stage"].choices == STAGES
    base = {"data": {"name": "npz", "path": str(SMALL_NPZ)}, "model": {"name": "seed_cnn"},
            "search": {"optimizer": "tpe"}}
    assert load_config(base)["search"]["rank"] == {"stage": "none", "keep": 0.5, "warmup": 4, "images": 2000,
                                                   "fraction": 0.1}
    cfg = tmp_path / "c.yaml"
    for bad, pieces in ((" {stage: zero-shot}", ("search.rank.stage", "zero_shot")),
                        (" {stage: zero_shot, keep: 0}", ("search.rank.keep", "(0, 1]")),
                        (" {stages: short}", ("search.rank.stages", "stage"))):
        cfg.write_text(f"data: {{name: npz, path: {SMALL_NPZ}}}\nmodel: {{name: seed_cnn}}\n"
                       f"search: {{optimizer: tpe, rank:{bad}}}\n")
        assert_one_line_error(run_cli_inprocess("run", cfg, "--output", tmp_path / "runs"), *pieces)
