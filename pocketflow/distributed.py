"""Horovod, detected from the environment `horovodrun` sets: no flag needed.

Single-process runs never import Horovod. Under `horovodrun -np N` every rank
trains on its shard of each global batch, gradients are averaged with
`hvd.allreduce` in the train step (Keras 3 + `hvd.DistributedOptimizer` silently
does not average), and rank 0 alone writes files.
"""
from __future__ import annotations

import os
from functools import lru_cache

_ENV_KEYS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


class World:
    def __init__(self):
        self.hvd = None
        self.rank, self.size, self.local_rank, self.local_size = 0, 1, 0, 1
        if any(k in os.environ for k in _ENV_KEYS):
            import horovod.tensorflow as hvd
            hvd.init()
            self.hvd = hvd
            self.rank, self.size = hvd.rank(), hvd.size()
            self.local_rank, self.local_size = hvd.local_rank(), hvd.local_size()
            _pin_devices(self.local_rank, self.local_size)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def allreduce_grads(self, grads):
        if not self.distributed:
            return grads
        return [None if g is None else self.hvd.allreduce(g, op=self.hvd.Average) for g in grads]

    def broadcast_variables(self, variables, root: int = 0) -> None:
        """Copy rank 0's values into every rank (initial weights, optimizer slots)."""
        if not self.distributed:
            return
        for v in variables:
            v.assign(self.hvd.broadcast(v.value if hasattr(v, "value") else v, root))

    def average_variables(self, variables) -> None:
        """Average float state across ranks (BN statistics, EMA quantizer ranges)."""
        if not self.distributed:
            return
        for v in variables:
            if v.dtype.is_floating if hasattr(v.dtype, "is_floating") else "float" in str(v.dtype):
                v.assign(self.hvd.allreduce(v.value, op=self.hvd.Average))

    def mean(self, value: float) -> float:
        if not self.distributed:
            return float(value)
        import tensorflow as tf
        return float(self.hvd.allreduce(tf.constant(float(value)), op=self.hvd.Average).numpy())

    def broadcast_object(self, obj, root: int = 0):
        if not self.distributed:
            return obj
        return self.hvd.broadcast_object(obj, root_rank=root)

    def barrier(self) -> None:
        if self.distributed:
            self.hvd.join()


def _pin_devices(local_rank: int, local_size: int) -> None:
    """One GPU per local rank; on CPU, share the cores between local ranks."""
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        for g in gpus:
            tf.config.experimental.set_memory_growth(g, True)
        tf.config.set_visible_devices(gpus[local_rank % len(gpus)], "GPU")
    else:
        threads = max(1, (os.cpu_count() or 1) // max(1, local_size))
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass  # already initialised


@lru_cache(maxsize=1)
def world() -> World:
    return World()
