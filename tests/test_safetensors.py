import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from safetensors.torch import save_file as torch_save_file

from eagle3_jax import CheckpointError
from eagle3_jax.weights.safetensors_io import SafetensorsFile, checkpoint_files, save_file


def test_round_trip_all_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a.f32": rng.normal(size=(3, 5)).astype(np.float32),
        "b.bf16": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16),
        "c.i64": np.arange(-4, 6, dtype=np.int64),
        "d.bool": rng.random(9) > 0.5,
        "e.empty": np.zeros((0, 4), np.float32),
    }
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert sorted(f.keys()) == sorted(tensors) and f.metadata == {"format": "pt"}
    for name, arr in tensors.items():
        got = f.read(name)
        assert got.dtype == arr.dtype and got.shape == arr.shape
        np.testing.assert_array_equal(got, arr)


def test_reads_files_written_by_torch_and_writes_files_torch_reads(tmp_path):
    t = {"w": torch.randn(4, 6, dtype=torch.bfloat16), "m": torch.tensor([True, False])}
    torch_save_file(t, tmp_path / "t.safetensors")
    f = SafetensorsFile(tmp_path / "t.safetensors")
    np.testing.assert_array_equal(f.read("w", dtype=np.float32), t["w"].float().numpy())
    np.testing.assert_array_equal(f.read("m"), t["m"].numpy())
    save_file({"x": np.arange(6, dtype=np.float32).reshape(2, 3)}, tmp_path / "o.safetensors")
    back = safetensors.numpy.load_file(tmp_path / "o.safetensors")
    np.testing.assert_array_equal(back["x"], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_truncated_file_is_reported(tmp_path):
    save_file({"w": np.ones((64, 64), np.float32)}, tmp_path / "x.safetensors")
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated file: tensor 'w'"):
        SafetensorsFile(tmp_path / "x.safetensors")


@pytest.mark.parametrize("content, message", [
    (b"", "not a safetensors file"),
    (b"PK\x03\x04 this is a zip / pickle archive" * 4, "not a safetensors file"),
    (struct.pack("<Q", 5) + b"nope!", "header is not JSON"),
    (struct.pack("<Q", 2) + b"[]", "header is not a JSON object"),
])
def test_not_safetensors(tmp_path, content, message):
    (tmp_path / "x.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        SafetensorsFile(tmp_path / "x.safetensors")


def test_header_inconsistent_with_shape(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}).encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with pytest.raises(CheckpointError, match=r"declares shape \[4, 4\] F32 \(64 bytes\) but spans 60"):
        SafetensorsFile(tmp_path / "x.safetensors")


def test_checkpoint_files_refuses_pickles(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: pickled PyTorch checkpoints are not loaded"):
        checkpoint_files(str(tmp_path))


def test_checkpoint_files_missing_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    save_file({"a": np.ones(2, np.float32)}, tmp_path / "model-00001-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="shard file\\(s\\) missing .*model-00002-of-00002"):
        checkpoint_files(str(tmp_path))


# ------------------------------------------------------- header validation

def _write(path, header, data=b"", n=None):
    """A safetensors file with the given header (a dict, dumped as JSON) and data bytes."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + data)
    return path


def _f32(shape, begin, end):
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize("entry, message", [
    ({"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, r"dtype must be a string .* not a list"),
    ({"dtype": "F32", "shape": [2], "data_offsets": ["a", 8]}, r"data_offsets must be \[begin, end\]"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}, r"data_offsets must be \[begin, end\]"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [False, 8]}, r"data_offsets must be \[begin, end\]"),
    ({"dtype": "F32", "shape": [2], "data_offsets": {"0": 8}}, r"data_offsets must be \[begin, end\]"),
    ({"dtype": "F32", "shape": [1.5], "data_offsets": [0, 8]}, "shape must be a list of non-negative integers"),
    ({"dtype": "F32", "shape": -1, "data_offsets": [0, 8]}, "shape must be a list of non-negative integers"),
    ({"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}, "shape must be a list of non-negative integers"),
    ({"dtype": "F32", "shape": [2, [2]], "data_offsets": [0, 8]}, "shape must be a list of non-negative integers"),
    ({"dtype": "F32", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}, "overflows"),
    ({"dtype": "F32", "shape": [2]}, "has no data_offsets"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, r"data_offsets \[8, 0\] end before they begin"),
    ({"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}, "unsupported dtype 'X9'"),
    ([1, 2], "the header entry is a list"),
])
def test_malformed_entries_name_file_and_tensor(tmp_path, entry, message):
    path = _write(tmp_path / "x.safetensors", {"w": entry}, b"\0" * 8)
    with pytest.raises(CheckpointError, match=message) as e:
        SafetensorsFile(path)
    assert str(path) in str(e.value) and "'w'" in str(e.value)


def test_negative_offset_is_reported_plainly(tmp_path):
    path = _write(tmp_path / "x.safetensors", {"w": _f32([2], -8, 0)}, b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"tensor 'w': data_offsets must be \[begin, end\] with non-negative "
                                              r"integers, not a list \(\[-8, 0\]\)"):
        SafetensorsFile(path)


def test_overlapping_offsets_are_refused(tmp_path):
    path = _write(tmp_path / "x.safetensors", {"a": _f32([2], 0, 8), "b": _f32([2], 4, 12)}, b"\0" * 12)
    with pytest.raises(CheckpointError, match=r"tensor 'b' \(bytes 4-12\) overlaps tensor 'a'"):
        SafetensorsFile(path)
    path = _write(tmp_path / "y.safetensors", {"a": _f32([2], 0, 8), "b": _f32([2], 0, 8)}, b"\0" * 8)
    with pytest.raises(CheckpointError, match="overlaps"):
        SafetensorsFile(path)


def test_gaps_and_trailing_bytes_are_refused(tmp_path):
    path = _write(tmp_path / "x.safetensors", {"a": _f32([1], 0, 4), "b": _f32([1], 8, 12)}, b"\0" * 12)
    with pytest.raises(CheckpointError, match=r"bytes 4-8 of the data section belong to no tensor"):
        SafetensorsFile(path)
    path = _write(tmp_path / "y.safetensors", {"a": _f32([1], 0, 4)}, b"\0" * 12)
    with pytest.raises(CheckpointError, match="8 trailing bytes belong to no tensor"):
        SafetensorsFile(path)


def test_offsets_in_any_order_and_empty_tensors_load(tmp_path):
    data = np.arange(4, dtype=np.float32).tobytes()
    header = {"b": _f32([2], 8, 16), "e": _f32([0, 3], 8, 8), "a": _f32([2], 0, 8), "__metadata__": None}
    f = SafetensorsFile(_write(tmp_path / "x.safetensors", header, data))
    np.testing.assert_array_equal(f.read("a"), [0, 1])
    np.testing.assert_array_equal(f.read("b"), [2, 3])
    assert f.read("e").shape == (0, 3) and f.metadata == {}


@pytest.mark.parametrize("metadata", [[1], "x", {"a": 1}, {"a": None}])
def test_metadata_must_map_strings_to_strings(tmp_path, metadata):
    path = _write(tmp_path / "x.safetensors", {"__metadata__": metadata, "w": _f32([2], 0, 8)}, b"\0" * 8)
    with pytest.raises(CheckpointError, match="__metadata__ must be an object of strings"):
        SafetensorsFile(path)


@pytest.mark.parametrize("raw, message", [
    (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "w": {}}', "repeats the key 'w'"),
    (b'{"w": NaN}', "header is not JSON"),
    (b'\xff\xfe{}', "header is not UTF-8"),
    (b"[" * 100_000, "header is not JSON"),
])
def test_header_json_is_parsed_strictly(tmp_path, raw, message):
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
    with pytest.raises(CheckpointError, match=message):
        SafetensorsFile(tmp_path / "x.safetensors")


def test_header_length_limit(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(CheckpointError, match="not a safetensors file, or truncated"):
        SafetensorsFile(tmp_path / "x.safetensors")


def test_only_regular_files_are_read(tmp_path):
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=r"d\.safetensors: is a directory, not a safetensors file"):
        SafetensorsFile(tmp_path / "d.safetensors")
    with pytest.raises(CheckpointError, match="cannot open"):
        SafetensorsFile(tmp_path / "absent.safetensors")
    # FIFOs (which would block on open) are covered, with a hang guard, in test_weights_fuzz.py


# ------------------------------------------------------------ index files

def _index(tmp_path, weight_map):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return str(tmp_path)


@pytest.mark.parametrize("shard", ["../../../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors",
                                   "..\\x.safetensors", "C:/x.safetensors", "", "./x.safetensors", "a//b"])
def test_index_shard_names_must_stay_inside(tmp_path, shard):
    with pytest.raises(CheckpointError, match="not a plain file name inside the model directory"):
        checkpoint_files(_index(tmp_path, {"a": shard}))


def test_index_absolute_path_to_a_real_checkpoint_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    save_file({"a": np.ones(2, np.float32)}, tmp_path / "elsewhere" / "model.safetensors")
    (tmp_path / "m").mkdir()
    with pytest.raises(CheckpointError, match="not a plain file name"):
        checkpoint_files(_index(tmp_path / "m", {"a": str(tmp_path / "elsewhere" / "model.safetensors")}))


@pytest.mark.parametrize("index, message", [
    ({"weight_map": ["a", "b"]}, r"expected a 'weight_map' object; found 'weight_map' a list"),
    ({"weight_map": {"a": 1}}, r"weight_map\['a'\] must be a shard file name \(a string\), not a number"),
    ({"weight_map": {"a": ["x.safetensors"]}}, r"must be a shard file name \(a string\), not a list"),
    ({"weight_map": {}}, "weight_map' object is empty"),
    ({"weights": {}}, "found no 'weight_map'"),
    ([1], "found a list"),
])
def test_malformed_index(tmp_path, index, message):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=message) as e:
        checkpoint_files(str(tmp_path))
    assert "model.safetensors.index.json" in str(e.value)


def test_index_shards_may_be_symlinks_into_a_blob_store(tmp_path):
    """Hugging Face cache snapshots: the names are plain, the targets live in ../../blobs."""
    (tmp_path / "blobs").mkdir()
    save_file({"a": np.ones(2, np.float32)}, tmp_path / "blobs" / "0123abcd")
    snap = tmp_path / "snapshots" / "rev"
    snap.mkdir(parents=True)
    (snap / "model-00001-of-00001.safetensors").symlink_to("../../blobs/0123abcd")
    files = checkpoint_files(_index(snap, {"a": "model-00001-of-00001.safetensors"}))
    assert files == [str(snap / "model-00001-of-00001.safetensors")]
    np.testing.assert_array_equal(SafetensorsFile(files[0]).read("a"), np.ones(2, np.float32))
