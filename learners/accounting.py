"""Exact size accounting of compressed kernels, predicted and actual.

A kernel's storage is described by a `KernelRep` (float / grid / codebook values, dense or with
its zeros left out); `storage` gives the bytes of its smallest layout. Learners predict reps
before training (`base_reps` + their `describe`), `actual_rep` reads them off a trained wrapper,
`package` turns a wrapped model into a `Compressed` of exactly that size, and `export_packed`
writes the kernels in exactly those bytes (format: `pocketflow.export.packed`).
"""
from __future__ import annotations

import numpy as np

from pocketflow.errors import PocketFlowError
from pocketflow.export.packed import encode_layer, write_packed
from pocketflow.learners.base import Compressed
from pocketflow.learners.kernels import is_depthwise, kernel_variable
from pocketflow.learners.reps import KernelRep, reps_bytes, storage  # noqa: F401 - re-exported
from pocketflow.learners.transforms import Codebook, FakeQuant, MagnitudeMask
from pocketflow.learners.wrap import KernelWrapper, kernel_layers, strip_model, wrappers


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


def ratio_from_reps(model, reps: dict[str, KernelRep], prepared_params: int, metric: str,
                    learner: str) -> float:
    """Predicted `packed_size` (float bytes / stored bytes) or `params` (params / nonzero params);
    kernels stored as `reps`, every other parameter of the prepared model as float32."""
    from pocketflow import metrics as M
    kernels = sum(r.n for r in reps.values())
    if metric == "packed_size":
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
