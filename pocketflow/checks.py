"""The data against the model and the config, checked before anything is trained or written.

Why a module of its own: data.py knows arrays and zoo.py knows models, but a mismatch between
them (images the model cannot take, labels past its outputs, a search without a validation
split) only shows once both are loaded, and today shows as a traceback or a NaN loss minutes
into training. `check_inputs` runs right after loading; every refusal is one line naming the fix.
"""
from __future__ import annotations

from pocketflow.errors import PocketFlowError


def check_inputs(cfg, data, model) -> None:
    """Refuse (PocketFlowError, one line) a data set and model that cannot be trained together."""
    check_model_io(model)
    check_images(data.input_shape, model)
    check_labels(data, model)
    check_splits(cfg, data)


def _shape(shape) -> tuple:
    return tuple(shape) if isinstance(shape, (tuple, list)) else ()


def check_model_io(model) -> None:
    """One image input and one (N, classes) output: what every learner and the exporter assume."""
    name = getattr(model, "name", "the model")
    n_in, n_out = len(model.inputs), len(model.outputs)
    if n_out != 1:
        raise PocketFlowError(f"model '{name}' has {n_out} outputs; PocketFlow compresses single-output "
                              "classifiers: build a model with one output (the class logits), e.g. "
                              "keras.Model(model.input, model.outputs[0])")
    if n_in != 1:
        raise PocketFlowError(f"model '{name}' has {n_in} inputs; PocketFlow feeds one image batch: "
                              "build a model with a single image input")
    out = _shape(model.output_shape)
    if len(out) != 2:
        raise PocketFlowError(f"model '{name}' outputs shape {out[1:]} per image; PocketFlow compresses "
                              "classifiers with one logit per class: end the model with Dense(num_classes)")
    if out[1] is not None and out[1] < 2:
        raise PocketFlowError(f"model '{name}' has {out[1]} output unit; PocketFlow compresses classifiers "
                              "with one output per class (at least 2): end the model with Dense(num_classes)")


def channels_first(shape) -> tuple | None:
    """The channels-last shape an image of `shape` would have if it is channels-first, else None."""
    shape = tuple(shape)
    if len(shape) == 3 and shape[0] in (1, 3, 4) and shape[2] not in (1, 3, 4) and shape[1] > 4:
        return (shape[1], shape[2], shape[0])
    return None


def check_images(got: tuple, model) -> None:
    """The data's image shape (H, W, C) against the model's input, with the likely fix."""
    want = _shape(model.input_shape)[1:]
    got = tuple(got)
    if len(want) == len(got) and all(w is None or w == g for w, g in zip(want, got)):
        return
    pre = f"the images are {got} but the model takes {want}"
    if channels_first(got) is not None and _fits(channels_first(got), want):
        raise PocketFlowError(f"{pre}: the images look channels-first (N, C, H, W); convert them to "
                              "channels-last with x.transpose(0, 2, 3, 1)")
    if len(want) != 3:
        raise PocketFlowError(f"{pre}: PocketFlow feeds image batches (N, H, W, C); give the model an image "
                              "input (e.g. keras.Input((H, W, C)) followed by Flatten or Reshape)")
    if _fits(got[:2], want[:2]) and (got[2], want[2]) in ((3, 1), (1, 3)):
        fix = "x.mean(axis=-1, keepdims=True)" if got[2] == 3 else "np.repeat(x, 3, axis=-1)"
        kind = {1: "grayscale", 3: "RGB"}
        raise PocketFlowError(f"{pre}: the images are {kind[got[2]]} but the model takes {kind[want[2]]}; "
                              f"convert them with {fix}")
    raise PocketFlowError(f"{pre}: resize the images to {want} or use a model built for {got} "
                          "(zoo models take the data's shape)")


def _fits(got, want) -> bool:
    return len(got) == len(want) and all(w is None or w == g for w, g in zip(want, got))


def check_labels(data, model) -> None:
    """Every label must name one of the model's outputs."""
    units = _shape(model.output_shape)[-1]
    top = data.num_classes - 1
    if units is not None and top >= units:
        raise PocketFlowError(f"the labels go up to {top} ({data.num_classes} classes) but model "
                              f"'{model.name}' has {units} outputs: use a model with {data.num_classes} "
                              f"outputs, or labels 0..{units - 1}")


def check_splits(cfg, data) -> None:
    """Training images left after the validation split; a validation split when a search scores on it."""
    from pocketflow.distributed import world
    n_val, n_train = len(data.x_val), len(data.x_train)
    val_split = cfg["data"]["val_split"]
    if n_train == 0:
        why = (f"data.val_split {val_split:g} takes all {n_val} to validation: lower it or give more images"
               if n_val else "give training images (x_train)")
        raise PocketFlowError(f"no training images: {why}")
    size = world().size
    if n_train < size:
        raise PocketFlowError(f"{n_train} training image(s) cannot be shared between {size} Horovod ranks: "
                              "give more images or run fewer ranks")
    if cfg["search"]["optimizer"] != "none" and n_val == 0:
        raise PocketFlowError(f"the search scores trials on the validation split, which is empty with "
                              f"{n_train} training image(s) and data.val_split {val_split:g}: raise "
                              "data.val_split or give more images")
