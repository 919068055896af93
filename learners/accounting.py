"""Exact size accounting of compressed kernels, predicted and actual.

A kernel's storage is described by a `KernelRep` (float / grid / codebook values, dense or with
its zeros left out); `storage` gives the bytes of its smallest layout. Learners predict reps
before training (`base_reps` + their `describe`), `actual_rep` reads them off a trained wrapper,
`package` turns a wrapped model into a `Compressed` of exactly that size, and `export_packed`
writes the kernels in exactly those bytes (format: `pocketflow.export.packed`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pocketflow.errors import PocketFlowError
from pocketflow.export.packed import encode_layer, index_bytes, write_packed
from pocketflow.learners.base import Compressed
from pocketflow.learners.kernels import is_depthwise, kernel_variable, num_channels
from pocketflow.learners.transforms import Codebook, FakeQuant, MagnitudeMask
from pocketflow.learners.wrap import KernelWrapper, kernel_layers, strip_model, wrappers


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


def base_reps(model) -> dict[str, KernelRep]:
    """Float, dense representation of every kernel layer (the starting point of predictions)."""
    return {name: KernelRep(tuple(int(d) for d in kernel_variable(layer).shape), is_depthwise(layer))
            for name, layer, _ in kernel_layers(model)}


def actual_rep(w: KernelWrapper) -> KernelRep:
    """The representation of a trained wrapper: what its transform chain guarantees."""
    eff = w.effective_kernel()
    sparse = any(isinstance(t, MagnitudeMask) for t in w.transforms)
    cb = [t for t in w.transforms if isinstance(t, Codebook)]
    fq = [t for t in w.transforms if isinstance(t, FakeQuant)]
    kind, bits = ("codebook", cb[-1].bits) if cb else (("grid", fq[-1].bits) if fq else ("float", 32))
    return KernelRep(eff.shape, is_depthwise(w.layer), int(np.sum(eff == 0)) if sparse else 0,
                     sparse, kind, bits)


def reps_bytes(reps: dict[str, KernelRep]) -> int:
    return sum(storage(r)[1] for r in reps.values())


def ratio_from_reps(model, reps: dict[str, KernelRep], prepared_params: int, metric: str,
                    learner: str) -> float:
    """Predicted `compression` (float bytes / stored bytes) or `params` (params / nonzero params);
    kernels stored as `reps`, every other parameter of the prepared model as float32."""
    from pocketflow import metrics as M
    kernels = sum(r.n for r in reps.values())
    if metric == "compression":
        return M.float_bytes(model) / max(1, reps_bytes(reps) + 4 * (prepared_params - kernels))
    if metric == "params":
        return M.count_params(model) / max(1, prepared_params - sum(r.zeros for r in reps.values() if r.sparse))
    raise PocketFlowError(f"learner '{learner}' cannot target metric '{metric}'")


def package(original, wrapped, history=None, info: dict | None = None) -> Compressed:
    """Strip `wrapped` and account its exact size: kernels as `storage` says, the rest float32."""
    from pocketflow import metrics as M
    deploy = strip_model(wrapped)
    layers, kernel_bytes, kernels, zeros = {}, 0, 0, 0
    for w in wrappers(wrapped):
        rep = actual_rep(w)
        layout, nbytes = storage(rep)
        kernel_bytes, kernels = kernel_bytes + nbytes, kernels + rep.n
        zeros += rep.zeros
        layers[w.name] = {"shape": list(rep.shape), "kind": rep.kind, "bits": rep.bits,
                          "sparsity": round(rep.zeros / rep.n, 6), "zeros": rep.zeros,
                          "layout": layout, "bytes": nbytes}
    total = M.count_params(deploy)
    size = kernel_bytes + 4 * (total - kernels)
    info = {**(info or {}), "layers": layers, "kernel_bytes": kernel_bytes,
            "float_bytes_other": 4 * (total - kernels), "original_float_bytes": M.float_bytes(original)}
    return Compressed(model=wrapped, deploy=deploy, size_bytes=size, info=info, history=history,
                      nonzero_params=total - zeros)



def encode_wrapper(w: KernelWrapper) -> tuple[dict, bytes]:
    """A trained wrapper's packed entry and bytes: exactly its `storage` size."""
    rep = actual_rep(w)
    layout, nbytes = storage(rep)
    scales = None
    if rep.kind == "grid":  # the scales the last fake quant computes from the kernel it receives
        i = [i for i, t in enumerate(w.transforms) if isinstance(t, FakeQuant)][-1]
        scales = w.transforms[i].scales(w.kernel_input(i))
    entry, blob = encode_layer(w.name, w.effective_kernel(), rep.depthwise, rep.kind, rep.bits, layout, scales)
    assert len(blob) == nbytes, (w.name, layout, len(blob), nbytes)
    return entry, blob


def export_packed(wrapped, out_dir, stem: str = "weights_packed") -> dict:
    """Write <stem>.bin (exactly the kernels' storage bytes) and <stem>.json (the manifest)."""
    return write_packed((encode_wrapper(w) for w in wrappers(wrapped)), out_dir, stem)
