"""Issue 15: whatever can be checked from config, data and model is checked before any training,
in one line that names the fix (pocketflow.checks, the loaders in data.py and zoo.py, the config).

The CLI cases run `python -m pocketflow` as a user would. The unit cases call `check_inputs` and
the loaders directly, on small real arrays and models.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import SMALL_NPZ, assert_one_line_error, run_cli, run_cli_inprocess
from pocketflow.checks import check_inputs
from pocketflow.config import load_config
from pocketflow.data import Dataset, load_dataset
from pocketflow.errors import ConfigError, PocketFlowError

with np.load(SMALL_NPZ) as _z:
    BASE = {k: _z[k] for k in _z.files}

RUN = {"train": {"steps": 2, "batch_size": 16, "verbose": False},
       "learner": {"name": "full_precision", "fine_tune": {"steps": 1, "batch_size": 16, "verbose": False}},
       "export": {"formats": ["keras"], "verify": False}}


def write_npz(path, n_train=120, n_test=40, x=lambda a: a, y=lambda a: a, **override):
    """A slice of the real sample, images and labels transformed as a user's arrays might be."""
    arrays = {"x_train": x(BASE["x_train"][:n_train]), "y_train": y(BASE["y_train"][:n_train]),
              "x_test": x(BASE["x_test"][:n_test]), "y_test": y(BASE["y_test"][:n_test]), **override}
    np.savez(path, **arrays)
    return path


def run(tmp_path, model="seed_cnn", data=None, val_split=0.2, subprocess=False, **sections):
    """`pocketflow run` on `data` (default: a valid 120-image sample) with `model`; `sections`
    replace those of the small run config. In this process unless `subprocess` (what TensorFlow
    logs to the real stderr is seen only there)."""
    import yaml
    data = data or write_npz(tmp_path / "d.npz")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"name": "chk", "data": {"name": "npz", "path": str(data), "val_split": val_split},
                                   "model": {"name": str(model)}, **RUN, **sections}))
    return (run_cli if subprocess else run_cli_inprocess)("run", cfg, "--output", tmp_path / "runs", cwd=tmp_path)


def save_cnn(path, shape=(28, 28, 1), classes=10, outputs=1):
    import keras
    inp = keras.Input(shape)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inp))
    outs = [keras.layers.Dense(classes, name=f"out{i}")(x) for i in range(outputs)]
    keras.Model(inp, outs if outputs > 1 else outs[0]).save(path)
    return path


def nothing_trained_or_written(tmp_path, proc):
    assert "baseline: training" not in proc.stdout
    assert not (tmp_path / "runs" / "chk").exists()


# -- data: what loading fixes or refuses (data.py) ------------------------------------------------

def test_one_hot_labels_are_accepted(tmp_path):
    data = write_npz(tmp_path / "d.npz", y=lambda a: np.eye(10, dtype=np.float32)[a])
    proc = run(tmp_path, data=data)
    assert proc.returncode == 0, proc.stderr[-2000:]
    d = load_dataset({"name": "npz", "path": str(data), "val_split": 0.0})
    assert d.y_train.shape == (120,) and np.array_equal(d.y_train, BASE["y_train"][:120])


def test_label_column_is_squeezed(tmp_path):
    data = write_npz(tmp_path / "d.npz", y=lambda a: a[:, None])
    d = load_dataset({"name": "npz", "path": str(data), "val_split": 0.0})
    assert d.y_train.shape == (120,) and d.num_classes == 10


@pytest.mark.parametrize("labels, pieces", [
    (lambda a: a.astype(np.float32) + 0.5, ["y_train must be whole class indices", ".5"]),
    (lambda a: -a.astype(np.int64) - 1, ["y_train must be class indices 0..K-1", "-"]),
    (lambda a: np.full((len(a), 10), 0.1, np.float32), ["not one-hot", "y.argmax(axis=1)"]),
], ids=["fractional", "negative", "soft"])
def test_labels_that_are_not_class_indices_are_refused(tmp_path, labels, pieces):
    proc = run(tmp_path, data=write_npz(tmp_path / "d.npz", y=labels))
    assert_one_line_error(proc, "d.npz", *pieces)


@pytest.mark.parametrize("images, pieces", [
    (lambda a: a.reshape(len(a), 784), ["flat vectors (120, 784)", "x.reshape(-1, 28, 28, 1)"]),
    (lambda a: a.astype(np.complex64), ["dtype complex64", "astype('float32')"]),
    (lambda a: a.astype(np.int32) * 257, ["integer values up to", "uint8"]),
], ids=["flat", "complex", "16-bit"])
def test_images_that_cannot_be_read_are_refused_naming_the_fix(tmp_path, images, pieces):
    proc = run(tmp_path, data=write_npz(tmp_path / "d.npz", x=images))
    assert_one_line_error(proc, "x_train", *pieces)


def test_empty_test_split_is_refused(tmp_path):
    proc = run(tmp_path, data=write_npz(tmp_path / "d.npz", n_test=0))
    assert_one_line_error(proc, "the test split is empty", "give test images")


def test_images_and_labels_of_different_length_name_both_counts(tmp_path):
    data = write_npz(tmp_path / "d.npz", y_train=BASE["y_train"][:119])
    assert_one_line_error(run(tmp_path, data=data), "x_train has 120 images but y_train has 119 labels")


def test_train_and_test_images_of_different_shapes(tmp_path):
    data = write_npz(tmp_path / "d.npz", x_test=np.zeros((40, 32, 32, 1), np.uint8))
    assert_one_line_error(run(tmp_path, data=data), "training images are (28, 28, 1)", "(32, 32, 1)")


def test_channels_first_images_for_a_zoo_model(tmp_path):
    data = write_npz(tmp_path / "d.npz", x=lambda a: a[:, None])
    assert_one_line_error(run(tmp_path, data=data), "channels-first", "x.transpose(0, 2, 3, 1)")


def test_zoo_model_that_cannot_be_built_for_tiny_images(tmp_path):
    data = write_npz(tmp_path / "d.npz", x=lambda a: a[:, :2, :2])
    assert_one_line_error(run(tmp_path, "lenet5", data=data), "'lenet5' cannot be built", "(2, 2, 1)")


# -- data against model (checks.py; through the CLI once api.setup calls check_inputs) -------------

def test_model_with_two_outputs_is_refused_before_training(tmp_path):
    proc = run(tmp_path, save_cnn(tmp_path / "two.keras", outputs=2))
    assert_one_line_error(proc, "has 2 outputs", "single-output", "one output")
    nothing_trained_or_written(tmp_path, proc)


def test_channels_first_images_for_a_model_file(tmp_path):
    data = write_npz(tmp_path / "d.npz", x=lambda a: a[:, None])
    proc = run(tmp_path, save_cnn(tmp_path / "m.keras"), data=data)
    assert_one_line_error(proc, "(1, 28, 28)", "(28, 28, 1)", "channels-first", "x.transpose(0, 2, 3, 1)")
    nothing_trained_or_written(tmp_path, proc)


def test_rgb_images_for_a_grayscale_model(tmp_path):
    data = write_npz(tmp_path / "d.npz", x=lambda a: np.repeat(a[..., None], 3, -1))
    proc = run(tmp_path, save_cnn(tmp_path / "m.keras"), data=data)
    assert_one_line_error(proc, "RGB", "grayscale", "x.mean(axis=-1, keepdims=True)")


def test_labels_beyond_the_model_outputs(tmp_path):
    proc = run(tmp_path, save_cnn(tmp_path / "five.keras", classes=5))
    assert_one_line_error(proc, "labels go up to 9", "has 5 outputs")
    nothing_trained_or_written(tmp_path, proc)


def test_no_training_images_left_after_the_validation_split(tmp_path):
    proc = run(tmp_path, data=write_npz(tmp_path / "d.npz", n_train=2), val_split=0.9)
    assert_one_line_error(proc, "no training images", "data.val_split 0.9", "lower it")
    nothing_trained_or_written(tmp_path, proc)


def test_no_training_images_at_all(tmp_path):
    proc = run(tmp_path, data=write_npz(tmp_path / "d.npz", n_train=0))
    assert_one_line_error(proc, "no training images", "x_train")
    nothing_trained_or_written(tmp_path, proc)


def test_search_without_validation_images_is_refused_before_the_baseline(tmp_path):
    proc = run(tmp_path, val_split=0.0, search={"optimizer": "random", "trials": 2})
    assert_one_line_error(proc, "validation split", "empty", "data.val_split")
    nothing_trained_or_written(tmp_path, proc)


# -- check_inputs directly ------------------------------------------------------------------------

def dataset(shape=(28, 28, 1), n=8, classes=10, n_val=2):
    x = np.zeros((n, *shape), np.float32)
    y = np.arange(n, dtype=np.int32) % classes
    return Dataset("t", x[n_val:], y[n_val:], x[:n_val], y[:n_val], x, y, num_classes=classes)


def cnn(shape=(28, 28, 1), classes=10, outputs=1, flat=False):
    import keras
    inp = keras.Input(shape)
    x = keras.layers.Flatten()(inp) if flat else keras.layers.GlobalAveragePooling2D()(inp)
    outs = [keras.layers.Dense(classes)(x) for _ in range(outputs)]
    return keras.Model(inp, outs if outputs > 1 else outs[0], name="m")


CFG = load_config({"data": {"name": "npz", "path": "x.npz"}, "model": {"name": "seed_cnn"}})


@pytest.mark.parametrize("data, model, pieces", [
    (dataset(), cnn(outputs=3), ["has 3 outputs", "keras.Model(model.input, model.outputs[0])"]),
    (dataset(), cnn(classes=1), ["1 output unit", "Dense(num_classes)"]),
    (dataset((1, 28, 28)), cnn(), ["channels-first", "transpose(0, 2, 3, 1)"]),
    (dataset((28, 28, 1)), cnn((32, 32, 3)), ["resize the images to (32, 32, 3)"]),
    (dataset((28, 28, 1)), cnn((28, 28, 3)), ["grayscale but the model takes RGB", "np.repeat(x, 3, axis=-1)"]),
    (dataset((28, 28, 1)), cnn((784,), flat=True), ["takes (784,)", "image input"]),
    (dataset(classes=10), cnn(classes=4), ["labels go up to 9", "4 outputs", "labels 0..3"]),
    (dataset(n=2, n_val=2), cnn(), ["no training images", "data.val_split"]),
], ids=["outputs", "one-unit", "channels-first", "size", "gray-rgb", "flat-model", "labels", "no-train"])
def test_check_inputs_refuses_in_one_line(data, model, pieces):
    with pytest.raises(PocketFlowError) as e:
        check_inputs(CFG, data, model)
    msg = str(e.value)
    assert "\n" not in msg
    for p in pieces:
        assert p in msg, msg


def test_check_inputs_accepts_what_fits():
    check_inputs(CFG, dataset(), cnn())
    check_inputs(CFG, dataset(classes=3), cnn(classes=10))  # fewer classes in the data than outputs
    check_inputs(CFG, dataset((28, 28, 1)), cnn((None, None, 1)))  # any image size


def test_check_inputs_needs_validation_images_only_for_a_search():
    search = load_config({**CFG.raw, "search": {"optimizer": "random"}})
    check_inputs(CFG, dataset(n_val=0), cnn())
    with pytest.raises(PocketFlowError, match="validation split"):
        check_inputs(search, dataset(n_val=0), cnn())


# -- model paths (zoo.py) -------------------------------------------------------------------------

def test_saved_model_directory_says_how_to_make_a_keras_file(tmp_path):
    import keras
    inp = keras.Input((28, 28, 1))
    m = keras.Model(inp, keras.layers.Dense(10)(keras.layers.Flatten()(inp)))
    m.export(tmp_path / "exported", verbose=False)
    for name in (tmp_path / "exported", "exported"):  # a path, and a bare name in the working directory
        proc = run(tmp_path, name)
        assert_one_line_error(proc, "SavedModel", "needs a .keras file", "model.save('model.keras')")


def test_directory_as_model_is_not_reported_missing(tmp_path):
    from pocketflow.zoo import load_keras_file
    (tmp_path / "models").mkdir()
    save_cnn(tmp_path / "models" / "a.keras")
    proc = run(tmp_path, tmp_path / "models")
    line = assert_one_line_error(proc, "is a directory, not a .keras model file", "a.keras")
    assert "not found" not in line
    (tmp_path / "r" / "best").mkdir(parents=True)
    save_cnn(tmp_path / "r" / "best" / "model.keras")
    with pytest.raises(PocketFlowError, match="run directory.*best/model.keras"):
        load_keras_file(tmp_path / "r")
    with pytest.raises(PocketFlowError, match="model file not found"):
        load_keras_file(tmp_path / "nothing.keras")


# -- config keys that would be silently ignored (config.py) ---------------------------------------

BASECFG = {"data": {"name": "npz", "path": "x.npz"}, "model": {"name": "seed_cnn"}}


@pytest.mark.parametrize("extra, pieces", [
    ({"search": {"optimizer": "none", "trials": 5}}, ["'search.trials' has no effect", "search.optimizer: none"]),
    ({"search": {"fix": {"a": 1}}}, ["'search.fix' has no effect"]),
    ({"search": {"space": {"fine_tune/learning_rate": [1e-4, 1e-2]}}}, ["'search.space' has no effect"]),
    ({"data": {"name": "mnist", "path": "x.npz"}}, ["'data.path' has no effect", "data.name: mnist"]),
    ({"data": {"name": "npz", "path": "x.npz", "image_size": [8, 8]}}, ["'data.image_size' has no effect"]),
    ({"model": {"name": "m.keras", "args": {"filters": 4}}}, ["'model.args' has no effect", "m.keras"]),
    ({"export": {"formats": ["keras"], "quantize": "int8"}}, ["'export.quantize' has no effect", "tflite"]),
    ({"learner": {"name": "weight_sparsity", "distill": {"temperature": 2.0}}},
     ["'learner.distill.temperature' has no effect", "learner.distill.enabled"]),
    ({"name": ""}, ["'name' must be a plain directory name"]),
    ({"name": "../elsewhere"}, ["'name' must be a plain directory name"]),
    ({"seed": -1}, ["'seed' must be >= 0"]),
    ({"data": {"name": "npz", "path": "x.npz", "limit_train": 0}}, ["'data.limit_train' must be > 0"]),
    ({"train": {"steps": -1}}, ["'train.steps' must be > 0"]),
    ({"data": {"name": "directory", "path": "d", "image_size": [8]}}, ["'data.image_size' must be [height, width]"]),
], ids=lambda v: str(v)[:40] if isinstance(v, dict) else None)
def test_config_refuses_keys_without_effect_or_meaning(extra, pieces):
    with pytest.raises(ConfigError) as e:
        load_config({**BASECFG, **extra})
    for p in pieces:
        assert p in str(e.value), str(e.value)


def test_keys_that_take_effect_are_still_accepted():
    load_config({**BASECFG, "search": {"optimizer": "random", "trials": 5, "fix": {"a": 1}}})
    load_config({**BASECFG, "learner": {"name": "weight_sparsity", "distill": {"enabled": True, "temperature": 2.0}}})
    load_config({**BASECFG, "learner": {"name": "distillation", "distill": {"temperature": 2.0}}})
    load_config({**BASECFG, "export": {"formats": ["tflite"], "quantize": "int8"}})
    load_config({**BASECFG, "search": {"optimizer": "none"}})


def test_search_key_with_optimizer_none_is_refused_by_the_cli(tmp_path):
    proc = run(tmp_path, search={"optimizer": "none", "trials": 5})
    assert_one_line_error(proc, "'search.trials' has no effect", "search.optimizer")


# -- normal output ---------------------------------------------------------------------------------

def test_a_search_prints_no_tf_function_retracing_warning(tmp_path):
    """Every trial predicts with new models, each traced once by design (pocketflow.metrics)."""
    data = write_npz(tmp_path / "d.npz", n_train=300, n_test=100)
    proc = run(tmp_path, data=data, subprocess=True, learner={"name": "weight_sparsity", "fine_tune": {"verbose": False}},
               target={"metric": "packed_size", "ratio": 2}, search={"optimizer": "random", "trials": 4, "pruner": "none", "trial_steps": 3})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "retracing" not in proc.stderr
