"""A small, strict reader and writer of the safetensors format.

The reader memory-maps the file and validates the header against the file
size before anything is read, so a truncated download or a file that is not
safetensors at all is reported by name instead of failing deep inside a load.
Tensors come back as NumPy arrays (bfloat16 through ``ml_dtypes``) and are
copied out one at a time, so host memory holds at most one tensor beyond
what the caller keeps. Pickled ``.bin`` checkpoints are never read.

Format: 8-byte little-endian header length N, N bytes of JSON
``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``,
then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

from eagle3_jax.errors import CheckpointError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """A validated, memory-mapped safetensors file.

    >>> f = SafetensorsFile("model.safetensors")
    >>> f.shape("lm_head.weight"), f.dtype("lm_head.weight")
    >>> array = f.read("lm_head.weight")   # a copy, safe to keep
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            fh = open(self.path, "rb")
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e.strerror})") from None
        with fh:
            if size < 8:
                raise CheckpointError(f"{self.path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(
                    f"{self.path}: not a safetensors file, or truncated (header length {n} does not fit in {size} bytes)"
                )
            raw = fh.read(n)
            try:
                header = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(f"{self.path}: not a safetensors file (header is not JSON)") from None
            if not isinstance(header, dict):
                raise CheckpointError(f"{self.path}: not a safetensors file (header is not a JSON object)")
            self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
            self._data_start = 8 + n
            data_size = size - self._data_start
            self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
            for name, info in header.items():
                self._entries[name] = self._check_entry(name, info, data_size)
            self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size > self._data_start else None

    def _check_entry(self, name, info, data_size):
        try:
            dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            shape = tuple(int(d) for d in shape)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{self.path}: malformed header entry for tensor {name!r}") from None
        if dtype_name not in DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype_name}")
        dtype = DTYPES[dtype_name]
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} declares shape {list(shape)} {dtype_name} "
                f"({nbytes} bytes) but spans {end - begin} bytes"
            )
        if end > data_size:
            raise CheckpointError(
                f"{self.path}: truncated file: tensor {name!r} ends at byte {end} of the data section "
                f"but the file holds only {data_size} bytes of data (re-download or re-convert it)"
            )
        return dtype, shape, begin, end

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def read(self, name: str, dtype: np.dtype | None = None) -> np.ndarray:
        """A copy of tensor ``name`` (cast to ``dtype`` if given)."""
        if name not in self._entries:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        src_dtype, shape, begin, end = self._entries[name]
        if end == begin:
            return np.zeros(shape, dtype or src_dtype)
        view = np.frombuffer(self._mmap, dtype=src_dtype, count=math.prod(shape), offset=self._data_start + begin)
        return np.array(view.reshape(shape), dtype=dtype or src_dtype, copy=True)


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
    """Writes ``tensors`` as a safetensors file (names sorted, 8-byte aligned header)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(np.asarray(tensors[name]))
        if arr.dtype not in _NAMES:
            raise CheckpointError(f"cannot save tensor {name!r} of dtype {arr.dtype} as safetensors")
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in arrays:
            f.write(arr.tobytes())


def checkpoint_files(model_dir: str, index_name: str = "model.safetensors.index.json",
                     single_name: str = "model.safetensors") -> list[str]:
    """The safetensors files of a (possibly sharded) HF checkpoint directory, in shard order.

    Raises CheckpointError when there are none (naming any ``.bin`` files found,
    which are refused because loading them would unpickle untrusted data) or
    when the index names a shard that is missing.
    """
    index = os.path.join(model_dir, index_name)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index}: malformed safetensors index (expected a 'weight_map' object)") from None
        missing = [s for s in shards if not os.path.exists(os.path.join(model_dir, s))]
        if missing:
            raise CheckpointError(f"{index}: shard file(s) missing from {model_dir}: {', '.join(missing)}")
        return [os.path.join(model_dir, s) for s in shards]
    single = os.path.join(model_dir, single_name)
    if os.path.exists(single):
        return [single]
    found = sorted(os.listdir(model_dir)) if os.path.isdir(model_dir) else []
    st = [f for f in found if f.endswith(".safetensors")]
    if len(st) == 1:
        return [os.path.join(model_dir, st[0])]
    bins = [f for f in found if f.endswith((".bin", ".pt", ".pth"))]
    hint = (f" It holds {', '.join(bins)}: pickled PyTorch checkpoints are not loaded (unsafe); "
            "convert them to safetensors first." if bins else "")
    raise CheckpointError(f"{model_dir}: no {single_name} or {index_name} found.{hint}")


def iter_tensors(files: Iterable[str]):
    """Yields (file, name) for every tensor of every file, shard by shard."""
    for path in files:
        f = SafetensorsFile(path)
        for name in f.keys():
            yield f, name
