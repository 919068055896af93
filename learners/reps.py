"""How one kernel is stored (`KernelRep`) and the exact bytes of its smallest layout (`storage`).

The shared vocabulary of size predictions: learners describe the kernels a point will give
(learners/accounting.py), the packed export writes exactly `storage` bytes, and the TFLite size
model (pocketflow/export/size_model.py) predicts the shipped file from the same descriptions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pocketflow.export.packed import index_bytes
from pocketflow.learners.kernels import num_channels


@dataclass(frozen=True)
class KernelRep:
    """How one kernel is stored.

    kind   'float' (float32 values), 'grid' (b-bit codes + a float32 scale per output channel)
           or 'codebook' (b-bit indexes + 2^b float32 shared values).
    sparse the layer was pruned: its `zeros` may be left out of the value stream, with an index
           (see `storage`).
    """
    shape: tuple
    depthwise: bool = False
    zeros: int = 0
    sparse: bool = False
    kind: str = "float"
    bits: int = 32

    @property
    def n(self) -> int:
        return int(np.prod(self.shape))

    @property
    def channels(self) -> int:
        return num_channels(self.shape, self.depthwise)

    @property
    def value_bits(self) -> int:
        return 32 if self.kind == "float" else self.bits

    @property
    def table_bytes(self) -> int:
        return {"float": 0, "grid": 4 * self.channels, "codebook": 4 * 2 ** self.bits}[self.kind]

    @property
    def index_bytes(self) -> int:
        """Bytes of one CSR column index (the packed format's rule)."""
        return index_bytes(self.n // self.channels)


def storage(rep: KernelRep) -> tuple[str, int]:
    """(layout, exact bytes) of the smallest representation of a kernel.

    dense   ceil(value_bits * n / 8) + table
    bitmap  ceil(n / 8) (1 bit per weight: stored or zero) + ceil(value_bits * nnz / 8) + table
    csr     rows = output channels: int32 row pointers 4 * (channels + 1) + a uint16 column index
            per nonzero (uint32 if a channel has > 65536 weights) + ceil(value_bits * nnz / 8) + table
    Sparse layouts are considered only for pruned layers (`rep.sparse`). The bitmap wins up to
    about 94% sparsity for float values; CSR wins above.
    """
    vb, table = rep.value_bits, rep.table_bytes
    options = [("dense", math.ceil(vb * rep.n / 8) + table)]
    if rep.sparse:
        nnz = rep.n - rep.zeros
        values = math.ceil(vb * nnz / 8) + table
        options.append(("bitmap", math.ceil(rep.n / 8) + values))
        options.append(("csr", 4 * (rep.channels + 1) + rep.index_bytes * nnz + values))
    return min(options, key=lambda o: o[1])


def reps_bytes(reps: dict[str, KernelRep]) -> int:
    return sum(storage(r)[1] for r in reps.values())
