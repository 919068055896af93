"""The packed weights file: compressed kernels stored in exactly their accounted bytes.

<stem>.bin holds, per kernel in model order, byte-aligned sections and nothing else, so its
size is exactly the kernels' storage bytes (`pocketflow.learners.accounting.storage`);
<stem>.json is the manifest (names, shapes, kind, bits, layout, section offsets). Conventions:
  * little-endian; bit-packed codes are LSB-first, contiguous, the last byte zero-padded;
  * channel c of a weight at flat C-order index i is i % channels (depthwise: in * mult + m);
  * dense / bitmap list values in kernel C order; bitmap: 1 bit per weight, 1 = stored;
  * csr: rows are channels, columns a channel's weights in C order; int32 row_ptr[channels+1],
    uint16 (or uint32) col_idx[nnz], values row by row;
  * codes: float -> raw float32; grid -> u = q + 2^(b-1) - 1, value = (u - 2^(b-1) + 1) * scale[c],
    table = float32 scale[channels]; codebook -> u indexes table = float32[2^b] (unused slots 0).

Only the byte format lives here (NumPy in, bytes out, and back): the learners turn their
wrapped layers into kernels and settings, so reading a packed file needs no Keras.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pocketflow.errors import PocketFlowError

FORMAT = "pocketflow-packed-1"


def channels(shape, depthwise: bool) -> int:
    """Output channels of a kernel of `shape` (depthwise: in * multiplier)."""
    return int(shape[-2] * shape[-1]) if depthwise else int(shape[-1])


def index_bytes(weights_per_channel: int) -> int:
    """Bytes of one CSR column index: uint16 when a channel has at most 65536 weights."""
    return 2 if weights_per_channel <= 65536 else 4


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    codes = np.asarray(codes).ravel()
    if bits == 32:
        return codes.astype("<u4").tobytes()
    b = ((codes.astype(np.uint64)[:, None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8)
    return np.packbits(b.ravel(), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    if bits == 32:
        return np.frombuffer(data, "<u4", count).astype(np.uint64)
    b = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")[: count * bits]
    return (b.reshape(count, bits).astype(np.uint64) << np.arange(bits, dtype=np.uint64)).sum(axis=1)


def _positions(flat: np.ndarray, ch: int, layout: str) -> tuple[np.ndarray, list]:
    """Flat indexes of the stored values, in storage order, and the index sections."""
    if layout == "dense":
        return np.arange(flat.size), []
    if layout == "bitmap":
        stored = flat != 0
        return np.flatnonzero(stored), [("bitmap", np.packbits(stored, bitorder="little").tobytes())]
    mat = flat.reshape(-1, ch).T  # (channels, weights per channel)
    rows, cols = np.nonzero(mat)
    row_ptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=ch))]).astype("<i4")
    col_dtype = "<u2" if index_bytes(mat.shape[1]) == 2 else "<u4"
    return cols * ch + rows, [("row_ptr", row_ptr.tobytes()), ("col_idx", cols.astype(col_dtype).tobytes())]


def _table_and_codes(name: str, kind: str, bits: int, values: np.ndarray, channel: np.ndarray,
                     scales: np.ndarray | None):
    if kind == "float":
        return b"", values.astype("<f4").view("<u4")
    if kind == "grid":
        q = np.round(values / scales[channel]).astype(np.int64)
        return scales.astype("<f4").tobytes(), (q + 2 ** (bits - 1) - 1).astype(np.uint64)
    uniq = np.unique(values)
    if uniq.size > 2 ** bits:
        raise PocketFlowError(f"layer '{name}': {uniq.size} distinct values do not fit a "
                              f"{bits}-bit codebook")
    table = np.zeros(2 ** bits, np.float32)
    table[: uniq.size] = uniq
    return table.astype("<f4").tobytes(), np.searchsorted(uniq, values).astype(np.uint64)


def encode_layer(name: str, kernel: np.ndarray, depthwise: bool, kind: str, bits: int, layout: str,
                 scales: np.ndarray | None = None) -> tuple[dict, bytes]:
    """One kernel's manifest entry and bytes.

    kind 'float' (bits 32), 'grid' (`scales`: the float32 scale of every output channel, the
    kernel an integer multiple of it) or 'codebook' (at most 2^bits distinct values); layout
    'dense', 'bitmap' or 'csr' (zeros left out)."""
    k = np.asarray(kernel, np.float32)
    flat, ch = k.ravel(), channels(k.shape, depthwise)
    pos, sections = _positions(flat, ch, layout)
    table, codes = _table_and_codes(name, kind, bits, flat[pos], pos % ch, scales)
    sections.append(("codes", pack_bits(codes, 32 if kind == "float" else bits)))
    if table:
        sections.append(("table", table))
    blob = b"".join(s for _, s in sections)
    entry = {"name": name, "shape": list(k.shape), "depthwise": bool(depthwise), "kind": kind,
             "bits": bits, "layout": layout, "nnz": int(pos.size), "bytes": len(blob), "sections": []}
    off = 0
    for sname, s in sections:
        entry["sections"].append({"name": sname, "offset": off, "bytes": len(s)})
        off += len(s)
    return entry, blob


def write_packed(layers, out_dir, stem: str = "weights_packed") -> dict:
    """Write <stem>.bin (the layers' bytes, in order) and <stem>.json (the manifest) from
    `layers`, (entry, bytes) pairs made by `encode_layer`."""
    from pocketflow.io import atomic_write_bytes, atomic_write_text
    entries, blobs, off = [], [], 0
    for entry, blob in layers:
        entry = {**entry, "offset": off}
        off += len(blob)
        entries.append(entry)
        blobs.append(blob)
    out = Path(out_dir)
    binp = atomic_write_bytes(out / f"{stem}.bin", b"".join(blobs))
    manifest = {"format": FORMAT, "payload_bytes": off, "layers": entries,
                "doc": "see pocketflow.export.packed for the layout"}
    js = atomic_write_text(out / f"{stem}.json", json.dumps(manifest, indent=1))
    return {"packed": {"path": str(binp), "bytes": off},
            "packed_manifest": {"path": str(js), "bytes": js.stat().st_size}}


def _stored_positions(e: dict, sec: dict, n: int, ch: int) -> np.ndarray:
    """The inverse of `_positions`: flat indexes of a layer's stored values."""
    if e["layout"] == "dense":
        return np.arange(n)
    if e["layout"] == "bitmap":
        return np.flatnonzero(np.unpackbits(np.frombuffer(sec["bitmap"], np.uint8), bitorder="little")[:n])
    row_ptr = np.frombuffer(sec["row_ptr"], "<i4")
    cols = np.frombuffer(sec["col_idx"], "<u2" if len(sec["col_idx"]) == 2 * e["nnz"] else "<u4")
    rows = np.repeat(np.arange(ch), np.diff(row_ptr))
    return cols.astype(np.int64) * ch + rows


def read_packed(bin_path, manifest_path) -> dict[str, np.ndarray]:
    """Decode a packed export back to float32 kernels (the inverse of `write_packed`)."""
    data = Path(bin_path).read_bytes()
    manifest = json.loads(Path(manifest_path).read_text())
    out = {}
    for e in manifest["layers"]:
        shape, n = tuple(e["shape"]), int(np.prod(e["shape"]))
        ch = channels(shape, e["depthwise"])
        sec = {s["name"]: data[e["offset"] + s["offset"]: e["offset"] + s["offset"] + s["bytes"]]
               for s in e["sections"]}
        nnz, kind, bits = e["nnz"], e["kind"], e["bits"]
        pos = _stored_positions(e, sec, n, ch)
        codes = unpack_bits(sec["codes"], 32 if kind == "float" else bits, nnz)
        if kind == "float":
            vals = codes.astype("<u4").view("<f4")
        elif kind == "grid":
            scales = np.frombuffer(sec["table"], "<f4")
            q = codes.astype(np.int64) - (2 ** (bits - 1) - 1)
            vals = q.astype(np.float32) * scales[pos % ch]
        else:
            vals = np.frombuffer(sec["table"], "<f4")[codes.astype(np.int64)]
        flat = np.zeros(n, np.float32)
        flat[pos] = vals
        out[e["name"]] = flat.reshape(shape)
    return out
