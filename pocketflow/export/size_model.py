"""Predicted size of the deployable TFLite file (raw and gzip'd) from a per-layer representation.

Why: the `size` / `download_size` targets are ratios of the shipped file, and the search projects
every point onto the target (~40 predictions per trial) before training, so a conversion per
prediction is out. `TFLiteSizeModel.calibrate` converts the model once to float and once to int8,
reads from the flatbuffer which bytes are kernel buffers (the rest, graph, biases, per-tensor
quantization parameters, is fixed overhead), and simulates each kernel's buffer with numpy on a
sample of its own output channels (magnitude-pruned, snapped to 2^bits values, stored as float32
or per-channel int8 exactly as the converter does) to learn its deflate cost per weight on a
sparsity grid. A prediction is the measured baseline plus per-layer differences:

    raw  = baseline file + buffer size changes (+ sparse index vectors, densify ops)
    gzip = baseline gzip + sum over layers of n * (rate(rep) - rate(baseline)), rates interpolated

Dense raw bytes do not depend on zeros or bits (int8 stores 1 byte per weight whatever the
codebook), so raw predictions are exact up to per-tensor quantization parameters.
`sparse_encoding=True` predicts `tf.lite.Optimize.EXPERIMENTAL_SPARSITY` files (CSR values +
uint8/16/int32 segment and index vectors, the converter's rules; kernels below 30% zeros stay dense).
Measured: float sparse files run (DENSIFY, XNNPACK) with outputs equal to the dense file's; int8
ones with a densified FULLY_CONNECTED fail XNNPACK's prepare in ai_edge_litert, and its 1x16 block
encoding drops a trailing partial block, so ship int8 sparse only after checking the interpreter.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np

GRID = np.array([0, .2, .4, .5, .6, .7, .8, .85, .9, .93, .95, .97, .99, 1.0])
KERNEL_OPS = {3: "conv", 4: "depthwise", 9: "fc"}             # TFLite builtin codes
MIN_SPARSITY = 0.3                                             # the converter's DenseToSparse rule
FC_BLOCK = {"float": 4, "int8": 16}                            # its FULLY_CONNECTED block sizes
DEPLOYS = ("float", "int8")


@dataclass(frozen=True)
class SizePrediction:
    raw: int
    gzip: int


@dataclass
class _Layer:
    """One kernel layer as stored in the file: its Keras rows (a sample) and TFLite geometry."""
    name: str
    op: str
    tfl_shape: tuple
    channels: int
    rows: np.ndarray        # sampled output channels of the Keras kernel (as_matrix), float64
    fold: np.ndarray        # per sampled row: file value / Keras value (BatchNorm folded by the converter)
    buf: dict = field(default_factory=dict)   # deploy -> dense buffer bytes in the baseline file
    quant: int = 0          # int8 quantization entries of filter + bias in the baseline file
    s0: float = 0.0         # the baseline's own fraction of zeros
    gz0: dict = field(default_factory=dict)   # deploy -> deflate bytes of the baseline buffer

    @property
    def n(self) -> int:
        return int(np.prod(self.tfl_shape))


def _parse(blob: bytes):
    from ai_edge_litert import schema_py_generated as S
    return S.ModelT.InitFromPackedBuf(blob, 0)


def _kernel_tensors(m):
    """(op kind, filter tensor, bias tensor or None) for every kernel op, in op order."""
    sg = m.subgraphs[0]
    for o in sg.operators:
        code = m.operatorCodes[o.opcodeIndex]
        kind = KERNEL_OPS.get(max(code.builtinCode, code.deprecatedBuiltinCode))
        if kind is not None:
            ins = list(o.inputs)
            yield kind, sg.tensors[ins[1]], sg.tensors[ins[2]] if len(ins) > 2 and ins[2] >= 0 else None


def _rows_of(arr: np.ndarray, op: str) -> np.ndarray:
    """File layout -> rows = output channels (`as_matrix` order)."""
    return arr.reshape(-1, arr.shape[-1]).T if op == "depthwise" else arr.reshape(arr.shape[0], -1)


def _file_of(rows: np.ndarray, op: str, tfl_shape: tuple) -> np.ndarray:
    """Rows = output channels -> file layout (a sample of channels keeps the other dims)."""
    if op == "depthwise":
        return np.ascontiguousarray(rows.T).reshape(*tfl_shape[:-1], rows.shape[0])
    return rows.reshape(rows.shape[0], *tfl_shape[1:])


def _match(model, m) -> list:
    """Pair every Keras kernel layer with its filter tensor (same shape, most correlated rows)."""
    from pocketflow.learners.kernels import as_matrix, is_depthwise, kernel_variable
    from pocketflow.learners.wrap import kernel_layers
    cands = []
    for kind, f, b in _kernel_tensors(m):
        data = m.buffers[f.buffer].data
        if data is None or f.sparsity is not None:
            continue
        dt = np.float32 if f.type == 0 else np.int8
        cands.append((kind, f, b, np.frombuffer(bytes(data), dt).reshape(tuple(f.shape)).astype(np.float64)))
    pairs, used = [], set()
    for name, layer, _ in kernel_layers(model):
        k = as_matrix(np.asarray(kernel_variable(layer).numpy(), np.float64), is_depthwise(layer))
        best = (-1.0, None)
        for i, (kind, f, b, arr) in enumerate(cands):
            if i in used or arr.size != k.size or _rows_of(arr, kind).shape != k.shape:
                continue
            r = _rows_of(arr, kind)
            cos = np.abs(np.sum(r * k, 1)) / (np.linalg.norm(r, axis=1) * np.linalg.norm(k, axis=1) + 1e-30)
            best = max(best, (float(np.mean(cos)), i), key=lambda t: t[0])
        if best[1] is not None:
            used.add(best[1])
            pairs.append((name, k, cands[best[1]]))
    return pairs


def _snap(rows, fold, s, kind, bits, pattern):
    """Rows pruned to sparsity `s` (smallest |w| (in Keras space, as the learners prune) and snapped;
    returned in file space (folded). Grid: snapped after folding (uniform_quant folds BatchNorm)."""
    from pocketflow.learners.transforms.codebook import kmeans_1d, nearest_index
    from pocketflow.learners.transforms.mask import magnitude_mask
    k = rows.copy()
    if s > 0:
        k = k * magnitude_mask(k.T, s, pattern, False).T
    if kind == "codebook":
        nz = k != 0
        zero = bool((~nz).any())
        c = kmeans_1d(k[nz] if zero else k.ravel(), 2 ** bits - int(zero))
        c = np.concatenate([[0.0], c]) if zero else c
        k = np.where(nz, c[nearest_index(k.ravel(), c)].reshape(k.shape), 0.0)
    k = k * fold[:, None]
    if kind == "grid":
        qmax = 2 ** (bits - 1) - 1
        s = np.max(np.abs(k), axis=1, keepdims=True) / qmax
        k = np.clip(np.round(k / np.where(s > 0, s, 1)), -qmax, qmax) * s
    return k.astype(np.float32)


def _store(v: np.ndarray, deploy: str, per_tensor: bool) -> np.ndarray:
    """The kernel as the file stores it: float32, or int8 codes on symmetric scales max|w|/127."""
    if deploy == "float":
        return v.astype("<f4")
    m = np.max(np.abs(v)) if per_tensor else np.max(np.abs(v), axis=1, keepdims=True)
    s = np.where(m > 0, m / 127.0, 1.0)
    return np.clip(np.round(v.astype(np.float64) / s), -127, 127).astype(np.int8)


def _itype(maxval: int) -> int:
    return 1 if maxval <= 255 else 2 if maxval <= 65535 else 4


def _csr(arr: np.ndarray, block: int = 1):
    """The converter's CSR of a file-layout kernel: last dim sparse (in blocks of `block`), the
    others dense. Returns (values, segments, indices)."""
    cols = arr.shape[-1] // block        # the converter drops a trailing partial block
    lead = arr[..., :cols * block].reshape(-1, cols, block)
    keep = np.any(lead != 0, axis=2)
    seg = np.concatenate([[0], np.cumsum(keep.sum(1))])
    idx = np.nonzero(keep)[1]
    return lead[keep].ravel(), seg, idx


def _deflate(*parts: bytes) -> int:
    return len(zlib.compress(b"".join(parts), 9))


def _vec(count: int, item: int) -> int:
    """Bytes of a flatbuffer vector: length prefix + data, padded to 4."""
    return 4 + -(-count * item // 4) * 4


def _file_shape(rep) -> tuple:
    """The kernel's shape in the file (Keras HWIO -> OHWI, Dense (in, out) -> (out, in))."""
    s = tuple(int(d) for d in rep.shape)
    if rep.depthwise:
        return (1, s[0], s[1], s[2] * s[3])
    return (s[-1], *s[:-1]) if len(s) == 4 else (s[1], s[0])


def _block(op: str, deploy: str, pattern: str, s: float) -> int:
    """The block the converter encodes a sparse kernel with: the FULLY_CONNECTED block (1x4 float,
    1x16 int8) when the zeros come in such blocks (or, for random zeros, when s^B / s exceeds its
    0.9 / 0.8 threshold), else 1 (CSR + a DENSIFY op)."""
    b = FC_BLOCK[deploy]
    if op != "fc" or s <= 0:
        return 1
    if str(pattern).lower() == f"1x{b}":
        return b
    return b if pattern == "unstructured" and s ** (b - 1) > (0.9 if deploy == "float" else 0.8) else 1


def sparse_bytes(shape: tuple, nnz: int, item: int, block: int) -> int:
    """Payload of the converter's sparse tensor: values, segment and index vectors (its uint8 /
    uint16 / int32 choice by the largest entry), without the fixed per-tensor tables."""
    units = -(-nnz // block)
    lead = int(np.prod(shape[:-1]))
    return (-(-units * block * item // 16) * 16 + _vec(lead + 1, _itype(units))
            + _vec(units, _itype(shape[-1] // block - 1)))


class TFLiteSizeModel:
    """Raw and gzip'd bytes of the float / int8 TFLite file of a model whose kernels are stored as
    given `KernelRep`s (learners/accounting.py). Build with `calibrate`; `predict` converts nothing."""

    def __init__(self, layers: dict, base: dict, sparse_over: dict | None = None):
        self.layers, self.base = layers, base
        self.sparse_over = sparse_over or {}     # deploy -> (raw, gzip) fixed bytes per sparse kernel
        self._rates: dict = {}

    @classmethod
    def calibrate(cls, model, representative, sample: int = 16384, sparse_encoding: bool = False,
                  warm: bool = True, float_blob: bytes | None = None) -> "TFLiteSizeModel":
        """Convert `model` to float and int8 TFLite once each (+ once each pruned to 50% with
        EXPERIMENTAL_SPARSITY when `sparse_encoding`, to measure the sparse tensors' fixed bytes);
        `float_blob`: its float file, if the caller has converted it already."""
        from pocketflow.export.tflite import to_tflite
        from pocketflow.metrics import gzip_size
        blobs = {"float": float_blob if float_blob is not None else to_tflite(model),
                 "int8": to_tflite(model, "int8", representative, weight_scales="per_channel")}
        base = {d: SizePrediction(len(b), gzip_size(b)) for d, b in blobs.items()}
        qm = _match(model, _parse(blobs["int8"]))
        qpairs, qarr = {n: (f, b) for n, _, (_, f, b, _) in qm}, {n: a for n, _, (_, _, _, a) in qm}
        rng, layers = np.random.default_rng(0), {}
        for name, k, (op, f, _, arr) in _match(model, _parse(blobs["float"])):
            r = _rows_of(arr, op)
            kk = np.sum(k * k, 1)
            fold = np.where(kk > 0, np.sum(r * k, 1) / np.where(kk > 0, kk, 1), 1.0)
            take = max(1, min(k.shape[0], sample // k.shape[1]))
            sel = np.sort(rng.choice(k.shape[0], take, replace=False))
            qf, qb = qpairs.get(name, (None, None))
            quant = sum(len(t.quantization.scale) for t in (qf, qb) if t is not None and t.quantization is not None
                        and t.quantization.scale is not None)
            layers[name] = _Layer(name, op, tuple(int(d) for d in f.shape), k.shape[0], k[sel], fold[sel],
                                  {"float": 4 * k.size, "int8": k.size}, quant, float(np.mean(k == 0)),
                                  {"float": _deflate(arr.astype("<f4").tobytes()),
                                   "int8": _deflate(qarr.get(name, arr).astype(np.int8).tobytes())})
        sm = cls(layers, base)
        if sparse_encoding:
            sm._calibrate_sparse(model, representative)
        if warm:
            sm.warm()
        return sm

    def _calibrate_sparse(self, model, representative, s: float = 0.5) -> None:
        """Fixed bytes per sparse kernel (DENSIFY op, its output tensor, sparsity tables): the
        measured pruned sparse file minus the payloads `sparse_bytes` and the rates predict."""
        import keras

        from pocketflow.export.tflite import to_tflite
        from pocketflow.learners.kernels import kernel_variable
        from pocketflow.learners.transforms.mask import magnitude_mask
        from pocketflow.learners.wrap import kernel_layers
        m = keras.models.clone_model(model)
        m.set_weights(model.get_weights())
        for name, layer, _ in kernel_layers(m):
            if name in self.layers:
                v = kernel_variable(layer)
                v.assign(v.numpy() * magnitude_mask(v.numpy(), s, "unstructured", False))
        from pocketflow.metrics import gzip_size
        by_shape = {L.tfl_shape: L for L in self.layers.values()}
        for d in DEPLOYS:
            blob = to_tflite(m, None if d == "float" else "int8", representative, sparsity=True,
                             weight_scales="per_channel")
            self.sparse_over[d] = (0.0, 0.0)
            raw = self._predict(self._reps(s), d, True, "unstructured", "per_channel")[0]
            fb, k, gz = _parse(blob), 0, gzip_size(blob) - self.base[d].gzip
            for t in fb.subgraphs[0].tensors:
                L = by_shape.get(tuple(int(v) for v in t.shape)) if t.sparsity is not None else None
                if L is not None:   # the real payload's deflate cost replaces the dense buffer's
                    vecs = [v.values.tobytes() for dm in t.sparsity.dimMetadata
                            for v in (dm.arraySegments, dm.arrayIndices) if v is not None]
                    gz -= _deflate(bytes(fb.buffers[t.buffer].data), *vecs) - L.gz0[d]
                    k += 1
            self.sparse_over[d] = ((len(blob) - raw) / max(1, k), gz / max(1, k))

    def _reps(self, s: float) -> dict:
        from pocketflow.learners.reps import KernelRep
        out = {}
        for name, L in self.layers.items():
            shape = L.tfl_shape[1:] + L.tfl_shape[:1] if len(L.tfl_shape) == 4 else L.tfl_shape[::-1]
            dw = L.op == "depthwise"
            if dw:
                shape = (L.tfl_shape[1], L.tfl_shape[2], L.tfl_shape[3], 1)
            out[name] = KernelRep(shape, dw, math.ceil(round(s * L.n, 6)), s > 0)
        return out

    # -- rates: deflate bytes per weight of one simulated kernel buffer, on the sparsity grid --

    def _rate(self, L: _Layer, deploy: str, kind: str, bits: int, i: int, pattern: str,
              per_tensor: bool, sparse: bool) -> tuple[float, float]:
        """(deflate bytes per weight, fraction of zeros as stored) at GRID[i], cached."""
        key = (L.name, deploy, kind, bits, i, pattern, per_tensor, sparse)
        hit = self._rates.get(key)
        if hit is None:
            s = float(GRID[i])
            stored = _store(_snap(L.rows, L.fold, s, kind, bits, pattern), deploy, per_tensor)
            arr = _file_of(stored, L.op, L.tfl_shape)
            z = float(np.mean(stored == 0))
            if sparse and z >= MIN_SPARSITY:
                b = _block(L.op, deploy, pattern, z)
                vals, seg, idx = _csr(arr, b)
                nnz_full = int(round((1 - z) * L.n / b))
                payload = (vals.tobytes(), seg.astype(f"<u{_itype(nnz_full)}").tobytes(),
                           idx.astype(f"<u{_itype(L.tfl_shape[-1] // b - 1)}").tobytes())
            else:
                payload = (arr.tobytes(),)
            hit = self._rates[key] = (_deflate(*payload) / stored.size, z)
        return hit

    def _interp(self, L, deploy, kind, bits, s, pattern, per_tensor, sparse) -> tuple[float, float]:
        """Rate and stored zero fraction at sparsity s: linear between the two grid points."""
        i = int(np.clip(np.searchsorted(GRID, s, side="right") - 1, 0, len(GRID) - 2))
        t = (s - GRID[i]) / (GRID[i + 1] - GRID[i])
        a = self._rate(L, deploy, kind, bits, i, pattern, per_tensor, sparse)
        b = self._rate(L, deploy, kind, bits, i + 1, pattern, per_tensor, sparse) if t > 0 else a
        return a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])

    def warm(self, kinds=(("float", 32),), deploys=DEPLOYS, sparse: bool | None = None,
             pattern: str = "unstructured", weight_scales: str = "per_channel") -> None:
        """Simulate every grid point of these (kind, bits) now, so that predictions cost ~1 ms."""
        for name, L in self.layers.items():
            for d in deploys:
                for kind, bits in kinds:
                    for sp in ([False, True] if sparse is None and self.sparse_over else [bool(sparse)]):
                        for i in range(len(GRID)):
                            self._rate(L, d, kind, bits, i, pattern, _per_tensor(weight_scales, L), sp)

    # -- predictions ----------------------------------------------------------------------------

    def predict(self, reps: dict, deploy: str = "float", sparse_encoding: bool = False,
                pattern: str = "unstructured", weight_scales: str = "per_channel") -> SizePrediction:
        """Bytes of the TFLite file (deploy 'float' or full-integer 'int8') of the model with its
        kernels as `reps` (name -> KernelRep; layers not named keep the baseline's). `pattern`: how
        the zeros were chosen (gzip and block encodings depend on it); `weight_scales`: the int8
        layout (`pocketflow.export.to_tflite`)."""
        if deploy not in DEPLOYS:
            raise ValueError(f"deploy must be one of {DEPLOYS}, not {deploy!r}")
        if sparse_encoding and deploy not in self.sparse_over:
            raise ValueError("calibrate(..., sparse_encoding=True) first")
        raw, gz = self._predict(reps, deploy, sparse_encoding, pattern, weight_scales)
        return SizePrediction(int(round(raw)), int(round(gz)))

    def _predict(self, reps, deploy, sparse, pattern, weight_scales) -> tuple[float, float]:
        raw, gz = self.base[deploy].raw, self.base[deploy].gzip
        item = 4 if deploy == "float" else 1
        for name, rep in reps.items():
            L = self.layers.get(name)
            if L is None:
                continue
            n, s = rep.n, rep.zeros / max(1, rep.n)
            per_tensor = _per_tensor(weight_scales, L)
            kind, bits = (rep.kind, rep.bits) if rep.kind != "float" else ("float", 32)
            r_new, z = self._interp(L, deploy, kind, bits, s, pattern, per_tensor, False)
            r_old, _ = self._interp(L, deploy, "float", 32, L.s0, "unstructured", False, False)
            raw += (n - L.n) * item
            gz += n * r_new - L.n * r_old
            if deploy == "int8":   # float32 scale + int64 zero point per entry, filter and bias
                q = (2 if L.quant > L.channels else 1) * (1 if per_tensor else rep.channels)
                raw, gz = raw + 12 * (q - L.quant), gz + 3.6 * (q - L.quant)
            zs = max(s, z) if deploy == "int8" else s
            if sparse and zs >= MIN_SPARSITY:
                shape, b = _file_shape(rep), _block(L.op, deploy, pattern, zs)
                r_sp, _ = self._interp(L, deploy, kind, bits, s, pattern, per_tensor, True)
                o_raw, o_gz = self.sparse_over[deploy]
                raw += sparse_bytes(shape, int(round((1 - zs) * n)), item, b) - n * item + o_raw
                gz += n * (r_sp - r_new) + o_gz
        return raw, gz

    def ratio(self, reps: dict, metric: str, deploy: str = "float", **kw) -> float:
        """`size` / `download_size`: the baseline's float TFLite file (raw / gzip'd) over the
        predicted file's."""
        p = self.predict(reps, deploy, **kw)
        if metric == "size":
            return self.base["float"].raw / max(1, p.raw)
        if metric == "download_size":
            return self.base["float"].gzip / max(1, p.gzip)
        raise ValueError(f"metric must be 'size' or 'download_size', not {metric!r}")


def _per_tensor(weight_scales: str, L: _Layer) -> bool:
    return weight_scales == "per_tensor" or (weight_scales == "per_tensor_dense" and L.op == "fc")
