"""The one safetensors layer: header validation, lazy tensor reads, byte-range writes.

Every safetensors file soteria reads or writes goes through here: :func:`read_safetensors`
parses and validates a header without reading tensor data, :func:`read_tensor` reads one tensor
straight into memory (NaN/Inf checked in blocks), :func:`write_safetensors` rewrites a file with
new metadata and some tensors edited while copying the other bytes through in the kernel, and
:func:`save_tensors` writes a new file atomically.
"""

from __future__ import annotations

import errno
import json
import os
import reprlib
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_file

__all__ = [
    "EDITABLE",
    "FLOAT_DTYPES",
    "SafetensorsFile",
    "add_metadata",
    "check_finite",
    "encode_header",
    "read_safetensors",
    "read_tensor",
    "save_tensors",
    "write_safetensors",
]

_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
#: Dtypes the steering kernels edit in place.
EDITABLE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
#: Float dtypes a harm tensor may be read as.
FLOAT_DTYPES = {**EDITABLE, "F64": torch.float64}
_COPY_CHUNK = 8 << 20
_FINITE_BLOCK = 1 << 20  # elements checked for NaN/Inf at a time


@dataclass
class SafetensorsFile:
    """A parsed safetensors file: ``header`` (JSON, file order, ``__metadata__`` included) and
    ``data_start`` (byte offset of the data section, ``8 + header length``)."""

    path: Path
    header: dict[str, Any]
    data_start: int

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.header.get("__metadata__") or {})

    def tensors(self) -> list[tuple[str, dict[str, Any]]]:
        """``(name, {"dtype", "shape", "data_offsets"})`` in data order."""
        items = [(k, v) for k, v in self.header.items() if k != "__metadata__"]
        return sorted(items, key=lambda kv: kv[1]["data_offsets"][0])

    def numel(self) -> int:
        return sum(_numel(info["shape"]) for _, info in self.tensors())


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _is_index(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_entry(path: Path, name: str, info) -> None:
    """One tensor's header entry, checked before anything reads it: ValueError names the tensor
    (values shown abridged: a crafted header may hold huge ones)."""
    where, short = f"{path}: tensor {name!r}", reprlib.repr
    if not isinstance(info, dict):
        raise ValueError(f"{where} has header entry {short(info)}; expected an object with dtype, shape, data_offsets")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise ValueError(f"{where} has a header entry without {', '.join(missing)}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
        raise ValueError(f"{where} has unknown dtype {short(dtype)}")
    if not isinstance(shape, list) or not all(_is_index(s) for s in shape):
        raise ValueError(f"{where} has shape {short(shape)}; expected a list of non-negative ints")
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_index, offsets)) and offsets[0] <= offsets[1]
    ):
        raise ValueError(f"{where} has data_offsets {short(offsets)}; expected ints [begin, end], 0 <= begin <= end")


def read_safetensors(path: str | os.PathLike) -> SafetensorsFile:
    """Parse and validate a safetensors header (no tensor data is read). ValueError names the defect."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000 or 8 + n > size:
            raise ValueError(f"{path} is not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is not a JSON object")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ValueError(f"{path}: __metadata__ must map str to str")
    for name, info in header.items():
        if name != "__metadata__":
            _check_entry(path, name, info)
    sf = SafetensorsFile(path, header, 8 + n)
    end = 0
    for name, info in sf.tensors():
        dtype, shape, (a, b) = info["dtype"], info["shape"], info["data_offsets"]
        if a != end or b - a != _numel(shape) * _ITEMSIZE[dtype]:
            raise ValueError(f"{path}: tensor {name!r} has data_offsets {[a, b]} inconsistent with its layout")
        end = b
    if sf.data_start + end != size:
        raise ValueError(f"{path}: data section is {size - sf.data_start} bytes, the header describes {end}")
    return sf


def encode_header(header: Mapping[str, Any]) -> bytes:
    """8-byte little-endian length + compact JSON (``__metadata__`` first), space-padded to 8 bytes,
    as the safetensors library writes it."""
    ordered = {}
    if "__metadata__" in header:
        ordered["__metadata__"] = header["__metadata__"]
    ordered.update((k, v) for k, v in header.items() if k != "__metadata__")
    raw = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def _copy_range(src: int, dst: int, offset: int, count: int) -> None:
    """Append ``count`` bytes of ``src`` from ``offset`` to ``dst`` (in the kernel where possible)."""
    fast = hasattr(os, "copy_file_range")
    while count > 0:
        if fast:
            try:
                n = os.copy_file_range(src, dst, min(count, 1 << 30), offset)
            except OSError as e:
                if e.errno not in (errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                    raise
                fast = False
                continue
        else:
            chunk = os.pread(src, min(count, _COPY_CHUNK), offset)
            _write_all(dst, chunk)
            n = len(chunk)
        if n == 0:
            raise OSError(f"unexpected end of file while copying ({count} bytes left)")
        offset += n
        count -= n


def _read_bytes(fd: int, offset: int, n: int) -> torch.Tensor:
    buf = torch.empty(n, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    got = 0
    while got < n:
        k = os.preadv(fd, [view[got:]], offset + got)
        if k == 0:
            raise OSError(f"unexpected end of file reading {n} bytes at {offset}")
        got += k
    return buf


def write_safetensors(
    src: SafetensorsFile,
    dst: str | os.PathLike,
    *,
    metadata: Mapping[str, str] | None = None,
    edits: Mapping[str, Callable[[torch.Tensor], None]] | None = None,
) -> None:
    """Write ``src`` to the new file ``dst`` with its header kept (tensor order and offsets) and
    ``metadata`` as ``__metadata__`` (None: unchanged).

    Tensors named in ``edits`` are read one at a time (as ``[shape]`` tensors of their dtype,
    which must be F32/F16/BF16), passed to their callable, which edits them in place, and
    written; all other bytes are copied through unchanged. ``dst`` must not exist; fsynced.
    """
    edits = dict(edits or {})
    header = dict(src.header)
    if metadata is not None:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    missing = sorted(set(edits) - set(header))
    if missing:
        raise ValueError(f"{src.path} has no tensors {missing}")
    fin = os.open(src.path, os.O_RDONLY)
    try:
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            _write_all(fout, encode_header(header))
            pending: list[int] | None = None  # [start, end) of untouched bytes not yet copied
            for name, info in src.tensors():
                a, b = info["data_offsets"]
                if name not in edits:
                    pending = [pending[0], b] if pending else [a, b]
                    continue
                if pending:
                    _copy_range(fin, fout, src.data_start + pending[0], pending[1] - pending[0])
                    pending = None
                if info["dtype"] not in EDITABLE:
                    raise ValueError(f"{src.path}: tensor {name!r} is {info['dtype']}; only F32/F16/BF16 can be edited")
                buf = _read_bytes(fin, src.data_start + a, b - a)
                edits[name](buf.view(EDITABLE[info["dtype"]]).view([int(s) for s in info["shape"]]))
                _write_all(fout, buf.numpy())
                del buf
            if pending:
                _copy_range(fin, fout, src.data_start + pending[0], pending[1] - pending[0])
            os.fsync(fout)
        finally:
            os.close(fout)
    finally:
        os.close(fin)


def add_metadata(path: str | os.PathLike, metadata: Mapping[str, str]) -> None:
    """Add ``metadata`` entries to the ``__metadata__`` of safetensors file ``path``: rewrites the
    file through a temporary sibling (the data bytes are copied, not re-encoded) and replaces it."""
    src = read_safetensors(path)
    with atomic_file(path) as tmp:
        write_safetensors(src, tmp, metadata={**src.metadata, **metadata})


def read_tensor(sf: SafetensorsFile | str | os.PathLike, name: str) -> torch.Tensor:
    """Tensor ``name`` of a safetensors file, read straight into one CPU tensor of its float dtype
    and checked for NaN/Inf in blocks (one tensor of memory; ValueError names the first bad index)."""
    sf = sf if isinstance(sf, SafetensorsFile) else read_safetensors(sf)
    info = sf.header.get(name)
    if info is None or name == "__metadata__":
        raise ValueError(f"{sf.path} has no tensor {name!r}")
    dtype = FLOAT_DTYPES.get(info["dtype"])
    if dtype is None:
        raise ValueError(f"tensor {name!r} in {sf.path} has dtype {info['dtype']}, not a float type")
    a, b = info["data_offsets"]
    fd = os.open(sf.path, os.O_RDONLY)
    try:
        t = _read_bytes(fd, sf.data_start + a, b - a).view(dtype).view([int(v) for v in info["shape"]])
    finally:
        os.close(fd)
    check_finite(t, f"tensor {name!r} in {sf.path}")
    return t


def check_finite(t: torch.Tensor, what: str) -> None:
    """ValueError naming the count and first index of NaN/Inf values in ``t`` (checked in blocks)."""
    flat = t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)
    for start in range(0, flat.numel(), _FINITE_BLOCK):
        block = flat[start : start + _FINITE_BLOCK]
        if not bool(torch.isfinite(block).all()):
            bad = ~torch.isfinite(flat)
            first = int(bad.nonzero()[0])
            idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), t.shape)) if t.ndim else ()
            raise ValueError(
                f"{what} holds {int(bad.sum())} NaN/Inf values (first at index {idx}: {flat[first].item()})"
            )


def save_tensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str]) -> Path:
    """Write ``tensors`` (contiguous CPU copies are made) to a new safetensors file, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=dict(metadata))
    return path
