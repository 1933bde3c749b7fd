"""Property tests: broken checkpoints load correctly or raise CheckpointError, nothing else.

Safetensors headers are mutated field by field (random JSON in each field,
plausible but wrong offsets, shapes and dtypes, the header length) and the
result is compared with the reference implementation (the ``safetensors``
package, whose Rust core defines the format): whatever it refuses we refuse,
and whatever both accept reads back byte for byte the same. Index files get
random ``weight_map`` values, path traversal and absolute shard names. Each
example has a deadline; FIFOs, which block a plain ``open``, are tested with
a thread guard. No network.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import os
import shutil
import struct
import threading

import ml_dtypes
import numpy as np
import pytest
from conftest import rewrite_safetensors
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import deserialize

from eagle3_jax import CheckpointError, convert_target, load_target
from eagle3_jax.config import Qwen3Config
from eagle3_jax.loading import abstract_target
from eagle3_jax.models.registry import read_target_config
from eagle3_jax.weights import converted
from eagle3_jax.weights.params import flat_params, load_safetensors_into
from eagle3_jax.weights.rules import qwen3_rules
from eagle3_jax.weights.safetensors_io import DTYPES, SafetensorsFile, checkpoint_files, save_file

FUZZ = settings(max_examples=int(os.environ.get("EAGLE3_FUZZ_EXAMPLES", "150")), deadline=datetime.timedelta(seconds=5),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
_NAME_OF = {v: k for k, v in DTYPES.items()}

# ---------------------------------------------------------------- safetensors

BASE = {
    "a.f32": np.arange(6, dtype=np.float32).reshape(2, 3),
    "b.bf16": np.array([1.5, -2.0, 3.25, 0.0], ml_dtypes.bfloat16),
    "c.i64": np.array([-3, 7], np.int64),
    "d.bool": np.array([True, False, True]),
    "e.empty": np.zeros((0, 2), np.float32),
    "f.f32": np.array([9.0, -8.0], np.float32),  # as many bytes as b.bf16: swapping them is valid
}


def _base_file() -> tuple[dict, bytes]:
    """The header (as a dict) and data section of a small valid file holding BASE."""
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, arr in BASE.items():
        raw = arr.tobytes()
        header[name] = {"dtype": _NAME_OF[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return header, data


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)
small_ints = st.integers(-2, 40) | st.sampled_from([2**32, 2**63, 2**64 - 1, 2**64])
plausible = {
    "dtype": st.sampled_from([*DTYPES, "U16", "U32", "U64", "F8_E4M3", "f32", "", "float32"]),
    "shape": st.lists(small_ints, max_size=4) | st.lists(st.just(1), min_size=30, max_size=40),
    "data_offsets": st.lists(small_ints, min_size=2, max_size=2) | st.lists(small_ints, max_size=3),
}


@st.composite
def mutated_files(draw) -> bytes:
    """A BASE file with one to three header mutations, maybe a bad length field and resized data."""
    header, data = _base_file()
    names = [*BASE]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["field", "field", "entry", "drop", "metadata", "swap", "extra", "add",
                                     "valid metadata", "valid shape", "valid dtype", "empty tensor"]))
        name = draw(st.sampled_from(names))
        entry = header.get(name)
        if kind == "entry":
            header[name] = draw(json_values)
        elif kind == "metadata":
            header["__metadata__"] = draw(json_values)
        elif kind == "add":
            header[draw(st.text(max_size=6))] = {f: draw(plausible[f]) for f in plausible}
        elif kind == "valid metadata":
            header["__metadata__"] = draw(st.none() | st.dictionaries(st.text(max_size=6), st.text(max_size=6)))
        elif kind == "empty tensor":
            at = draw(st.sampled_from(sorted({e["data_offsets"][1] for e in _base_file()[0].values() if "dtype" in e})))
            header[draw(st.text(max_size=6))] = {"dtype": draw(plausible["dtype"]),
                                                 "shape": [*draw(st.lists(small_ints, max_size=2)), 0],
                                                 "data_offsets": [at, at]}
        elif kind == "drop" and draw(st.booleans()):
            header.pop(name, None)
        elif not isinstance(entry, dict):
            continue  # the entry was replaced or dropped by an earlier mutation
        elif kind == "field":
            field = draw(st.sampled_from(list(plausible)))
            entry[field] = draw(plausible[field] | json_values)
        elif kind == "drop":
            entry.pop(draw(st.sampled_from(list(plausible))), None)
        elif kind == "valid shape":  # a shape with the same number of elements
            shape = entry.get("shape")
            ints = isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**20 for d in shape)
            n = math.prod(shape) if ints else 1
            entry["shape"] = draw(st.sampled_from([[n], [1, n], [n, 1], [n, 1, 1]]))
        elif kind == "valid dtype":  # a dtype of the same size
            size = DTYPES[entry["dtype"]].itemsize if str(entry.get("dtype")) in DTYPES else 4
            entry["dtype"] = draw(st.sampled_from([k for k, v in DTYPES.items() if v.itemsize == size]))
        elif kind == "extra":
            entry[draw(st.text(max_size=6))] = draw(json_values)
        elif kind == "swap" and isinstance(other := header.get(draw(st.sampled_from(names))), dict):
            entry["data_offsets"], other["data_offsets"] = other.get("data_offsets"), entry.get("data_offsets")
    raw = json.dumps(header).encode()
    raw += b" " * draw(st.integers(0, 7))
    n = len(raw)
    if draw(st.integers(0, 9)) == 0:
        n = draw(st.integers(0, len(raw) + 16) | st.integers(0, 2**64 - 1))
    cut = draw(st.integers(0, 9))
    if cut == 0:
        data = data[: draw(st.integers(0, len(data)))]
    elif cut == 1:
        data += bytes(draw(st.integers(1, 9)))
    return struct.pack("<Q", n) + raw + data


def _reference(blob: bytes) -> dict | None:
    """name -> (dtype, shape, bytes) as the reference implementation reads ``blob``, or None if it refuses."""
    try:
        return {name: (t["dtype"], tuple(t["shape"]), bytes(t["data"])) for name, t in deserialize(blob)}
    except Exception:
        return None


def _ours(path: str) -> dict | CheckpointError:
    try:
        f = SafetensorsFile(path)
        return {name: (_NAME_OF[f.dtype(name)], f.shape(name), f.read(name).tobytes()) for name in f.keys()}
    except CheckpointError as e:  # any other exception type fails the test
        return e


# where we are deliberately stricter than the reference (see safetensors_io): dtypes we do not read,
# more dimensions, or larger empty shapes, than NumPy holds, and entries written as JSON lists (a serde quirk)
_STRICTER = ("unsupported dtype", "dimensions (at most", "is too large", "the header entry is a list")


@FUZZ
@given(blob=mutated_files())
def test_mutated_headers_match_the_reference(tmp_path, blob):
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    ours, ref = _ours(str(path)), _reference(blob)
    event("refused" if isinstance(ours, CheckpointError) else "loaded")  # see --hypothesis-show-statistics
    if isinstance(ours, CheckpointError):
        assert ref is None or any(s in str(ours) for s in _STRICTER), f"the reference reads it; we said: {ours}"
        assert str(path) in str(ours)
    else:
        assert ref is not None, "the reference refuses this file but it loaded"
        assert ours == ref


def test_unmutated_base_file_loads(tmp_path):
    header, data = _base_file()
    raw = json.dumps(header).encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    f = SafetensorsFile(tmp_path / "x.safetensors")
    for name, arr in BASE.items():
        np.testing.assert_array_equal(f.read(name), arr)


@FUZZ
@given(data=st.binary(max_size=64), n=st.integers(0, 2**64 - 1) | st.integers(0, 80))
def test_random_bytes_are_refused_cleanly(tmp_path, data, n):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", n) + data)
    ours = _ours(str(path))
    assert isinstance(ours, CheckpointError) or _reference(path.read_bytes()) is not None


# ---------------------------------------------------------------- index files

@pytest.fixture(scope="module")
def index_tree(tmp_path_factory):
    """root/{outside.safetensors, blobs/, model/} with a two-shard checkpoint in model/ (one shard a symlink)."""
    root = tmp_path_factory.mktemp("index_tree")
    save_file({"secret": np.full(2, 7, np.float32)}, root / "outside.safetensors")
    (root / "blobs").mkdir()
    save_file({"c": np.ones(3, np.float32)}, root / "blobs" / "0123abcd")
    model = root / "model"
    (model / "sub").mkdir(parents=True)
    save_file({"a": np.zeros(2, np.float32), "b": np.ones(2, np.float32)}, model / "model-00001-of-00002.safetensors")
    (model / "model-00002-of-00002.safetensors").symlink_to("../blobs/0123abcd")
    save_file({"d": np.ones(1, np.float32)}, model / "sub" / "extra.safetensors")
    return root


def shard_names(root) -> st.SearchStrategy:
    outside = str(root / "outside.safetensors")
    return st.sampled_from([
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "sub/extra.safetensors",
        "absent.safetensors", "../outside.safetensors", "../../../../etc/passwd", "/etc/passwd", outside,
        "sub/../../outside.safetensors", "sub/../model-00001-of-00002.safetensors",
        "./model-00001-of-00002.safetensors",
        "..", ".", "", "sub", "sub/", "/", "..\\outside.safetensors", "C:\\x", "C:/x", "~/x", "a\0b",
        "model-00001-of-00002.safetensors/", "//" + outside, "sub//extra.safetensors",
    ]) | st.text(max_size=12) | json_values


@st.composite
def mutated_indexes(draw, root) -> object:
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                  "c": "model-00002-of-00002.safetensors"}
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(["a", "b", "c", "x"]) | st.text(max_size=4))
        weight_map[key] = draw(shard_names(root))
    index: object = {"metadata": {"total_size": 28}, "weight_map": weight_map}
    which = draw(st.integers(0, 9))
    if which == 0:
        index = {"metadata": {}, "weight_map": draw(json_values)}
    elif which == 1:
        index = draw(json_values)
    return index


def _inside(path: str, directory: str) -> bool:
    """Whether ``path``, as a name (symlinks not followed), lies inside ``directory``."""
    return os.path.commonpath([os.path.normpath(path), os.path.normpath(directory)]) == os.path.normpath(directory)


@FUZZ
@given(data=st.data())
def test_mutated_indexes_never_leave_the_model_directory(index_tree, data):
    model = str(index_tree / "model")
    index = data.draw(mutated_indexes(index_tree))
    (index_tree / "model" / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        files = checkpoint_files(model)
    except CheckpointError as e:
        assert "model.safetensors.index.json" in str(e)
        return
    assert files and all(_inside(f, model) for f in files), files
    assert not any(os.path.samefile(f, index_tree / "outside.safetensors") for f in files)
    for f in files:
        try:
            SafetensorsFile(f)
        except CheckpointError:
            pass


# ----------------------------------------------------- whole checkpoints (HF)

def _copy(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


_rewrite = rewrite_safetensors


def test_traversal_in_a_real_sharded_index_is_refused(hf_qwen3_sharded, tmp_path):
    d = _copy(hf_qwen3_sharded.path, tmp_path / "m")
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    victim = next(iter(index["weight_map"]))
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(d / index["weight_map"][victim], tmp_path / "elsewhere" / "shard.safetensors")
    for bad in ("../elsewhere/shard.safetensors", str(tmp_path / "elsewhere" / "shard.safetensors"),
                "../../../../etc/passwd"):
        index["weight_map"][victim] = bad
        index_path.write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match="not a plain file name inside the model directory"):
            load_target(d, dtype="float32", progress=False)


def test_index_that_misplaces_a_tensor_still_loads_from_the_shards(hf_qwen3_sharded, tmp_path):
    """The shards' own headers say what they hold; the index only says which files to read."""
    d = _copy(hf_qwen3_sharded.path, tmp_path / "m")
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    first = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][first] = shards[1]  # listed under the wrong shard
    index["weight_map"]["not.in.any.shard"] = shards[0]  # listed but absent
    index_path.write_text(json.dumps(index))
    got = flat_params(load_target(d, dtype="float32", progress=False))
    want = flat_params(load_target(hf_qwen3_sharded.path, dtype="float32", progress=False))
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k][...]), np.asarray(want[k][...]), err_msg=k)
    index["weight_map"] = {k: shards[0] for k in index["weight_map"]}  # a shard no longer listed is not read
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing tensors"):
        load_target(d, dtype="float32", progress=False)


# ------------------------------------------------------------------ finiteness

NAN_TENSOR = "model.layers.1.self_attn.q_proj.weight"


def _load_unchecked(path, dtype=np.float32):
    cfg = read_target_config(path, among=Qwen3Config.MODEL_TYPES)
    return load_safetensors_into(abstract_target(cfg, dtype), checkpoint_files(str(path)),
                                 qwen3_rules(cfg.tie_word_embeddings), source=str(path), progress=False,
                                 check_finite=False)


def _poison(t):
    t[NAN_TENSOR] = t[NAN_TENSOR].copy()
    t[NAN_TENSOR][3, 5] = np.nan
    t[NAN_TENSOR][0, 0] = -np.inf


def test_nan_weights_are_refused_at_load(hf_qwen3, tmp_path):
    d = _copy(hf_qwen3.path, tmp_path / "nan")
    _rewrite(d / "model.safetensors", _poison)
    with pytest.raises(CheckpointError, match=rf"'{NAN_TENSOR}' \[\d+, \d+\] holds 2 non-finite value\(s\)"):
        load_target(d, dtype="float32", progress=False)
    model = _load_unchecked(d)  # check_finite=False: loaded as is
    kernel = np.asarray(model.model.layers[1].self_attn.q_proj.kernel[...])
    assert np.isnan(kernel[5, 3]) and np.isneginf(kernel[0, 0]) and np.isfinite(kernel).sum() == kernel.size - 2


def test_cast_overflow_is_reported_as_such(hf_qwen3, tmp_path):
    d = _copy(hf_qwen3.path, tmp_path / "big")
    _rewrite(d / "model.safetensors", lambda t: t["model.norm.weight"].__setitem__(0, 1e6))
    with pytest.raises(CheckpointError, match="'model.norm.weight' .* overflows float16: 1 of its"):
        load_target(d, dtype="float16", progress=False)
    load_target(d, dtype="float32", progress=False)


def test_nan_in_converted_checkpoint_is_refused(hf_qwen3, tmp_path):
    d = _copy(hf_qwen3.path, tmp_path / "nan")
    _rewrite(d / "model.safetensors", _poison)
    out = converted.save_converted(_load_unchecked(d), str(d), str(tmp_path / "conv"), kind="target")
    with pytest.raises(CheckpointError, match=r"conv \(params/\): tensor 'model.layers.1.self_attn.q_proj.kernel' "
                                              r"\[\d+, \d+\] holds 2 non-finite"):
        load_target(out, dtype="float32", progress=False)
    abstract = abstract_target(read_target_config(out, among=Qwen3Config.MODEL_TYPES), np.float32)
    kernel = np.asarray(converted.restore_into(abstract, out, check_finite=False).model.layers[1]
                        .self_attn.q_proj.kernel[...])
    assert np.isnan(kernel[5, 3])


# ------------------------------------------------------- converted directories

@pytest.fixture(scope="module")
def converted_dir(hf_qwen3, tmp_path_factory):
    return convert_target(hf_qwen3.path, tmp_path_factory.mktemp("conv") / "c", dtype="float32", progress=False)


@pytest.mark.parametrize("marker", [b"[1]", b'"x"', b"null", b"{}", b'{"format": "eagle3-jax/orbax-params"}',
                                    b"\xff\xfe", b"{", b"", b'{"format": "eagle3-jax/orbax-params", "version": 1,'
                                    b' "version": 1}'])
def test_broken_marker(converted_dir, tmp_path, marker):
    d = _copy(converted_dir, tmp_path / "c")
    (d / "eagle3_jax.json").write_bytes(marker)
    with pytest.raises(CheckpointError, match="eagle3_jax.json") as e:
        load_target(d, progress=False)
    assert str(d) in str(e.value)


def _params_files(directory) -> list[str]:
    params = os.path.join(directory, "params")
    return sorted(os.path.relpath(os.path.join(r, f), params) for r, _, fs in os.walk(params) for f in fs)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's abandoned coroutines
@settings(max_examples=12, deadline=datetime.timedelta(seconds=30),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
@pytest.mark.slow
def test_broken_params_give_checkpoint_error(converted_dir, hf_qwen3, tmp_path_factory, data):
    """Deleted, truncated or overwritten files under params/: CheckpointError naming the directory, or
    (for the files orbax does not need) the same weights."""
    rel = data.draw(st.sampled_from(_params_files(converted_dir)))
    mode = data.draw(st.sampled_from(["delete", "truncate", "garbage", "empty"]))
    d = _copy(converted_dir, tmp_path_factory.mktemp("broken") / "c")
    path = d / "params" / rel
    content = path.read_bytes()
    if mode == "delete":
        path.unlink()
    else:
        keep = {"truncate": len(content) // 2, "empty": 0}.get(mode)
        path.write_bytes(content[:keep] if keep is not None else np.random.default_rng(len(rel)).bytes(len(content)))
    try:
        got = flat_params(load_target(d, dtype="float32", progress=False))
    except CheckpointError as e:
        assert str(d) in str(e), str(e)
        return
    finally:
        gc.collect()  # orbax's abandoned read coroutines report here, under this test's warning filter
    want = flat_params(load_target(converted_dir, dtype="float32", progress=False))
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k][...]), np.asarray(want[k][...]), err_msg=f"{rel} {mode}: {k}")


def test_params_that_is_not_a_directory(converted_dir, tmp_path):
    d = _copy(converted_dir, tmp_path / "c")
    shutil.rmtree(d / "params")
    with pytest.raises(CheckpointError, match="has no params/ directory"):
        load_target(d, progress=False)


# ---------------------------------------------------------------------- FIFOs

def _without_blocking(fn, fifo, seconds: float = 20.0):
    """``fn()``'s exception (or "returned"), run in a thread; fails, after unblocking it, if it hangs."""
    outcome: dict[str, object] = {}

    def target():
        try:
            fn()
            outcome["result"] = "returned"
        except BaseException as e:  # noqa: BLE001 - examined by the caller
            outcome["result"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        with contextlib.suppress(OSError):  # a writer unblocks a reader stuck in open()
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
        pytest.fail(f"blocked on the FIFO {fifo}")
    return outcome["result"]


@pytest.mark.parametrize("where", ["model.safetensors", "model.safetensors.index.json"])
def test_fifo_checkpoint_files_never_block(hf_qwen3, tmp_path, where):
    d = _copy(hf_qwen3.path, tmp_path / "m")
    if where != "model.safetensors":
        (d / where).write_text("{}")
    fifo = d / where
    fifo.unlink()
    os.mkfifo(fifo)
    result = _without_blocking(lambda: load_target(d, progress=False), fifo)
    assert isinstance(result, CheckpointError) and "is a FIFO (named pipe)" in str(result), result
    assert str(fifo) in str(result)


@pytest.mark.parametrize("where", ["eagle3_jax.json", "params/_METADATA"])
def test_fifo_in_converted_directory_never_blocks(converted_dir, tmp_path, where):
    d = _copy(converted_dir, tmp_path / "c")
    fifo = d / where
    fifo.unlink()
    os.mkfifo(fifo)
    result = _without_blocking(lambda: load_target(d, progress=False), fifo)
    assert isinstance(result, CheckpointError) and str(d) in str(result), result
