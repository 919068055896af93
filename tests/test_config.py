"""The config schema: defaults, overrides, and one-line errors naming file and key."""
import pytest

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
    assert cfg["target"]["metric"] == "compression"


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


@pytest.mark.parametrize("metric, name, steps", [
    ("compression", "chain", ["weight_sparsity", "uniform_quant"]),
    ("flops", "channel_pruning", None),
    ("latency", "channel_pruning", None),
    ("params", "weight_sparsity", None),
])
def test_learner_auto_follows_the_target_metric(metric, name, steps):
    cfg = load_config({"data": {"name": "mnist"}, "model": {"name": "seed_cnn"},
                       "learner": {"name": "auto", "fine_tune": {"epochs": 2}},
                       "target": {"metric": metric, "ratio": 2}})
    assert cfg["learner"]["name"] == name
    assert cfg["learner"].get("steps") == steps
    assert cfg["learner"]["fine_tune"]["epochs"] == 2  # the user's shared keys are kept
    assert cfg.notes == [f"learner: auto chose {name}" + (f" ({' -> '.join(steps)})" if steps else "")
                         + f" for a {metric} target"]


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
