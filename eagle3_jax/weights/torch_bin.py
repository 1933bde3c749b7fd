"""Reading the EAGLE authors' ``pytorch_model.bin`` draft heads.

The EAGLE authors publish their EAGLE-3 heads (``yuhuili/EAGLE3-*``) as a
PyTorch pickle, not safetensors. A pickle can run arbitrary code, so it is
read only with ``torch.load(weights_only=True)``, PyTorch's restricted
unpickler that accepts tensors and plain containers and refuses anything
else, and only for draft heads (targets must be safetensors). The tensors
are written to a temporary safetensors file so that they go through the same
checked loader as every other checkpoint (names, shapes, dtypes, finiteness).
PyTorch is needed for this one format only; without it the error says so.
"""

from __future__ import annotations

import os

import numpy as np

from eagle3_jax.errors import CheckpointError
from eagle3_jax.weights.safetensors_io import save_file

BIN_NAME = "pytorch_model.bin"


def find_bin(model_dir: str) -> str | None:
    """``model_dir``'s pytorch_model.bin if it has one and no safetensors, else None."""
    path = os.path.join(model_dir, BIN_NAME)
    if not os.path.isfile(path):
        return None
    if any(name.endswith(".safetensors") for name in os.listdir(model_dir)):
        return None
    return path


def bin_to_safetensors(path: str, out_path: str) -> str:
    """Converts the tensors of a PyTorch state dict at ``path`` into safetensors at ``out_path``.

    Raises:
      CheckpointError: PyTorch is not installed, the file is not a state dict
        of tensors, or it holds objects the restricted unpickler refuses.
    """
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: this head is a PyTorch pickle (the EAGLE authors' format); reading it needs "
                              "PyTorch (pip install torch), or convert it to safetensors elsewhere first") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the restricted unpickler's refusals and broken files alike
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch state dict ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    tensors = {}
    for name, tensor in state.items():
        try:
            t = tensor.detach().cpu().contiguous()
            if t.dtype == torch.bfloat16:
                import ml_dtypes

                array = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            else:
                array = t.numpy()
        except Exception as e:  # sparse, meta, quantised or float8 tensors have no NumPy form
            raise CheckpointError(f"{path}: tensor {name!r} ({tensor.dtype}, {tensor.layout}) can not be read as an "
                                  f"array ({type(e).__name__}: {str(e).strip()[:200]})") from None
        tensors[name] = np.ascontiguousarray(array)
    save_file(tensors, out_path, metadata={"format": "pt", "converted_from": os.path.basename(path)})
    return out_path
