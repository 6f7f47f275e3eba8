"""A deterministic, pickle-free byte format for named tensors (content-addressed blobs).

Layout: b"HYT1", a little-endian uint32 header length, a UTF-8 JSON header
{"tensors": [{"name", "dtype", "shape", "offset", "nbytes"}, ...]} with names sorted, then the
raw little-endian tensor bytes back to back. The same tensors always encode to the same bytes,
so their sha256 names them on every peer. Decoding validates everything before touching data.
"""

from __future__ import annotations

import json
import struct
import sys

import torch

MAGIC = b"HYT1"
_MAX_HEADER_BYTES = 64 << 20

_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def encode_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    """Serialise `tensors` (any device; copied to CPU) into the HYT1 format.

    Raises:
        ValueError: a dtype the format does not carry (the message lists the supported ones).
    """
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        raise RuntimeError("the tensor codec assumes a little-endian host")
    entries, chunks, offset = [], [], 0
    for name in sorted(tensors):
        t = tensors[name].detach()
        if t.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}; supported: {sorted(_DTYPES)}")
        raw = t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        entries.append(
            {"name": name, "dtype": _NAMES[t.dtype], "shape": list(t.shape), "offset": offset,
             "nbytes": len(raw)}
        )
        chunks.append(raw)
        offset += len(raw)
    header = json.dumps({"tensors": entries}, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + b"".join(chunks)


def decode_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Parse HYT1 bytes into fresh CPU tensors (never shared with `data`).

    Raises:
        ValueError: wrong magic, truncated data, inconsistent header.
    """
    if len(data) < 8 or data[:4] != MAGIC:
        raise ValueError("not a HYT1 tensor blob (bad magic); was it produced by encode_tensors?")
    (header_len,) = struct.unpack("<I", data[4:8])
    if header_len > _MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise ValueError(f"tensor blob header length {header_len} exceeds the blob ({len(data)} bytes)")
    try:
        header = json.loads(data[8 : 8 + header_len])
        entries = header["tensors"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"tensor blob header is not valid JSON with a 'tensors' list: {exc}") from exc
    body = memoryview(data)[8 + header_len :]
    out: dict[str, torch.Tensor] = {}
    for entry in entries:
        out[entry["name"]] = _decode_one(entry, body)
    return out


def _decode_one(entry: dict, body: memoryview) -> torch.Tensor:
    name, dtype_name = entry["name"], entry["dtype"]
    if dtype_name not in _DTYPES:
        raise ValueError(f"tensor {name!r}: unknown dtype {dtype_name!r}")
    dtype = _DTYPES[dtype_name]
    shape = [int(s) for s in entry["shape"]]
    numel = 1
    for s in shape:
        numel *= s
    offset, nbytes = int(entry["offset"]), int(entry["nbytes"])
    itemsize = torch.empty((), dtype=dtype).element_size()
    if nbytes != numel * itemsize or offset < 0 or offset + nbytes > len(body):
        raise ValueError(
            f"tensor {name!r}: {nbytes} bytes at offset {offset} does not fit shape {shape} "
            f"{dtype_name} in a {len(body)}-byte body; the blob is corrupt"
        )
    raw = bytearray(body[offset : offset + nbytes])
    flat = torch.frombuffer(raw, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)


def payload_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes the tensors occupy in their own dtypes (what a wire transfer would carry)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
