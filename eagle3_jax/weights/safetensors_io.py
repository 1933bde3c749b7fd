"""A small, strict reader and writer of the safetensors format.

The reader memory-maps the file and validates the whole header against the
file size before anything is read, following the rules of the reference
implementation (huggingface/safetensors, ``Metadata::validate``): every entry
has a known dtype, a shape of non-negative integers and ``data_offsets``
``[begin, end]`` with ``end - begin`` equal to the tensor's byte size, and the
entries sorted by offset tile the data section exactly, with no gap, no
overlap and no trailing bytes. A truncated download, a hand-edited header or
a file that is not safetensors at all is reported by name instead of failing
deep inside a load or, worse, loading tensors that share bytes. Only regular
files are opened, so a FIFO or a device never blocks a load.

Tensors come back as NumPy arrays (bfloat16 through ``ml_dtypes``) and are
copied out one at a time, so host memory holds at most one tensor beyond
what the caller keeps. Pickled ``.bin`` checkpoints are never read here (the
EAGLE authors' draft heads go through ``eagle3_jax/weights/torch_bin.py``).

Format: 8-byte little-endian header length N, N bytes of UTF-8 JSON
``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``,
then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import reprlib
import stat
import struct
from collections.abc import Callable, Mapping
from typing import BinaryIO, NamedTuple

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
_MAX_HEADER = 100_000_000  # the reference implementation's MAX_HEADER_SIZE
_USIZE_MAX = 2**64 - 1  # offsets and dimensions are u64 in the reference; larger values overflow there
_MAX_DIMS = 32  # the most dimensions every supported NumPy can represent
_INTP_MAX = int(np.iinfo(np.intp).max)  # NumPy's bound on an array's size in bytes
_ENTRY_KEYS = ("dtype", "shape", "data_offsets")


def _make_short_repr() -> reprlib.Repr:
    """A repr clipped for messages: a hostile header may hold megabytes in one value."""
    r = reprlib.Repr()  # keyword arguments need Python 3.12
    r.maxlevel, r.maxdict, r.maxlist, r.maxstring, r.maxother, r.maxlong = 2, 3, 4, 40, 40, 40
    return r


_short = _make_short_repr()


# ------------------------------------------------------------------ opening


def _kind_of(mode: int) -> str | None:
    """What a non-regular file is, in words (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "an unusual file type"


def _require_regular(path: str, mode: int, what: str) -> None:
    kind = _kind_of(mode)
    if kind is not None:
        raise CheckpointError(f"{path}: is {kind}, not a {what} (only regular files are read)")


def open_regular_file(path: str | os.PathLike, what: str = "file") -> BinaryIO:
    """Opens ``path`` for binary reading; anything but a regular file is a CheckpointError.

    The path is checked with ``os.stat`` before it is opened, because opening
    a FIFO for reading blocks until a writer appears; the descriptor is also
    opened non-blocking and checked again with ``fstat``, so a file swapped
    for a FIFO in between cannot block either. Symlinks are followed (Hugging
    Face cache snapshots are made of them). ``what`` names the expected file
    in messages, e.g. "safetensors file".
    """
    path = os.fspath(path)
    try:
        _require_regular(path, os.stat(path).st_mode, what)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e.strerror or e})") from None
    try:
        _require_regular(path, os.fstat(fd).st_mode, what)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _json_type(value: object) -> str:
    """The JSON type of a parsed value, with an article ('a string', 'null', ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def describe_json(value: object) -> str:
    """A short description of a JSON value for messages: its type and a clipped repr."""
    return f"{_json_type(value)} ({_short.repr(value)})"


class JSONProblem(ValueError):
    """Why bytes are not acceptable JSON, as a phrase ("not JSON", "not UTF-8", ...)."""


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise JSONProblem(f"JSON that repeats the key {_short.repr(key)}")
        out[key] = value
    return out


def _refuse_constant(name: str) -> object:
    raise JSONProblem(f"not JSON ({name} is not a JSON value)")


def loads_strict(raw: bytes) -> object:
    """Parses UTF-8 JSON, refusing what the reference (serde_json) refuses.

    Python's ``json`` also accepts NaN/Infinity and silently keeps the last of
    repeated keys, which lets two readers see two different headers; both are
    refused here. Raises :class:`JSONProblem` (never RecursionError).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JSONProblem("not UTF-8") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except JSONProblem:
        raise
    except RecursionError:
        raise JSONProblem("not JSON (nested too deeply)") from None
    except ValueError:  # JSONDecodeError, or an integer too long to convert
        raise JSONProblem("not JSON") from None


# ------------------------------------------------------------------ reading


class _Entry(NamedTuple):
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _is_u64(value: object) -> bool:
    """A JSON integer the reference reads as a usize (booleans and floats are not integers)."""
    return type(value) is int and 0 <= value <= _USIZE_MAX


def _nbytes(shape: tuple[int, ...], itemsize: int) -> int | None:
    """prod(shape) * itemsize, or None for a shape too large to hold.

    The reference refuses a shape whose running product overflows u64;
    NumPy also refuses one whose non-zero dimensions times the item size
    exceed its signed index type (even when a zero dimension makes the tensor
    empty), so that bound, which implies the reference's, is the one checked.
    """
    n, nonzero = 1, 1
    for d in (*shape, itemsize):
        n *= d
        nonzero *= d or 1
        if nonzero > _INTP_MAX:
            return None
    return n


class SafetensorsFile:
    """A validated, memory-mapped safetensors file.

    >>> f = SafetensorsFile("model.safetensors")
    >>> f.shape("lm_head.weight"), f.dtype("lm_head.weight")
    >>> array = f.read("lm_head.weight")   # a copy, safe to keep

    Raises CheckpointError, naming the file and the tensor, for anything that
    is not a valid safetensors file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with open_regular_file(self.path, "safetensors file") as fh:
            size = os.fstat(fh.fileno()).st_size
            header, n = self._read_header(fh, size)
            self.metadata: dict[str, str] = self._check_metadata(header.pop("__metadata__", None))
            self._data_start = 8 + n
            data_size = size - self._data_start
            self._entries: dict[str, _Entry] = {}
            for name, info in header.items():
                self._entries[name] = self._check_entry(name, info, data_size)
            self._check_layout(data_size)
            try:
                self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if data_size > 0 else None
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{self.path}: cannot memory-map the file ({e})") from None

    def _read_header(self, fh: BinaryIO, size: int) -> tuple[dict, int]:
        """The parsed JSON header (a dict) and its length in bytes."""
        if size < 8:
            raise CheckpointError(f"{self.path}: not a safetensors file (only {size} bytes)")
        prefix = fh.read(8)
        if len(prefix) != 8:
            raise CheckpointError(f"{self.path}: truncated file (it shrank while being opened)")
        (n,) = struct.unpack("<Q", prefix)
        if n > min(size - 8, _MAX_HEADER):
            limit = "exceeds the 100,000,000-byte limit" if n > _MAX_HEADER else f"does not fit in {size} bytes"
            raise CheckpointError(f"{self.path}: not a safetensors file, or truncated (header length {n} {limit})")
        raw = fh.read(n)
        if len(raw) != n:
            raise CheckpointError(f"{self.path}: truncated file (the header ends past the end of the file)")
        try:
            header = loads_strict(raw)
        except JSONProblem as e:
            raise CheckpointError(f"{self.path}: not a safetensors file (header is {e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: not a safetensors file (header is not a JSON object)")
        return header, n

    def _check_metadata(self, metadata: object) -> dict[str, str]:
        """``__metadata__``: absent, null, or an object whose values are strings."""
        if metadata is None:
            return {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointError(
                f"{self.path}: __metadata__ must be an object of strings, not {describe_json(metadata)}")
        return metadata

    def _check_entry(self, name: str, info: object, data_size: int) -> _Entry:
        """Validates one header entry on its own (types, sizes, bounds)."""
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: the header entry is {describe_json(info)}, "
                                  "not an object with dtype, shape and data_offsets")
        missing = [k for k in _ENTRY_KEYS if k not in info]
        if missing:
            raise CheckpointError(f"{where}: the header entry has no {' or '.join(missing)}")
        dtype_name, shape, offsets = (info[k] for k in _ENTRY_KEYS)
        if not isinstance(dtype_name, str):
            raise CheckpointError(f"{where}: dtype must be a string such as \"BF16\", not {describe_json(dtype_name)}")
        if dtype_name not in DTYPES:
            raise CheckpointError(f"{where} has unsupported dtype {_short.repr(dtype_name)} "
                                  f"(supported: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
            raise CheckpointError(f"{where}: shape must be a list of non-negative integers, not {describe_json(shape)}")
        if len(shape) > _MAX_DIMS:
            raise CheckpointError(f"{where}: shape has {len(shape)} dimensions (at most {_MAX_DIMS} are supported)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_u64(o) for o in offsets)):
            raise CheckpointError(f"{where}: data_offsets must be [begin, end] with non-negative integers, "
                                  f"not {describe_json(offsets)}")
        begin, end = offsets
        if end < begin:
            raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] end before they begin")
        dtype, shape = DTYPES[dtype_name], tuple(shape)
        nbytes = _nbytes(shape, dtype.itemsize)
        if nbytes is None:
            raise CheckpointError(f"{where}: shape {list(shape)} {dtype_name} is too large (its byte size overflows)")
        if end - begin != nbytes:
            raise CheckpointError(f"{where} declares shape {list(shape)} {dtype_name} "
                                  f"({nbytes} bytes) but spans {end - begin} bytes")
        if end > data_size:
            raise CheckpointError(
                f"{self.path}: truncated file: tensor {name!r} ends at byte {end} of the data section "
                f"but the file holds only {data_size} bytes of data (re-download or re-convert it)")
        return _Entry(dtype, shape, begin, end)

    def _check_layout(self, data_size: int) -> None:
        """The entries, sorted by offsets, must tile the data section exactly (as the reference requires)."""
        covered, previous = 0, None
        for name, e in sorted(self._entries.items(), key=lambda item: (item[1].begin, item[1].end)):
            if e.begin < covered:
                raise CheckpointError(f"{self.path}: tensor {name!r} (bytes {e.begin}-{e.end}) overlaps tensor "
                                      f"{previous!r} (which ends at byte {covered}) in the data section")
            if e.begin > covered:
                raise CheckpointError(f"{self.path}: bytes {covered}-{e.begin} of the data section belong to no "
                                      f"tensor (a gap before tensor {name!r}); tensor data must be contiguous")
            covered, previous = e.end, name
        if covered != data_size:
            raise CheckpointError(f"{self.path}: the tensors cover {covered} bytes but the data section holds "
                                  f"{data_size}: {data_size - covered} trailing bytes belong to no tensor")

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name].dtype

    def read(self, name: str, dtype: np.dtype | None = None) -> np.ndarray:
        """A copy of tensor ``name`` (cast to ``dtype`` if given)."""
        if name not in self._entries:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        src_dtype, shape, begin, end = self._entries[name]
        if end == begin:
            return np.zeros(shape, dtype or src_dtype)
        view = np.frombuffer(self._mmap, dtype=src_dtype, count=math.prod(shape), offset=self._data_start + begin)
        with np.errstate(over="ignore", invalid="ignore"):  # a cast to Inf is the loader's finiteness check's call
            return np.array(view.reshape(shape), dtype=dtype or src_dtype, copy=True)


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
    """Writes ``tensors`` as a safetensors file (names sorted, 8-byte aligned header)."""
    arrays = {name: np.asarray(tensors[name]) for name in tensors}
    save_streamed({name: (a.shape, a.dtype) for name, a in arrays.items()}, arrays.__getitem__, path, metadata)


def save_streamed(specs: Mapping[str, tuple[tuple[int, ...], np.dtype]], produce: Callable[[str], np.ndarray],
                  path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Writes a safetensors file whose tensors are made one at a time, in name order.

    ``specs`` gives each tensor's (shape, dtype) up front (the header comes
    first); ``produce(name)`` returns the tensor, which must match its spec.
    Host memory holds one tensor at a time, so a checkpoint larger than memory
    can be written (a dequantized GGUF, ``eagle3_jax/weights/gguf_io.py``).
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    names = sorted(specs)
    for name in names:
        shape, dtype = tuple(int(d) for d in specs[name][0]), np.dtype(specs[name][1])
        if dtype not in _NAMES:
            raise CheckpointError(f"cannot save tensor {name!r} of dtype {dtype} as safetensors")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            arr = np.ascontiguousarray(produce(name))
            entry = header[name]
            if list(arr.shape) != entry["shape"] or _NAMES.get(arr.dtype) != entry["dtype"]:
                raise CheckpointError(f"tensor {name!r}: made as {arr.dtype} {list(arr.shape)}, announced as "
                                      f"{entry['dtype']} {entry['shape']}")
            f.write(arr.tobytes())


# ---------------------------------------------------------- checkpoint dirs


def directory_metadata(path: str) -> dict | None:
    """The ``__metadata__`` of ``path/model.safetensors``, or None when there is no such readable file
    (how eagle3-jax recognises the directories it wrote: a marker key in that metadata)."""
    weights = os.path.join(path, "model.safetensors")
    if not os.path.isfile(weights):
        return None
    try:
        metadata = SafetensorsFile(weights).metadata
    except CheckpointError:
        return None
    return metadata if isinstance(metadata, dict) else None


def check_shard_name(shard: object, *, index: str, tensor: str) -> str:
    """``shard`` if it is a plain relative file name that stays inside the model directory.

    The check is on the name written in the index, not on where it leads:
    Hugging Face cache snapshots are symlinks into ``../../blobs``, which is
    fine, but an index (a file downloaded from anywhere) must not name
    ``../../etc/passwd`` or ``/elsewhere/model.safetensors``. Refused: non
    strings, empty names, absolute paths, drive letters, backslashes, NUL,
    and empty, ``.`` or ``..`` path components.
    """
    if not isinstance(shard, str):
        raise CheckpointError(f"{index}: weight_map[{tensor!r}] must be a shard file name (a string), "
                              f"not {describe_json(shard)}")
    parts = shard.split("/")
    if (not shard or os.path.isabs(shard) or any(c in shard for c in "\\:\0")
            or any(p in ("", ".", "..") for p in parts)):
        raise CheckpointError(f"{index}: weight_map[{tensor!r}] names the shard {shard!r}, which is not a plain "
                              "file name inside the model directory (absolute paths, drive letters, backslashes "
                              "and empty, '.' or '..' components are refused)")
    return shard


def read_json_file(path: str, what: str) -> object:
    """A small JSON file (an index, a marker), parsed strictly; CheckpointError naming it otherwise.

    Only regular files are read (never a FIFO), at most ``_MAX_HEADER``
    bytes, and a UTF-8 byte-order mark is tolerated (hand-edited files).
    """
    with open_regular_file(path, what) as f:
        try:
            raw = f.read(_MAX_HEADER + 1)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) > _MAX_HEADER:
        raise CheckpointError(f"{path}: larger than {_MAX_HEADER:,} bytes, which is not a {what}")
    try:
        return loads_strict(raw.removeprefix(b"\xef\xbb\xbf"))
    except JSONProblem as e:
        raise CheckpointError(f"{path}: malformed {what} (the file is {e})") from None


def read_index(index: str) -> dict[str, str]:
    """The validated ``weight_map`` (tensor name -> shard file name) of a safetensors index file."""
    data = read_json_file(index, "safetensors index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        found = describe_json(data) if not isinstance(data, dict) else (
            "no 'weight_map'" if "weight_map" not in data else f"'weight_map' {describe_json(weight_map)}")
        raise CheckpointError(f"{index}: malformed safetensors index (expected a 'weight_map' object; found {found})")
    if not weight_map:
        raise CheckpointError(f"{index}: malformed safetensors index (the 'weight_map' object is empty)")
    return {tensor: check_shard_name(shard, index=index, tensor=tensor) for tensor, shard in weight_map.items()}


def checkpoint_files(model_dir: str, index_name: str = "model.safetensors.index.json",
                     single_name: str = "model.safetensors") -> list[str]:
    """The safetensors files of a (possibly sharded) HF checkpoint directory, in shard order.

    Raises CheckpointError when there are none (naming any ``.bin`` files found,
    which are refused because loading them would unpickle untrusted data),
    when the index is malformed, names a shard outside the directory, or names
    a shard that is missing.

    The index only says which files to read: the tensors are whatever those
    shards' own headers hold, and the loader checks them against the config
    (missing, unexpected and duplicated tensors are errors there), so a
    weight_map entry pointing at the wrong shard is harmless and does not fail.
    """
    index = os.path.join(model_dir, index_name)
    if os.path.lexists(index):
        shards = sorted(set(read_index(index).values()))
        paths = [os.path.join(model_dir, *s.split("/")) for s in shards]
        missing = [s for s, p in zip(shards, paths) if not os.path.exists(p)]
        if missing:
            raise CheckpointError(f"{index}: shard file(s) missing from {model_dir}: {', '.join(missing)}")
        return paths
    single = os.path.join(model_dir, single_name)
    if os.path.lexists(single):
        return [single]
    try:
        found = sorted(os.listdir(model_dir)) if os.path.isdir(model_dir) else []
    except OSError as e:
        raise CheckpointError(f"{model_dir}: cannot list the directory ({e.strerror or e})") from None
    st = [f for f in found if f.endswith(".safetensors")]
    if len(st) == 1:
        return [os.path.join(model_dir, st[0])]
    bins = [f for f in found if f.endswith((".bin", ".pt", ".pth"))]
    hint = (f" It holds {', '.join(bins)}: pickled PyTorch checkpoints are not loaded (unsafe); "
            "convert them to safetensors first." if bins else "")
    raise CheckpointError(f"{model_dir}: no {single_name} or {index_name} found.{hint}")
