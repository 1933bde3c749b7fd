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
