"""TFLite's sparse tensor encoding (`Optimize.EXPERIMENTAL_SPARSITY`): what a file holds, and
whether an encoded file may replace the dense one.

Why a check: the converter stores kernels with >= 30% zeros as CSR (+ a DENSIFY op) or, for
FULLY_CONNECTED, 1x4 (float) / 1x16 (int8) blocks. Measured (docs/benchmarks/sparse_encoding.md):
float files shrink and run with the dense file's outputs; int8 CSR of a FULLY_CONNECTED kernel
fails XNNPACK's prepare in ai_edge_litert, and the block encoding drops a trailing partial block
(non-zeros lost). So an encoded file is kept only when it runs in the interpreter we ship with,
holds every non-zero of the dense file and agrees with it (float: 1e-4 relative; int8: one
output quantization step).
"""
from __future__ import annotations

import numpy as np

from pocketflow.errors import PocketFlowError

SPARSE_ENCODINGS = ("off", "on", "auto")
FLOAT_TOL = 1e-4
DTYPES = {0: np.float32, 1: np.float16, 9: np.int8}   # TFLite TensorType -> numpy (-0.0 is a zero)


def _model(blob: bytes):
    from ai_edge_litert import schema_py_generated as S
    return S.ModelT.InitFromPackedBuf(blob, 0)


def _op_names() -> dict:
    from ai_edge_litert import schema_py_generated as S
    return {v: k for k, v in vars(S.BuiltinOperator).items() if not k.startswith("_")}


def sparse_tensors(blob: bytes) -> list[dict]:
    """Every sparse-encoded tensor: shape, block (None = CSR of single weights), the kernel op it
    feeds (through a DENSIFY op or directly) and whether it is densified at load time."""
    m, names = _model(blob), _op_names()
    sg = m.subgraphs[0]
    ops = []
    for o in sg.operators:
        c = m.operatorCodes[o.opcodeIndex]
        ops.append((names.get(max(c.builtinCode, c.deprecatedBuiltinCode), "?"), list(o.inputs), list(o.outputs)))

    def consumer(t):
        return next(((name, outs) for name, ins, outs in ops if t in ins), ("none", []))
    out = []
    for i, t in enumerate(sg.tensors):
        if t.sparsity is None:
            continue
        op, outs = consumer(i)
        densify = op == "DENSIFY"
        if densify and outs:
            op = consumer(outs[0])[0]
        bm = t.sparsity.blockMap
        block = None if bm is None or len(bm) == 0 else int(t.sparsity.dimMetadata[-1].denseSize)
        out.append({"shape": [int(d) for d in t.shape], "block": block, "op": op, "densify": densify})
    return out


def _nonzeros_by_shape(blob: bytes) -> dict:
    """{(shape, type): non-zero count} of the constant tensors' stored values (>= 2-D)."""
    m = _model(blob)
    out: dict = {}
    for t in m.subgraphs[0].tensors:
        data = m.buffers[t.buffer].data if t.buffer < len(m.buffers) else None
        if data is None or len(t.shape) < 2:
            continue
        nz = int(np.count_nonzero(np.frombuffer(bytes(data), DTYPES.get(t.type, np.uint8))))
        key = (tuple(int(d) for d in t.shape), t.type)
        out[key] = out.get(key, 0) + nz
    return out


def lost_nonzeros(dense: bytes, encoded: bytes) -> bool:
    """Whether the encoded file stores fewer non-zero weights than the dense one (a dropped partial
    block), per constant-tensor shape (the encoded tensor keeps its dense shape)."""
    a, b = _nonzeros_by_shape(dense), _nonzeros_by_shape(encoded)
    return any(b[k] < n for k, n in a.items() if k in b)


def rejection(dense: bytes, encoded: bytes, x: np.ndarray) -> str | None:
    """Why `encoded` may not replace `dense` (None: it may): it does not run in ai_edge_litert
    (XNNPACK applied), lost non-zeros, or its outputs on `x` differ from the dense file's."""
    from pocketflow.metrics import TFLiteRunner
    ref = TFLiteRunner(dense)
    try:
        got = TFLiteRunner(encoded).predict(x)
    except Exception as e:
        return f"the interpreter does not run it ({str(e).splitlines()[0][:120]})"
    if lost_nonzeros(dense, encoded):
        return "the encoding dropped non-zero weights (a trailing partial block)"
    want = ref.predict(x)
    scale = ref.out["quantization"][0] if ref.out["dtype"] != np.float32 else 0.0
    tol = 1.001 * scale if scale else FLOAT_TOL * max(1.0, float(np.max(np.abs(want))))
    diff = float(np.max(np.abs(got - want)))
    return None if diff <= tol else f"its outputs differ from the dense file's by {diff:.3g} (> {tol:.3g})"


def pick(dense: bytes, encoded: bytes, mode: str, x: np.ndarray) -> bytes:
    """`mode` (one of SPARSE_ENCODINGS) on: the encoded file, refused if it fails `rejection`;
    auto: the encoded file when it is smaller raw and passes, else the dense one; off: the dense one."""
    if mode == "off" or (mode == "auto" and len(encoded) >= len(dense)):
        return dense
    why = rejection(dense, encoded, x)
    if why is None:
        return encoded
    if mode == "on":
        raise PocketFlowError(f"sparse_encoding: on: the sparse-encoded TFLite file cannot be shipped: {why}; "
                              "use sparse_encoding: auto (encode only where it is safe) or off")
    return dense
