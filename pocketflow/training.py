"""The one trainer every learner fine-tunes with.

A custom tf.function train step (not `Model.fit`) so that Horovod's gradient
averaging, extra loss terms (distillation, auxiliary heads) and per-step hooks
(mask schedules, codebook refreshes) all plug in the same way, for any Keras model.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pocketflow.data import Dataset, augment_batch, batches
from pocketflow.distributed import world
from pocketflow.errors import PocketFlowError, TrialFailed


class TrainHook:
    """Extension point of the trainer; every method is optional."""

    def loss(self, x, y, logits):
        """Extra loss term (a scalar tensor) added inside the gradient tape, or None."""
        return None

    def on_train_begin(self, trainer: "Trainer") -> None:
        """Before the first step; `trainer.optimizer` is built. Under Horovod rank 0's state
        (model and optimizer variables) is broadcast right after this, so changes made here
        need not be identical across ranks."""

    def after_step(self, step: int) -> None:
        """Python-side, after the optimizer update (e.g. a pruning schedule)."""

    def on_epoch_end(self, epoch: int, logs: dict) -> None:
        pass


@dataclass
class History:
    epochs: list = field(default_factory=list)  # dicts: epoch, loss, acc, val_acc, seconds
    steps: int = 0
    stopped_early: bool = False
    seconds: float = 0.0

    @property
    def best_val_acc(self) -> float:
        vals = [e["val_acc"] for e in self.epochs if e.get("val_acc") is not None]
        return max(vals) if vals else float("nan")


def _from_logits(model) -> bool:
    import keras
    act = getattr(model.layers[-1], "activation", None)
    return act is not keras.activations.softmax


def make_optimizer(cfg: dict, total_steps: int, lr_scale: float = 1.0):
    import keras
    lr = cfg["learning_rate"] * lr_scale
    if cfg["schedule"] == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(lr, max(1, total_steps))
    elif cfg["schedule"] == "step":
        b = [int(total_steps * 0.5), int(total_steps * 0.75)]
        lr = keras.optimizers.schedules.PiecewiseConstantDecay(b, [lr, lr * 0.1, lr * 0.01])
    wd = cfg.get("weight_decay") or None
    name = cfg["optimizer"]
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=cfg.get("momentum", 0.9), nesterov=True, weight_decay=wd)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(lr, weight_decay=wd)
    if name == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=wd or 1e-4)
    return keras.optimizers.Adam(lr, weight_decay=wd)


@dataclass(frozen=True)
class Plan:
    """How long `Trainer.fit` will run, known before it starts (the search needs it)."""
    global_batch: int
    lr_scale: int
    steps_per_epoch: int
    total_steps: int

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)


def plan(cfg: dict, n_train: int, epochs: float | None = None, steps: int | None = None,
         world_size: int = 1) -> Plan:
    """The Plan of a fit on `n_train` images with a `train`/`fine_tune` section (see Trainer)."""
    lr_scale = world_size if cfg.get("scale_lr", False) else 1
    global_batch = int(cfg["batch_size"]) * lr_scale
    # the batches pocketflow.data.batches yields: every full one, and a short last one cut to a
    # multiple of the world size unless that leaves nothing
    per_epoch = max(1, n_train // global_batch + (1 if n_train % global_batch >= world_size else 0))
    epochs = cfg["epochs"] if epochs is None else epochs
    steps = steps if steps is not None else cfg.get("steps")
    total = int(steps) if steps else int(math.ceil(epochs * per_epoch))
    return Plan(global_batch, lr_scale, per_epoch, total)


def budget_steps(cfg: dict, n_train: int, epochs: float | None, steps: int | None) -> int:
    """Optimizer steps a fine-tune of `epochs` or `steps` will run in this process's world (0 for
    an empty budget, which fine-tunes nothing): the one count schedules and pruners lay out on."""
    if not (steps or epochs):
        return 0
    return plan(cfg, n_train, epochs, steps, world().size).total_steps


class Trainer:
    """Fine-tunes `model` on `data` with the `train`/`fine_tune` config section.

    Under Horovod (see pocketflow.distributed) `batch_size` is the GLOBAL batch: each rank
    trains on its 1/N share of every batch of the single-process order and the gradients are
    averaged, so the update equals the single-process one with that batch (up to float
    rounding) and the learning rate must not change. `scale_lr: true` selects the other
    convention instead, the linear scaling rule (Goyal et al., 2017): `batch_size` is per rank,
    the global batch is N times larger, and the learning rate is multiplied by N. Either way
    every rank ends each step with identical weights, optimizer state and metrics.
    """

    def __init__(self, model, data: Dataset, cfg: dict, hooks=(), seed: int = 0,
                 checkpoint: str | Path | None = None, log_dir: str | Path | None = None):
        self.model, self.data, self.cfg, self.seed = model, data, cfg, seed
        self.hooks = list(hooks)
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.log_dir = Path(log_dir) if log_dir else None
        self.world = world()
        self.optimizer = None  # built by fit()

    # -- the compiled step ------------------------------------------------------------------
    def _build_step(self, optimizer):
        import keras
        import tensorflow as tf
        model, hooks, w = self.model, self.hooks, self.world
        smoothing = self.cfg.get("label_smoothing", 0.0)
        from_logits = _from_logits(model)
        augment = self.data.augment

        def task_loss(y, logits):
            if not smoothing:
                return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=from_logits)
            onehot = tf.one_hot(tf.cast(y, tf.int32), tf.shape(logits)[-1])
            return keras.losses.categorical_crossentropy(onehot, logits, from_logits=from_logits,
                                                         label_smoothing=smoothing)

        variables = model.trainable_variables
        x, y = self.data.x_train, self.data.y_train
        # a None batch dimension: one trace for the whole fit, the short last batch included
        signature = [tf.TensorSpec((None, *x.shape[1:]), tf.as_dtype(x.dtype)),
                     tf.TensorSpec((None,), tf.as_dtype(y.dtype))]

        @tf.function(input_signature=signature)
        def step(x, y):
            if augment:
                x = augment_batch(x)
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = tf.reduce_mean(task_loss(y, logits))
                total = loss
                for h in hooks:
                    extra = h.loss(x, y, logits)
                    if extra is not None:
                        total = total + extra
                if model.losses:
                    total = total + tf.add_n(model.losses)
            acc = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32),
                                                  tf.cast(y, tf.int32)), tf.float32))
            # one collective per step: the loss and accuracy ride with the gradients, and come
            # back global, so every rank takes the same decisions (NaN check, early stopping)
            *grads, total, acc = w.allreduce_grads([*tape.gradient(total, variables), total, acc])
            optimizer.apply_gradients([(g, v) for g, v in zip(grads, variables) if g is not None])
            return total, acc
        # one trace per fit by design (every trial is a new model and optimizer): TensorFlow's
        # "frequent retracing" warning, keyed by this function's code, would fire on short fits
        step._omit_frequent_tracing_warning = True
        return step

    def fit(self, epochs: float | None = None, steps: int | None = None,
            on_epoch_end: Callable[[int, dict], None] | None = None) -> History:
        """Train for `epochs` (may be fractional) or `steps`; evaluate on validation each epoch.

        `on_epoch_end(epoch, logs)` may raise (the search uses it to prune poor trials); under
        Horovod it sees the same global logs on every rank, so a deterministic decision agrees.
        """
        cfg, w = self.cfg, self.world
        p = plan(cfg, len(self.data.x_train), epochs, steps, w.size)
        step_fn = self._start(p)
        hist, best, bad_epochs = History(), -1.0, 0
        writer = self._summary_writer()
        t_start = time.perf_counter()
        for epoch in range(p.epochs):
            logs = self._epoch(step_fn, p, epoch, hist.steps)
            hist.epochs.append(logs)
            hist.steps = logs["steps"]
            self._log_epoch(logs, p.epochs, writer)
            for h in self.hooks:
                h.on_epoch_end(epoch, logs)
            score = logs["val_acc"] if logs["val_acc"] is not None else logs["acc"]
            if score > best:
                best, bad_epochs = score, 0
                if self.checkpoint is not None and w.is_root:
                    from pocketflow.io import atomic_save_model
                    atomic_save_model(self.model, self.checkpoint)
            else:
                bad_epochs += 1
            if on_epoch_end is not None:
                on_epoch_end(epoch, logs)
            if cfg.get("early_stopping") and bad_epochs >= cfg["early_stopping"]:
                hist.stopped_early = True
                break
            if hist.steps >= p.total_steps:
                break
        hist.seconds = time.perf_counter() - t_start
        return hist

    def _start(self, p: Plan):
        """Optimizer, hooks and an identical start on every rank; returns the compiled step."""
        self._check_batch(p.global_batch)
        self.optimizer = optimizer = make_optimizer(self.cfg, p.total_steps, p.lr_scale)
        if not self.model.built:
            self.model(self.data.x_train[:1])
        optimizer.build(self.model.trainable_variables)  # creates the slots and iteration counter
        for h in self.hooks:
            h.on_train_begin(self)
        # identical start on every rank, after the hooks (they may add or rewrite state): weights,
        # non-trainable state, optimizer slots and iteration counter
        self.world.broadcast_variables(self.model.variables + list(optimizer.variables))
        return self._build_step(optimizer)

    def _epoch(self, step_fn, p: Plan, epoch: int, step: int) -> dict:
        """One pass (or the plan's remainder of one) over this rank's shard; returns the logs."""
        data, w = self.data, self.world
        t0 = time.perf_counter()
        loss_sum, correct, seen, n_steps = 0.0, 0.0, 0, 0
        n_this = min(p.steps_per_epoch, p.total_steps - step)
        bar = self._bar(n_this, epoch, p.epochs)
        for i, (xb, yb) in enumerate(batches(data.x_train, data.y_train, p.global_batch, shuffle=True,
                                              seed=self.seed, epoch=epoch, rank=w.rank, world=w.size)):
            if i >= n_this:
                break
            loss, acc = step_fn(xb, yb)
            loss = float(loss)
            if not math.isfinite(loss):
                raise TrialFailed(f"loss became {loss} at step {step + 1} (epoch {epoch + 1}); "
                                  "try a lower learning rate")
            loss_sum += loss
            n_steps += 1
            correct += float(acc) * len(xb) * w.size  # every rank has an equal share
            seen += len(xb) * w.size
            step += 1
            for h in self.hooks:
                h.after_step(step)
            if bar is not None:
                bar.update(1)
                if i % 20 == 0:
                    bar.set_postfix(loss=f"{loss:.4f}")
        if bar is not None:
            bar.close()
        # float state each rank updated from its own shard (BN statistics, EMA ranges)
        w.average_variables(self.model.non_trainable_variables)
        logs = {"epoch": epoch + 1, "loss": loss_sum / n_steps if n_steps else float("nan"),
                "acc": correct / max(1, seen), "steps": step}
        logs["val_acc"] = self.evaluate("val") if len(data.x_val) else None
        logs["seconds"] = time.perf_counter() - t0
        return logs

    def _log_epoch(self, logs: dict, n_epochs: int, writer) -> None:
        """TensorBoard scalars and the one-line progress print (rank 0)."""
        if writer is not None:
            import tensorflow as tf
            with writer.as_default():
                for k in ("loss", "acc", "val_acc"):
                    if logs[k] is not None:
                        tf.summary.scalar(k, logs[k], step=logs["epoch"])
            writer.flush()
        if self.cfg.get("verbose", True) and self.world.is_root:
            val = f" val_acc {logs['val_acc']:.4f}" if logs["val_acc"] is not None else ""
            print(f"epoch {logs['epoch']}/{n_epochs}: loss {logs['loss']:.4f} acc {logs['acc']:.4f}{val} "
                  f"({logs['seconds']:.1f}s)", flush=True)

    def _check_batch(self, global_batch: int) -> None:
        w = self.world
        if global_batch < w.size:
            raise PocketFlowError(f"batch_size {global_batch} is smaller than the {w.size} Horovod ranks "
                                  "it is split between")
        if global_batch % w.size and w.is_root:
            import warnings
            warnings.warn(f"batch_size {global_batch} is not a multiple of the {w.size} Horovod ranks: "
                          f"each rank trains on {global_batch // w.size} images, so "
                          f"{global_batch % w.size} of every batch are skipped", RuntimeWarning, stacklevel=3)

    def evaluate(self, split: str = "val") -> float:
        """Accuracy on a split; under Horovod each rank predicts 1/N of it (call on every rank)."""
        from pocketflow.metrics import accuracy
        x, y = self.data.split(split)
        w = self.world
        if not w.distributed:
            return accuracy(self.model, x, y)
        xs, ys = x[w.rank::w.size], y[w.rank::w.size]
        correct = round(accuracy(self.model, xs, ys) * len(ys)) if len(ys) else 0
        return w.sum(correct) / max(1, len(y))

    def _bar(self, total, epoch, n_epochs):
        if not (self.cfg.get("verbose", True) and self.world.is_root):
            return None
        import sys
        if not sys.stderr.isatty():
            return None
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=f"epoch {epoch + 1}/{n_epochs}", leave=False, unit="step")

    def _summary_writer(self):
        if not (self.cfg.get("tensorboard") and self.log_dir and self.world.is_root):
            return None
        import tensorflow as tf
        return tf.summary.create_file_writer(str(self.log_dir))


class DistillationHook(TrainHook):
    """Task loss + weight · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) (Hinton et al.)."""

    def __init__(self, teacher, temperature: float = 4.0, weight: float = 0.5):
        self.teacher, self.t, self.weight = teacher, float(temperature), float(weight)

    def loss(self, x, y, logits):
        import tensorflow as tf
        t_logits = tf.stop_gradient(self.teacher(x, training=False))
        p_t = tf.nn.softmax(t_logits / self.t)
        log_p_s = tf.nn.log_softmax(logits / self.t)
        log_p_t = tf.nn.log_softmax(t_logits / self.t)
        kl = tf.reduce_mean(tf.reduce_sum(p_t * (log_p_t - log_p_s), axis=-1))
        return self.weight * self.t ** 2 * kl
