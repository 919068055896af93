"""Datasets: named (keras.datasets and its offline cache), `.npz` files, image directories.

Everything becomes a `Dataset` of numpy arrays (float32 in [0, 1], NHWC) with a
validation split carved from the training set: the search scores on validation,
the test split is only for the final report.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pocketflow.errors import PocketFlowError
from pocketflow.registry import Registry

DATASETS: Registry[Callable[[dict], tuple]] = Registry("dataset")


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    augment: bool = False

    @property
    def input_shape(self) -> tuple:
        return tuple(self.x_train.shape[1:])

    def representative(self, n: int = 200, seed: int = 0) -> np.ndarray:
        """Training images for int8 calibration (never validation or test)."""
        idx = np.random.default_rng(seed).permutation(len(self.x_train))[:n]
        return self.x_train[idx]

    def split(self, which: str):
        return {"train": (self.x_train, self.y_train), "val": (self.x_val, self.y_val),
                "test": (self.x_test, self.y_test)}[which]


def _keras_cache(module: str) -> Path:
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "datasets" / f"{module}.npz"


def _keras_dataset(module: str):
    def load(cfg):
        import keras
        cached = _keras_cache(module)
        if module == "mnist" and cached.is_file():
            # the same arrays as Keras's download, but maybe not its bytes: keras.datasets would
            # fail the file's hash, delete it and try the network (offline: the data is gone)
            return load_npz({"path": str(cached)})
        try:
            return getattr(keras.datasets, module).load_data()
        except Exception as e:  # network failure on a machine without the cache
            raise PocketFlowError(
                f"dataset '{module}' could not be loaded ({type(e).__name__}); it downloads on first use "
                f"into ~/.keras/datasets — run scripts/setup.sh or give data.path to an .npz") from None
    return load


for _name in ("mnist", "fashion_mnist", "cifar10", "cifar100"):
    DATASETS.register(_name)(_keras_dataset(_name))


@DATASETS.register("npz")
def load_npz(cfg):
    path = Path(cfg["path"] or "")
    if not path.is_file():
        raise PocketFlowError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
            if missing:
                raise PocketFlowError(f"{path}: .npz lacks arrays {', '.join(missing)} "
                                      "(needs x_train, y_train, x_test, y_test)")
            return (z["x_train"], z["y_train"]), (z["x_test"], z["y_test"])
    except PocketFlowError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise PocketFlowError(f"{path}: not a readable .npz file ({e})") from None


@DATASETS.register("directory")
def load_directory(cfg):
    """`root/{train,test}/<class>/*.png|jpg`; or `root/<class>/*` split 80/20 by a fixed seed."""
    import keras
    root = Path(cfg["path"] or "")
    if not root.is_dir():
        raise PocketFlowError(f"image directory not found: {root}")
    size = tuple(cfg.get("image_size") or (32, 32))

    def read(d):
        classes = sorted(p.name for p in d.iterdir() if p.is_dir())
        xs, ys = [], []
        for ci, c in enumerate(classes):
            for f in sorted((d / c).iterdir()):
                if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"):
                    img = keras.utils.load_img(f, target_size=size)
                    xs.append(keras.utils.img_to_array(img))
                    ys.append(ci)
        if not xs:
            raise PocketFlowError(f"{d}: no images found in class sub-directories")
        return np.stack(xs).astype(np.uint8), np.array(ys)

    if (root / "train").is_dir():
        return read(root / "train"), read(root / ("test" if (root / "test").is_dir() else "train"))
    x, y = read(root)
    idx = np.random.default_rng(0).permutation(len(x))
    cut = int(0.8 * len(x))
    return (x[idx[:cut]], y[idx[:cut]]), (x[idx[cut:]], y[idx[cut:]])


MAX_CLASSES = 100_000  # more class indices than this is a mistake (an ID column, a pixel value)


def _flat_hint(n: int) -> str:
    """The reshape a flat image vector of `n` values most likely came from."""
    for c in (1, 3):
        side = int(round((n / c) ** 0.5))
        if side * side * c == n:
            return f"x.reshape(-1, {side}, {side}, {c})"
    return "x.reshape(-1, H, W, C)"


def _prepare(x: np.ndarray, what: str = "images") -> np.ndarray:
    """Images as float32 NHWC in [0, 1]; refuse, in one line naming the fix, what cannot be."""
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise PocketFlowError(f"{what} have dtype {x.dtype}; PocketFlow reads numeric images "
                              "(uint8 0-255 or float 0-1): convert them with x.astype('float32')")
    if x.ndim == 2:
        raise PocketFlowError(f"{what} are flat vectors {x.shape}; PocketFlow needs images (N, H, W) "
                              f"or (N, H, W, C): reshape them, e.g. {_flat_hint(x.shape[1])}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise PocketFlowError(f"{what} must be (N, H, W) or (N, H, W, C), got shape {x.shape}")
    if x.dtype.kind == "f" and x.size and not np.isfinite(x).all():
        raise PocketFlowError(f"{what} contain NaN or infinite values")
    if x.dtype.kind in "iu" and x.max(initial=0) > 255:
        raise PocketFlowError(f"{what} have integer values up to {x.max()}; integer images are read as "
                              "0-255: scale them to uint8 or to float 0-1")
    if x.dtype == np.uint8 or x.max(initial=0) > 1.5:
        return (x.astype(np.float32) / 255.0)
    return x.astype(np.float32)


def _labels(y, what: str = "labels") -> np.ndarray:
    """Class indices as int32 (N,): a (N, 1) column is squeezed, one-hot rows become their argmax;
    anything else that is not a non-negative whole number is refused rather than truncated."""
    y = np.asarray(y)
    if y.dtype.kind not in "biuf":
        raise PocketFlowError(f"{what} have dtype {y.dtype}; labels must be integer class indices")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    elif y.ndim == 2 and y.shape[1] > 1:
        onehot = len(y) == 0 or (np.isin(y, (0, 1)).all() and (y.sum(axis=1) == 1).all())
        if not onehot:
            raise PocketFlowError(f"{what} are {y.shape} rows that are not one-hot; PocketFlow needs class "
                                  "indices (N,): convert them with y.argmax(axis=1)")
        y = y.argmax(axis=1)
    elif y.ndim != 1:
        raise PocketFlowError(f"{what} must be class indices of shape (N,), got shape {y.shape}")
    if y.dtype.kind == "f":
        bad = y[~(np.isfinite(y) & (y == np.round(y)))]
        if bad.size:
            raise PocketFlowError(f"{what} must be whole class indices, got {bad[0]!r}; "
                                  "round or map them to 0..K-1")
    if y.size and y.min() < 0:
        raise PocketFlowError(f"{what} must be class indices 0..K-1, got {y.min()!r}")
    if y.size and y.max() >= MAX_CLASSES:
        raise PocketFlowError(f"{what} go up to {y.max()!r}: more than {MAX_CLASSES:,} classes, surely not "
                              "class indices 0..K-1")
    return y.astype(np.int32)


def _split(x, y, split: str, where: str):
    """(x, y) of one split, prepared and checked against each other."""
    x, y = _prepare(x, f"{where}: x_{split}"), _labels(y, f"{where}: y_{split}")
    if len(x) != len(y):
        raise PocketFlowError(f"{where}: x_{split} has {len(x)} images but y_{split} has {len(y)} labels; "
                              "they must pair up one to one")
    return x, y


def load_dataset(cfg: dict, seed: int = 0) -> Dataset:
    """Build the train/val/test arrays from the `data` config section."""
    name = cfg.get("name")
    if name is None:
        path = Path(cfg.get("path") or "")
        name = "directory" if path.is_dir() else "npz"
    where = str(cfg.get("path")) if name in ("npz", "directory") else f"dataset '{name}'"
    (x_tr, y_tr), (x_te, y_te) = DATASETS.get(name)(cfg)
    x_tr, y_tr = _split(x_tr, y_tr, "train", where)
    x_te, y_te = _split(x_te, y_te, "test", where)
    if cfg.get("limit_train"):
        x_tr, y_tr = x_tr[: cfg["limit_train"]], y_tr[: cfg["limit_train"]]
    if cfg.get("limit_test"):
        x_te, y_te = x_te[: cfg["limit_test"]], y_te[: cfg["limit_test"]]
    if not len(x_te):
        raise PocketFlowError(f"{where}: the test split is empty (x_test has no images); "
                              "PocketFlow reports accuracy on it: give test images")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise PocketFlowError(f"{where}: training images are {x_tr.shape[1:]} but test images are "
                              f"{x_te.shape[1:]}; both splits must have one image shape")
    # validation: a fixed, seeded subset of the training data
    idx = np.random.default_rng(seed).permutation(len(x_tr))
    n_val = int(round(len(x_tr) * float(cfg.get("val_split", 0.1))))
    val, tr = idx[:n_val], np.sort(idx[n_val:])
    num_classes = int(max(y_tr.max(initial=0), y_te.max(initial=0)) + 1)
    return Dataset(name=name, x_train=x_tr[tr], y_train=y_tr[tr], x_val=x_tr[val], y_val=y_tr[val],
                   x_test=x_te, y_test=y_te, num_classes=num_classes, augment=bool(cfg.get("augment")))


def augment_batch(x, seed=None):
    """Random 2-pixel shift + horizontal flip (the baselines' augmentation), in TF ops."""
    import tensorflow as tf
    shape = tf.shape(x)
    h, w = shape[1], shape[2]
    padded = tf.pad(x, [[0, 0], [2, 2], [2, 2], [0, 0]], mode="REFLECT")
    x = tf.image.random_crop(padded, tf.stack([shape[0], h, w, shape[3]]))
    flip = tf.random.uniform([shape[0], 1, 1, 1]) < 0.5
    return tf.where(flip, tf.reverse(x, axis=[2]), x)


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, *, shuffle: bool, seed: int = 0,
            epoch: int = 0, rank: int = 0, world: int = 1, drop_remainder: bool = False):
    """Yield (x, y) numpy batches in a seeded order.

    Under Horovod each *global* batch is split evenly between ranks, so N ranks with
    batch B/N see exactly the data a single process sees with batch B.
    """
    n = len(x)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        sel = order[start:start + batch_size]
        if len(sel) < batch_size:
            if drop_remainder:
                break
            sel = sel[: len(sel) - len(sel) % world]  # every rank gets the same share
            if len(sel) == 0:
                break
        if world > 1:
            per = len(sel) // world
            sel = sel[rank * per:(rank + 1) * per]
        yield x[sel], y[sel]
