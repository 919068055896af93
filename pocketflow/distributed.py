"""Horovod, detected from the environment `horovodrun` sets: no flag needed.

Single-process runs never import Horovod. Under `horovodrun -np N` every rank
trains on its shard of each global batch, gradients are averaged with
`hvd.allreduce` in the train step (Keras 3 + `hvd.DistributedOptimizer` silently
does not average, and `BroadcastGlobalVariablesCallback` crashes), and rank 0
alone writes files.

Every collective here must be called by all ranks in the same order; a rank that
skips one (an exception on one rank only) leaves the others waiting until
horovodrun tears the job down. Decisions that could differ between ranks are
therefore made on values that are already global (allreduced metrics) or taken
from rank 0 with `broadcast_object`.
"""
from __future__ import annotations

import os
from functools import lru_cache

from pocketflow.errors import PocketFlowError

# set by horovodrun (Gloo), Open MPI's mpirun and MPICH/Intel MPI respectively
_ENV_KEYS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


class World:
    """This process's place in the Horovod job (rank 0 of 1 without Horovod)."""

    def __init__(self):
        self.hvd = None
        self.rank, self.size, self.local_rank, self.local_size = 0, 1, 0, 1
        if any(k in os.environ for k in _ENV_KEYS):
            try:
                import horovod.tensorflow as hvd
            except ImportError as e:
                raise PocketFlowError(
                    f"started under an MPI/horovodrun launcher but Horovod cannot be imported ({e}); "
                    "run scripts/setup.sh, which builds Horovod against the installed TensorFlow") from None
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

    # -- inside the compiled train step -------------------------------------------------------
    def allreduce_grads(self, tensors):
        """Average tensors over ranks in ONE fused collective (the gradients, and the step's loss
        and accuracy with them: each separate collective is a negotiation round per step).
        `None` (the gradient of an unused variable) stays None."""
        if not self.distributed:
            return list(tensors)
        idx = [i for i, t in enumerate(tensors) if t is not None]
        out = list(tensors)
        for i, r in zip(idx, self.hvd.grouped_allreduce([tensors[i] for i in idx], op=self.hvd.Average)):
            out[i] = r
        return out

    def allreduce(self, tensor, average: bool = True):
        """A tensor averaged (or summed) over ranks; usable eagerly and inside tf.function."""
        if not self.distributed:
            return tensor
        return self.hvd.allreduce(tensor, op=self.hvd.Average if average else self.hvd.Sum)

    # -- eager state synchronisation ----------------------------------------------------------
    def broadcast_variables(self, variables, root: int = 0) -> None:
        """Copy rank `root`'s values into every rank (weights, non-trainable state, optimizer
        slots and iteration counter).

        One flat broadcast per dtype: an eager collective per variable costs a negotiation
        round each (hundreds for a ResNet with its Adam slots), and `hvd.broadcast_variables`
        traces a tf.function per variable list that keeps every trial's variables alive.
        """
        if not (self.distributed and variables):
            return
        import tensorflow as tf
        by_dtype: dict = {}
        for v in variables:
            by_dtype.setdefault(str(v.dtype), []).append(v)
        for group in by_dtype.values():
            values = [tf.convert_to_tensor(v) for v in group]
            flat = self.hvd.broadcast(tf.concat([tf.reshape(t, [-1]) for t in values], 0), root)
            for v, part, t in zip(group, tf.split(flat, [int(tf.size(t)) for t in values]), values):
                v.assign(tf.reshape(part, t.shape))

    def average_variables(self, variables) -> None:
        """Average the float variables over ranks (BN statistics, EMA quantizer ranges, ...).

        State that each rank updates from its own shard drifts apart; averaging makes it
        identical again. State that is already identical (masks, codebooks) is unchanged up to
        rounding, and stays identical across ranks because every rank receives the same sum.
        """
        if not self.distributed:
            return
        import keras
        import tensorflow as tf
        floats = [v for v in variables if keras.backend.is_float_dtype(v.dtype)]
        if not floats:
            return
        reduced = self.hvd.grouped_allreduce([tf.convert_to_tensor(v) for v in floats], op=self.hvd.Average)
        for v, r in zip(floats, reduced):
            v.assign(r)

    def mean(self, value: float) -> float:
        return self._reduce(value, average=True)

    def sum(self, value: float) -> float:
        return self._reduce(value, average=False)

    def _reduce(self, value: float, average: bool) -> float:
        if not self.distributed:
            return float(value)
        import tensorflow as tf
        return float(self.allreduce(tf.constant(float(value), tf.float64), average).numpy())

    def broadcast_object(self, obj, root: int = 0):
        """Any picklable object from rank `root` (e.g. the search's next trial parameters)."""
        if not self.distributed:
            return obj
        return self.hvd.broadcast_object(obj, root_rank=root)

    def barrier(self) -> None:
        """Wait until every rank gets here (a scalar allreduce: `hvd.join` is meant for uneven data)."""
        if self.distributed:
            self.sum(0.0)


def _pin_devices(local_rank: int, local_size: int) -> None:
    """One GPU per local rank; on CPU, share this machine's cores between its local ranks.

    Must run before TensorFlow initialises its runtime (the first op); `world()` is called
    early for that reason. Without it every rank would start one thread per core and N ranks
    on one machine would oversubscribe it N times.
    """
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    try:
        if gpus:
            for g in gpus:
                tf.config.experimental.set_memory_growth(g, True)
            tf.config.set_visible_devices(gpus[local_rank % len(gpus)], "GPU")
        else:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            tf.config.threading.set_intra_op_parallelism_threads(max(1, (cores or 1) // max(1, local_size)))
            tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        import warnings
        warnings.warn("Horovod: TensorFlow was initialised before pocketflow.distributed.world(); "
                      "device pinning and thread limits were not applied", RuntimeWarning, stacklevel=2)


@lru_cache(maxsize=1)
def world() -> World:
    """The process-wide World (Horovod is initialised on first call)."""
    return World()
