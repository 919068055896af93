"""`discrimination` (Zhuang et al. 2018): auxiliary classifiers on intermediate feature maps
(logistic regression on pooled features) add their losses to the task loss; a channel's
importance is |activation x gradient| of that combined loss where its readers consume it."""
from __future__ import annotations

import warnings

import numpy as np

from pocketflow.learners.channel_pruning.counts import top_k
from pocketflow.learners.channel_pruning.criteria.base import calibration, pruned, register_criterion, run
from pocketflow.learners.topology import INPUT, OPAQUE


def _rank(layer) -> int:
    """Rank of the layer's output (0 for a layer called more than once: it has no single output)."""
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):
        return 0


def _aux_heads(model, graph, x, y, n_heads: int, seed: int):
    """Logistic-regression classifiers on spatially pooled feature maps at evenly spaced depths."""
    from sklearn.linear_model import LogisticRegression
    cands = [n for n in graph.order if graph.kinds[n] not in (INPUT, OPAQUE)
             and _rank(model.get_layer(n)) >= 3]
    if not cands or n_heads == 0 or len(np.unique(y)) < 2:
        return []
    picks = sorted({cands[min(len(cands) - 1, (i + 1) * len(cands) // (n_heads + 1))] for i in range(n_heads)})
    pooled = {n: [] for n in picks}
    for vals in run(model, [model.get_layer(n).output for n in picks], x):
        for n, v in zip(picks, vals):
            pooled[n].append(v.reshape(len(v), -1, v.shape[-1]).mean(1))
    heads = []
    for n in picks:
        f = np.concatenate(pooled[n])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf = LogisticRegression(max_iter=300, random_state=seed).fit(f, y)
        w, b = clf.coef_.T, clf.intercept_
        if w.shape[1] == 1:  # binary: sklearn keeps one logit
            w, b = np.concatenate([-w, w], 1) / 2, np.concatenate([-b, b]) / 2
        heads.append((n, w.astype(np.float32), b.astype(np.float32), clf.classes_, float(clf.score(f, y))))
    return heads


def _add_by_channel(values: np.ndarray, lay, out: dict) -> None:
    """Add per-position values (batch, positions of `lay`) into out[group] (batch, channels)."""
    for gid, acc in out.items():
        cols = lay.group == gid
        if cols.any():
            np.add.at(acc.T, lay.index[cols], values[:, cols].T)


@register_criterion("discrimination")
def _discrimination(learner, model, graph, counts, data):
    """Zhuang et al. 2018's importance: |activation x gradient| of task + auxiliary losses."""
    import keras
    import tensorflow as tf

    from pocketflow.training import _from_logits
    x, y = calibration(learner, data)
    todo = pruned(graph, counts)
    heads = _aux_heads(model, graph, x, y, learner.cfg["aux_heads"], learner.seed)
    readers = sorted({c for g in todo for c in g.consumers})
    inputs = list({id(model.get_layer(n).input): model.get_layer(n).input for n in readers}.values())
    slot = {n: [id(t) for t in inputs].index(id(model.get_layer(n).input)) for n in readers}
    lay = {slot[n]: graph.lay_in[n] for n in readers}
    probe = keras.Model(model.inputs, [model.outputs[0]] + [model.get_layer(h[0]).output for h in heads]
                        + inputs + [model.get_layer(n).output for n in readers])
    from_logits = _from_logits(model)
    imp = {g.id: np.zeros(g.size) for g in todo}
    nh, ni = len(heads), len(inputs)

    def ce(labels, logits, logit=True):
        return tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=logit))

    for i in range(0, len(x), 64):
        xb, yb = tf.constant(x[i:i + 64]), y[i:i + 64]
        with tf.GradientTape() as tape:
            out = probe(xb, training=False)
            loss = ce(yb, out[0], from_logits)
            for (name, w, b, classes, _), t in zip(heads, out[1:1 + nh]):
                pooled = tf.reduce_mean(tf.reshape(t, [tf.shape(t)[0], -1, t.shape[-1]]), 1)
                loss = loss + ce(np.searchsorted(classes, yb), pooled @ w + b)
        acts, outs = out[1 + nh:1 + nh + ni], out[1 + nh + ni:]
        g_out = tape.gradient(loss, outs)
        # the gradient reaching each reader's input through that reader only: pruning a channel
        # is zeroing it where it is read, not in the residual stream that carries it on
        with tf.GradientTape() as tape2:
            tape2.watch(acts)
            s = tf.add_n([tf.constant(0.0)] + [
                tf.reduce_sum(tf.stop_gradient(gy) * model.get_layer(n)(acts[slot[n]], training=False))
                for n, gy in zip(readers, g_out) if gy is not None])
        g_in = tape2.gradient(s, acts)
        per_sample = {g.id: np.zeros((len(yb), g.size)) for g in todo}
        for k, (a, ga) in enumerate(zip(acts, g_in)):
            if ga is not None:
                ag = (a * ga).numpy().reshape(len(yb), -1, a.shape[-1]).sum(1)  # (batch, positions)
                _add_by_channel(ag, lay[k], per_sample)
        for g in todo:
            imp[g.id] += np.abs(per_sample[g.id]).sum(0)  # a channel's effect per image, then summed
    keep = {g.id: top_k(imp[g.id], counts[g.id]) for g in todo}
    return keep, {}, {"aux_heads": {h[0]: round(h[4], 4) for h in heads}}
