"""Data loading, the model zoo and the metrics every later stage relies on."""
import numpy as np
import pytest

from pocketflow import metrics as M
from pocketflow.data import batches, load_dataset
from pocketflow.errors import PocketFlowError
from pocketflow.zoo import MODELS, build_model, load_keras_file, load_from_function


def test_npz_split_is_disjoint_and_scaled(small_npz):
    d = load_dataset({"name": "npz", "path": str(small_npz), "val_split": 0.2})
    assert len(d.x_train) + len(d.x_val) == 3000 and len(d.x_val) == 600
    assert d.x_train.dtype == np.float32 and d.x_train.max() <= 1.0 and d.x_train.shape[1:] == (28, 28, 1)
    assert d.num_classes == 10
    # validation images are not in the training split
    tr = {x.tobytes() for x in d.x_train[:500]}
    assert not any(x.tobytes() in tr for x in d.x_val)


def test_named_dataset_reads_offline_cache():
    d = load_dataset({"name": "fashion_mnist", "val_split": 0.1, "limit_train": 1000, "limit_test": 100})
    assert d.x_train.shape == (900, 28, 28, 1) and d.x_test.shape == (100, 28, 28, 1)


def test_missing_and_corrupt_npz(tmp_path):
    with pytest.raises(PocketFlowError, match="data file not found"):
        load_dataset({"name": "npz", "path": str(tmp_path / "x.npz")})
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(PocketFlowError, match="not a readable .npz"):
        load_dataset({"name": "npz", "path": str(bad)})
    np.savez(tmp_path / "partial.npz", x_train=np.zeros((2, 4, 4)))
    with pytest.raises(PocketFlowError, match="lacks arrays y_train, x_test, y_test"):
        load_dataset({"name": "npz", "path": str(tmp_path / "partial.npz")})


def test_image_directory(tmp_path):
    import keras
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(5):
            keras.utils.save_img(tmp_path / c / f"{i}.png", rng.integers(0, 255, (8, 8, 3)).astype("uint8"))
    d = load_dataset({"name": "directory", "path": str(tmp_path), "image_size": [8, 8], "val_split": 0.0})
    assert d.num_classes == 2 and d.x_train.shape[1:] == (8, 8, 3) and len(d.x_train) + len(d.x_test) == 10


def test_global_batches_split_evenly_between_ranks():
    x = np.arange(20)
    single = [b for b, _ in batches(x, x, 8, shuffle=True, seed=3, drop_remainder=True)]
    r0 = [b for b, _ in batches(x, x, 8, shuffle=True, seed=3, rank=0, world=2, drop_remainder=True)]
    r1 = [b for b, _ in batches(x, x, 8, shuffle=True, seed=3, rank=1, world=2, drop_remainder=True)]
    assert len(single) == len(r0) == len(r1) == 2
    for s, a, b in zip(single, r0, r1):
        assert np.array_equal(np.concatenate([a, b]), s)
    # without drop_remainder the last partial batch is still shared equally
    tail0 = list(batches(x, x, 8, shuffle=True, seed=3, rank=0, world=2))[-1][0]
    tail1 = list(batches(x, x, 8, shuffle=True, seed=3, rank=1, world=2))[-1][0]
    assert len(tail0) == len(tail1) == 2 and not set(tail0) & set(tail1)


@pytest.mark.parametrize("name", MODELS.names())
def test_zoo_builds_with_shape_and_classes(name):
    shape = (28, 28, 1) if name in ("seed_cnn", "lenet5") else (32, 32, 3)
    m = build_model(name, shape, 7, {"alpha": 0.25} if name.startswith("mobilenet") else None)
    assert m.output_shape == (None, 7) and m.input_shape == (None, *shape)


def test_seed_cnn_macs_match_hand_count():
    m = build_model("seed_cnn", (28, 28, 1), 10)
    macs = {r.name: r.macs for r in M.layer_costs(m)}
    assert macs["conv"] == 26 * 26 * 12 * 3 * 3 * 1 == 73008
    assert macs["logits"] == 13 * 13 * 12 * 10 == 20280


def test_resnet20_macs_match_hand_count():
    m = build_model("resnet20", (32, 32, 3), 10)
    # hand count of convs + fc: stem, 3 stages x 3 blocks x 2 convs, 2 projections
    hw = {16: 32 * 32, 32: 16 * 16, 64: 8 * 8}
    hand = hw[16] * 16 * 9 * 3
    for c, prev in ((16, 16), (32, 16), (64, 32)):
        hand += hw[c] * c * 9 * prev + hw[c] * c * 9 * c  # first block
        hand += 2 * (2 * hw[c] * c * 9 * c)  # two more blocks
        if c != prev:
            hand += hw[c] * c * prev  # 1x1 projection
    hand += 64 * 10
    assert abs(M.count_macs(m) - hand) / hand < 0.02
    assert abs(hand - 40.6e6) / 40.6e6 < 0.01


def test_depthwise_and_separable_macs():
    import keras
    inp = keras.Input((8, 8, 4))
    x = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(inp)
    x = keras.layers.SeparableConv2D(5, 3, padding="same", name="sep")(x)
    m = keras.Model(inp, x)
    macs = {r.name: r.macs for r in M.layer_costs(m)}
    assert macs["dw"] == 8 * 8 * 4 * 2 * 9
    assert macs["sep"] == 8 * 8 * 8 * 9 + 8 * 8 * 8 * 5


def test_corrupt_and_truncated_keras_files(tmp_path, trained_seed_cnn):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"garbage")
    with pytest.raises(PocketFlowError, match="corrupt or truncated"):
        load_keras_file(bad)
    good = tmp_path / "good.keras"
    trained_seed_cnn.save(good)
    cut = tmp_path / "cut.keras"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(PocketFlowError, match="corrupt"):
        load_keras_file(cut)
    assert load_keras_file(good).count_params() == trained_seed_cnn.count_params()


def test_lambda_model_refused_in_safe_mode(tmp_path):
    import keras
    inp = keras.Input((4,))
    m = keras.Model(inp, keras.layers.Lambda(lambda t: t * 2)(inp))
    p = tmp_path / "lam.keras"
    m.save(p)
    with pytest.raises(PocketFlowError, match="--unsafe-load"):
        load_keras_file(p)
    assert load_keras_file(p, unsafe=True) is not None


def test_module_function_models(tmp_path, monkeypatch):
    (tmp_path / "usermodels.py").write_text(
        "import keras\n"
        "def good(input_shape=(4,), num_classes=2):\n"
        "    i = keras.Input(input_shape); return keras.Model(i, keras.layers.Dense(num_classes)(i))\n"
        "def raises(**kw):\n    raise RuntimeError('boom')\n"
        "def not_model(**kw):\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_from_function("usermodels:good", (4,), 3).output_shape == (None, 3)
    with pytest.raises(PocketFlowError, match="raised RuntimeError: boom"):
        load_from_function("usermodels:raises", (4,), 3)
    with pytest.raises(PocketFlowError, match="returned int, not a keras.Model"):
        load_from_function("usermodels:not_model", (4,), 3)
    with pytest.raises(PocketFlowError, match="cannot import"):
        load_from_function("usermodels:missing", (4,), 3)


def test_gzip_size_is_deterministic(tmp_path):
    data = bytes(range(256)) * 100
    assert M.gzip_size(data) == M.gzip_size(data) < len(data)


def test_mnist_by_name_reads_the_offline_copy_without_deleting_it(tmp_path, monkeypatch, small_npz):
    """`data.name: mnist` offline: scripts/setup.sh puts an mnist.npz into the Keras cache, whose
    bytes need not match Keras's download hash (keras.datasets would delete it and go online)."""
    import numpy as np

    from pocketflow.data import load_dataset
    cache = tmp_path / "datasets"
    cache.mkdir()
    with np.load(small_npz) as z:
        arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    np.savez(cache / "mnist.npz", **arrays)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    d = load_dataset({"name": "mnist", "val_split": 0.0})
    assert d.x_train.shape[0] == len(arrays["x_train"]) and d.x_test.shape[0] == len(arrays["x_test"])
    assert (cache / "mnist.npz").is_file()
