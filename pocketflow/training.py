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

import numpy as np

from pocketflow.data import Dataset, augment_batch, batches
from pocketflow.distributed import world
from pocketflow.errors import TrialFailed


class TrainHook:
    """Extension point of the trainer; every method is optional."""

    def loss(self, x, y, logits):
        """Extra loss term (a scalar tensor) added inside the gradient tape, or None."""
        return None

    def on_train_begin(self, trainer: "Trainer") -> None:
        pass

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


def make_optimizer(cfg: dict, total_steps: int, world_size: int = 1):
    import keras
    lr = cfg["learning_rate"] * (world_size if cfg.get("scale_lr", True) else 1)
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


class Trainer:
    """Fine-tunes `model` on `data` with the `train`/`fine_tune` config section."""

    def __init__(self, model, data: Dataset, cfg: dict, hooks=(), seed: int = 0,
                 checkpoint: str | Path | None = None, log_dir: str | Path | None = None):
        self.model, self.data, self.cfg, self.seed = model, data, cfg, seed
        self.hooks = list(hooks)
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.log_dir = Path(log_dir) if log_dir else None
        self.world = world()

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

        @tf.function(reduce_retracing=True)
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
            grads = tape.gradient(total, variables)
            grads = w.allreduce_grads(grads)
            optimizer.apply_gradients([(g, v) for g, v in zip(grads, variables) if g is not None])
            correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32),
                                                     tf.cast(y, tf.int32)), tf.float32))
            return total, correct
        return step

    def fit(self, epochs: float | None = None, steps: int | None = None,
            on_epoch_end: Callable[[int, dict], None] | None = None) -> History:
        """Train for `epochs` (may be fractional) or `steps`; evaluate on validation each epoch.

        `on_epoch_end(epoch, logs)` may raise (the search uses it to prune poor trials).
        """
        cfg, data, w = self.cfg, self.data, self.world
        epochs = cfg["epochs"] if epochs is None else epochs
        steps = steps if steps is not None else cfg.get("steps")
        batch = int(cfg["batch_size"])
        global_batch = batch  # the data order is that of a single process with this batch
        steps_per_epoch = max(1, len(data.x_train) // global_batch if w.distributed
                              else math.ceil(len(data.x_train) / global_batch))
        total_steps = int(steps) if steps else int(math.ceil(epochs * steps_per_epoch))
        n_epochs = math.ceil(total_steps / steps_per_epoch)
        optimizer = make_optimizer(cfg, total_steps, w.size)
        optimizer.build(self.model.trainable_variables)
        # identical start on every rank: weights, non-trainable state, optimizer slots
        w.broadcast_variables(self.model.variables)
        w.broadcast_variables(optimizer.variables)
        step_fn = self._build_step(optimizer)
        for h in self.hooks:
            h.on_train_begin(self)
        hist, best, bad_epochs = History(), -1.0, 0
        writer = self._summary_writer()
        t_start = time.perf_counter()
        step = 0
        for epoch in range(n_epochs):
            t0 = time.perf_counter()
            losses, correct, seen = [], 0.0, 0
            n_this = min(steps_per_epoch, total_steps - step)
            bar = self._bar(n_this, epoch, n_epochs)
            for i, (xb, yb) in enumerate(batches(data.x_train, data.y_train, global_batch, shuffle=True,
                                                  seed=self.seed, epoch=epoch, rank=w.rank,
                                                  world=w.size, drop_remainder=w.distributed)):
                if i >= n_this:
                    break
                loss, corr = step_fn(xb, yb)
                loss = float(loss)
                if not math.isfinite(loss):
                    raise TrialFailed(f"loss became {loss} at step {step + 1} (epoch {epoch + 1}); "
                                      "try a lower learning rate")
                losses.append(loss)
                correct += float(corr)
                seen += len(xb)
                step += 1
                for h in self.hooks:
                    h.after_step(step)
                if bar is not None:
                    bar.update(1)
                    if i % 20 == 0:
                        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            if bar is not None:
                bar.close()
            # keep float state (BN statistics, EMA ranges) identical across ranks
            w.average_variables([v for v in self.model.non_trainable_variables])
            logs = {"epoch": epoch + 1, "loss": w.mean(np.mean(losses) if losses else float("nan")),
                    "acc": w.mean(correct / max(1, seen)), "steps": step}
            logs["val_acc"] = self.evaluate("val") if len(data.x_val) else None
            logs["seconds"] = time.perf_counter() - t0
            hist.epochs.append(logs)
            hist.steps = step
            if writer is not None:
                with writer.as_default():
                    for k in ("loss", "acc", "val_acc"):
                        if logs[k] is not None:
                            import tensorflow as tf
                            tf.summary.scalar(k, logs[k], step=epoch + 1)
                writer.flush()
            if cfg.get("verbose", True) and w.is_root:
                val = f" val_acc {logs['val_acc']:.4f}" if logs["val_acc"] is not None else ""
                print(f"epoch {epoch + 1}/{n_epochs}: loss {logs['loss']:.4f} acc {logs['acc']:.4f}{val} "
                      f"({logs['seconds']:.1f}s)", flush=True)
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
            if step >= total_steps:
                break
        hist.seconds = time.perf_counter() - t_start
        return hist

    def evaluate(self, split: str = "val") -> float:
        from pocketflow.metrics import accuracy
        x, y = self.data.split(split)
        return accuracy(self.model, x, y)

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
