"""The config schema: defaults, overrides, and one-line errors naming file and key."""
import pytest
import yaml

from conftest import ROOT

from pocketflow.config import load_config
from pocketflow.errors import ConfigError

BASE = {"data": {"name": "fashion_mnist"}, "model": {"name": "seed_cnn"}}


def write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_filled_and_types_kept():
    cfg = load_config(BASE)
    assert cfg["train"]["batch_size"] == 128
    assert cfg["learner"]["name"] == "full_precision"
    assert cfg["learner"]["fine_tune"]["optimizer"] == "adam"
    assert cfg["target"]["metric"] == "size"  # the shipped TFLite file's bytes


def test_dotted_overrides_parse_yaml_values():
    cfg = load_config(BASE, overrides=["learner.fine_tune.epochs=2", "train.learning_rate=0.01",
                                       "export.formats=[keras]", "name=abc"])
    assert cfg["learner"]["fine_tune"]["epochs"] == 2
    assert cfg["train"]["learning_rate"] == pytest.approx(0.01)
    assert cfg["export"]["formats"] == ["keras"]
    assert cfg["name"] == "abc"


def test_target_ratio_argument_overrides_file():
    cfg = load_config({**BASE, "target": {"ratio": 2}}, target_ratio=8)
    assert cfg["target"]["ratio"] == 8


@pytest.mark.parametrize("text, pieces", [
    ("data: {name: mnist\n", ["malformed YAML", "line"]),
    ("data: {name: mnist}\nmodel: {name: seed_cnn}\ntrian: {epochs: 1}\n", ["unknown key 'trian'", "did you mean 'train'"]),
    ("data: {name: mnist}\nmodel: {name: seed_cnn}\ntrain: {epochs: many}\n", ["'train.epochs' must be", "'many'"]),
    ("data: {name: mnist}\nmodel: {name: seed_cnn}\ntrain: {optimizer: adamm}\n", ["'train.optimizer' must be one of", "did you mean 'adam'"]),
    ("model: {name: seed_cnn}\n", ["missing required key 'data.name'"]),
    ("data: {name: mnist}\n", ["missing required key 'model.name'"]),
    ("data: {name: mnist}\nmodel: {name: seed_cnn}\nlearner: {name: prunning}\n", ["'learner.name' unknown value 'prunning'"]),
    ("data: {name: mnist}\nmodel: {name: seed_cnn}\ntarget: {ratio: 0.5}\n", ["'target.ratio' must be > 1"]),
    ("data: {name: mnist}\nmodel: {name: seed_cnn}\nsearch: {optimizer: bayes}\n", ["'search.optimizer' unknown value 'bayes'"]),
    ("- a\n- b\n", ["top level must be a mapping"]),
])
def test_bad_config_one_line_error_naming_file_and_key(tmp_path, text, pieces):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(str(p))
    for piece in pieces:
        assert piece in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(BASE, overrides=["train.epochs"])


def test_yaml_is_loaded_safely(tmp_path):
    p = write(tmp_path, "data: !!python/object/apply:os.system ['echo hacked']\nmodel: {name: seed_cnn}\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(p)


@pytest.mark.parametrize("metric", ["download_size", "packed_size", "size", "flops", "latency", "params"])
def test_learner_auto_searches_the_methods_the_target_metric_calls_for(metric):
    from pocketflow.learners.auto import METHODS, QAT_LR, method_name
    cfg = load_config({"data": {"name": "mnist"}, "model": {"name": "seed_cnn"},
                       "learner": {"name": "auto", "fine_tune": {"epochs": 2, "learning_rate": 1e-3}},
                       "target": {"metric": metric, "ratio": 2}})
    assert cfg["learner"]["name"] == "auto" and cfg["learner"]["methods"] == METHODS[metric]
    names = [method_name(m) for m in METHODS[metric]]
    assert cfg.notes == [f"learner: auto searches {len(names)} method(s) for a {metric} target: " + " | ".join(names)]
    for steps, name in zip(METHODS[metric], names):  # each method: a chain with the recipe's defaults
        chain = cfg["learner"]["resolved"][name]
        assert chain["steps"] == steps and chain["fine_tune"]["epochs"] == 2  # the user's shared keys
        lrs = [chain[s]["fine_tune"]["learning_rate"] for s in steps]
        assert lrs == pytest.approx([1e-3 * min(0.5 ** i, QAT_LR if s == "uniform_quant" else 1)
                                     for i, s in enumerate(steps)])  # QAT: BatchNorm folded, a lower rate
        epochs = [chain[s]["fine_tune"]["epochs"] for s in steps]
        assert sum(epochs) == pytest.approx(2) if len(steps) > 1 else epochs == [2]


def test_learner_auto_takes_the_users_methods_and_step_settings():
    cfg = load_config({"data": {"name": "mnist"}, "model": {"name": "seed_cnn"},
                       "learner": {"name": "auto", "methods": [["weight_sparsity", "uniform_quant"]],
                                   "uniform_quant": {"bits": 6, "fine_tune": {"learning_rate": 0.01}}},
                       "target": {"metric": "download_size", "ratio": 4}})
    assert cfg.notes == [] and list(cfg["learner"]["resolved"]) == ["weight_sparsity+uniform_quant"]
    uq = cfg["learner"]["resolved"]["weight_sparsity+uniform_quant"]["uniform_quant"]
    assert uq["bits"] == 6 and uq["fine_tune"]["learning_rate"] == 0.01
    assert "resolved" not in cfg.to_yaml() and load_config(yaml.safe_load(cfg.to_yaml()))["learner"]["methods"] == \
        [["weight_sparsity", "uniform_quant"]]  # config.yaml reloads
    with pytest.raises(ConfigError, match="'learner.methods' lists a method twice"):
        load_config({"data": {"name": "mnist"}, "model": {"name": "seed_cnn"},
                     "learner": {"name": "auto", "methods": [["uniform_quant"], ["uniform_quant"]]}})
    with pytest.raises(ConfigError, match="unknown key 'learner.channel_pruning'"):
        load_config({"data": {"name": "mnist"}, "model": {"name": "seed_cnn"},
                     "learner": {"name": "auto", "methods": [["uniform_quant"]], "channel_pruning": {}}})


def test_compression_is_an_alias_of_packed_size_with_a_notice():
    cfg = load_config({**BASE, "target": {"metric": "compression", "ratio": 4}})
    assert cfg["target"]["metric"] == "packed_size"
    assert len(cfg.notes) == 1 and "'compression' is 'packed_size'" in cfg.notes[0] and "'size'" in cfg.notes[0]
    assert load_config({**BASE, "target": {"metric": "size"}}).notes == []


def test_a_file_target_needs_the_tflite_export():
    with pytest.raises(ConfigError, match="target metric 'download_size' is measured on the TFLite file.*add tflite"):
        load_config({**BASE, "target": {"metric": "download_size", "ratio": 4}, "export": {"formats": ["keras"]}})
    load_config({**BASE, "target": {"metric": "flops", "ratio": 2}, "export": {"formats": ["keras"]}})


def test_learner_may_be_given_by_name_alone():
    cfg = load_config({"data": {"name": "mnist"}, "model": {"name": "seed_cnn"}, "learner": "weight_sparsity"})
    assert cfg["learner"]["name"] == "weight_sparsity" and cfg.notes == []


def test_a_runs_own_config_yaml_loads_again(tmp_path):
    """config.yaml lists every key with its value, defaults included: it must validate as it is
    (evaluate/export and --resume read it), also where a key only matters in another mode."""
    import yaml

    from pocketflow.config import load_config
    for raw in ({"data": {"name": "fashion_mnist"}, "model": {"name": "seed_cnn"}, "learner": {"name": "weight_sparsity"}},
                "configs/quickstart.yaml"):
        cfg = load_config(raw if isinstance(raw, dict) else ROOT / raw)
        again = load_config(yaml.safe_load(cfg.to_yaml()))
        assert again.to_yaml() == cfg.to_yaml()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_load_and_name_what_they_measure(path):
    """Every config in configs/ validates as shipped (a user's model given with --set where the
    config leaves model.name empty), uses a metric's own name (no alias notice) and reloads from
    its config.yaml."""
    from pocketflow.targets import METRICS
    raw = yaml.safe_load(path.read_text())
    overrides = [] if raw["model"]["name"] else ["model.name=users_model.keras"]
    if not raw["model"]["name"]:
        with pytest.raises(ConfigError, match="missing required key 'model.name'"):
            load_config(path)
    cfg = load_config(path, overrides)
    assert cfg["target"]["metric"] in METRICS and not any("alias" in n or "is 'packed_size'" in n for n in cfg.notes)
    assert load_config(yaml.safe_load(cfg.to_yaml())).to_yaml() == cfg.to_yaml()
