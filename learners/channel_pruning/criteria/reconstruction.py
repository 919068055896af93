"""`reconstruction` (He et al. 2017): for each group, in network order, sample the inputs of the
layers that read it on training images; choose channels by LASSO on each channel's contribution
to those layers' original outputs; then refit their kernels by least squares on the
already-pruned network's features, so later layers absorb earlier errors."""
from __future__ import annotations

import math
import warnings

import numpy as np

from pocketflow.learners.channel_pruning.counts import top_k
from pocketflow.learners.channel_pruning.criteria.base import calibration, kernel, pruned, register_criterion, run
from pocketflow.learners.channel_pruning.criteria.norm import filter_norm


class _Rows:
    """A reader layer's input as regression rows (n, S*C_in): its kernel's receptive-field
    patches (Conv2D) or input vectors (Dense), at fixed sampled output positions."""

    SUPPORTED = ("Conv2D", "Dense")

    def __init__(self, graph, layer, n_images: int, per_image: int, rng):
        self.layer = layer
        self.kernel = kernel(graph, layer)
        self.taps = math.prod(self.kernel.shape[:-2])  # S: kernel positions per input channel
        shape = tuple(layer.output.shape)
        spots = math.prod(shape[1:-1]) if len(shape) > 2 else 1
        self.pos = None if spots == 1 else rng.integers(0, spots, (n_images, per_image))

    def __call__(self, x: np.ndarray, start: int) -> np.ndarray:
        import tensorflow as tf
        L = self.layer
        if type(L).__name__ == "Conv2D":
            kh, kw = L.kernel_size
            x = tf.image.extract_patches(x, [1, kh, kw, 1], [1, *L.strides, 1], [1, *L.dilation_rate, 1],
                                         L.padding.upper()).numpy()
        x = x.reshape(len(x), -1, x.shape[-1])
        if self.pos is not None:
            x = np.take_along_axis(x, self.pos[start:start + len(x), :, None], axis=1)
        return x.reshape(-1, x.shape[-1])


def _rows(model, readers: dict, x: np.ndarray, then=None) -> dict:
    """name -> (n, S*C_in) rows of each reader's input in `model` (which may be pruned), or
    `then(name, rows)` of them, applied batch by batch to keep memory small."""
    names = list(readers)
    out = {n: [] for n in names}
    start = 0
    for vals in run(model, [model.get_layer(n).input for n in names], x):
        for n, v in zip(names, vals):
            rows = readers[n](v, start)
            out[n].append(rows if then is None else then(n, rows))
        start += len(vals[0])
    return {n: np.concatenate(v) for n, v in out.items()}


def _expand(rows: np.ndarray, mask: np.ndarray, s: int) -> np.ndarray:
    """Rows of a pruned reader back in the original (S, C_in) coordinates, zeros where pruned."""
    if mask.all():
        return rows
    full = np.zeros((len(rows), s, len(mask)), rows.dtype)
    full[:, :, mask] = rows.reshape(len(rows), s, -1)
    return full.reshape(len(rows), -1)


def _lasso_gram(rows, kernel, target, chan, size):
    """Gram matrix and correlation of the per-channel contributions to a reader's output.

    Channel c contributes Z_c = rows[:, q in c] @ kernel[q in c] to the output; the LASSO over
    channel weights b minimises |y - sum_c b_c Z_c|^2, whose normal equations only need
    <Z_c, Z_d> and <Z_c, y>, computed here without forming the (rows, C, C_out) tensor Z.
    `y` is the target minus what the channels of other groups contribute.
    """
    mine = chan >= 0
    xg, kg = rows[:, mine], kernel[mine]
    y = target - rows[:, ~mine] @ kernel[~mine]
    onehot = np.eye(size)[chan[mine]]
    w = 1.0 / max(float(np.mean(target ** 2)), 1e-12)  # every reader counts the same
    return (w * onehot.T @ (((xg.T @ xg) * (kg @ kg.T)) @ onehot),
            w * onehot.T @ (xg * (y @ kg.T)).sum(0))


def _lasso_select(gram, xy, k: int, n: int) -> np.ndarray:
    """The k channels that stay longest on the LASSO path (least-angle regression)."""
    from sklearn.linear_model import lars_path_gram
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate (dead) channels are expected
        _, _, coefs = lars_path_gram(xy, gram, n_samples=n, method="lasso", max_iter=10 * len(xy))
    enough = (coefs != 0).sum(0) >= k
    j = int(np.argmax(enough)) if enough.any() else coefs.shape[1] - 1
    return top_k(np.abs(coefs[:, j]), k, tie=np.diag(gram))


def _refit(rows, cols, target, kernel) -> np.ndarray | None:
    """Least-squares kernel on the kept input columns (ridge-stabilised), or None if too few rows."""
    a = rows[:, cols]
    if len(a) < 2 * a.shape[1]:
        return None  # e.g. a wide Dense behind Flatten with few calibration images
    ata = a.T @ a
    ata[np.diag_indices_from(ata)] += 1e-4 * np.trace(ata) / len(ata) + 1e-12
    k = np.zeros_like(kernel)
    k[cols] = np.linalg.solve(ata, a.T @ target)
    return k


@register_criterion("reconstruction")
def _reconstruction(learner, model, graph, counts, data):
    """He et al. 2017, group by group in network order (see the module docstring)."""
    x, _ = calibration(learner, data)
    rng = np.random.default_rng(learner.seed)
    todo = pruned(graph, counts)
    readers = {n: _Rows(graph, model.get_layer(n), len(x), 8, rng)
               for n in sorted({c for g in todo for c in g.consumers})
               if type(model.get_layer(n)).__name__ in _Rows.SUPPORTED}
    kernels = {n: r.kernel.reshape(-1, r.kernel.shape[-1]) for n, r in readers.items()}  # (S*C_in, C_out)
    target = _rows(model, readers, x, then=lambda n, r: r @ kernels[n])  # the original outputs
    keep, overrides, refit, fallback = graph.full_keep(), {}, [], []
    for g in todo:
        mine = [c for c in g.consumers if c in readers]
        if not mine:  # nothing to reconstruct against (e.g. only SeparableConv readers)
            keep[g.id] = top_k(filter_norm(graph, model, g, 1), counts[g.id])
            fallback.append(g.name)
            continue
        # features of the network pruned so far (refits included), in the original coordinates
        changed = overrides or any(len(v) < graph.groups[i].size for i, v in keep.items())
        current = graph.prune(model, keep, overrides) if changed else model
        feats = {n: _expand(r, graph.mask(graph.lay_in[n], keep), readers[n].taps)
                 for n, r in _rows(current, {n: readers[n] for n in mine}, x).items()}
        gram, xy = np.zeros((g.size, g.size)), np.zeros(g.size)
        for n in mine:
            lay = graph.lay_in[n]
            chan = np.tile(np.where(lay.group == g.id, lay.index, -1), readers[n].taps)
            gg, gx = _lasso_gram(feats[n], kernels[n], target[n], chan, g.size)
            gram, xy = gram + gg, xy + gx
        keep[g.id] = _lasso_select(gram, xy, counts[g.id], len(x))
        for n in mine:
            k = _refit(feats[n], np.tile(graph.mask(graph.lay_in[n], keep), readers[n].taps), target[n], kernels[n])
            if k is not None:
                kernels[n] = k
                overrides[n] = {"kernel": k.reshape(readers[n].kernel.shape).astype(np.float32)}
                refit += [n] if n not in refit else []
    return keep, overrides, {"refit_layers": refit, "norm_fallback_groups": fallback}
