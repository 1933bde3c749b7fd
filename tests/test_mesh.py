"""Device meshes (docs/architecture.md#device-mesh): sharding as data, and generation on 2, 4 and 8
simulated CPU devices giving exactly the tokens of one device (greedy, and sampled with one seed).

The multi-device checks run in one subprocess (``tests/mesh_worker.py``) with
eight simulated devices: the device count is fixed when JAX starts, and the
rest of the suite runs on one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from eagle3_jax.axes import KV_CACHE_AXES, logical_spec
from eagle3_jax.config import LlamaConfig, Qwen3Config
from eagle3_jax.errors import InputError
from eagle3_jax.models.llama import LlamaForCausalLM
from eagle3_jax.models.qwen3 import Qwen3ForCausalLM
from eagle3_jax.sharding import check_mesh, make_mesh, param_axes
from eagle3_jax.weights.params import flat_params

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)
from mesh_worker import DEMO_CASES  # noqa: E402

CASES = [f"demo {dp}x{tp} {tree} b{batch}" for batch, tree, meshes in DEMO_CASES for dp, tp in meshes]
CASES += ["tiny8 1x8 plain b8", "tiny8 1x8 tree b8"]


# ------------------------------------------------------------------ one device: the tables

def _targets():
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, rope_theta=1e4, max_position_embeddings=64)
    yield Qwen3ForCausalLM(Qwen3Config(**common), rngs=nnx.Rngs(0))
    yield Qwen3ForCausalLM(Qwen3Config(**common, qkv_bias=True, qk_norm=False, tie_word_embeddings=True),
                           rngs=nnx.Rngs(0))  # Qwen2
    yield LlamaForCausalLM(LlamaConfig(**common, qkv_bias=True, o_bias=True), rngs=nnx.Rngs(0))


def test_every_target_parameter_has_logical_axes_of_its_rank():
    for target in _targets():
        axes = param_axes(target)
        assert set(axes) == set(flat_params(target))
        for path, var in flat_params(target).items():
            assert len(axes[path]) == len(var.shape), (path, axes[path], var.shape)
        assert axes["model.layers.0.self_attn.k_proj.kernel"] == ("embed", "kv_heads")
        assert axes["model.layers.0.mlp.down_proj.kernel"] == ("mlp", "embed")
    from eagle3_jax.models.registry import param_specs

    specs = param_specs(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=1e4))
    q = specs["model.layers.1.self_attn.q_proj.kernel"]  # checkpoint names and axes together
    assert (q.checkpoint, q.transpose, q.shape, q.axes) == ("model.layers.1.self_attn.q_proj.weight", True,
                                                            (32, 32), ("embed", "heads"))
    assert specs["model.embed_tokens.embedding"].axes == ("vocab", "embed")
    assert len(specs) == 2 * 11 + 3  # two layers of 11, the embedding, the final norm, lm_head
    undeclared = nnx.Linear(4, 8, rngs=nnx.Rngs(0))  # a module that declares no axes
    with pytest.raises(ValueError, match="of shape .* declares logical axes None"):
        param_axes(undeclared)


def test_logical_spec_maps_axes_and_keeps_undivided_dimensions_whole():
    sizes = {"data": 2, "tensor": 4}
    assert logical_spec((8, 8, 256, 64), KV_CACHE_AXES, sizes) == P("data", "tensor", None, None)
    assert logical_spec((3, 2, 256, 64), KV_CACHE_AXES, sizes) == P(None, None, None, None)  # 3 rows, 2 KV heads
    assert logical_spec((64, 96), ("embed", "mlp"), sizes) == P(None, "tensor")
    assert logical_spec((64, 96), ("embed", "mlp"), sizes, frozenset({"mlp"})) == P(None, None)
    assert logical_spec((64, 96), ("embed", "mlp"), {"data": 2, "tensor": 1}) == P(None, None)
    with pytest.raises(ValueError, match="do not match"):
        logical_spec((64,), ("embed", "mlp"), sizes)


def test_mesh_errors_are_clear():
    with pytest.raises(InputError, match="needs 2 devices, but 1 are available.*device_count=2"):
        make_mesh(tensor_parallel=2)
    with pytest.raises(InputError, match="tensor_parallel must be a positive integer"):
        make_mesh(tensor_parallel=0)
    with pytest.raises(InputError, match="mesh axes must be"):
        check_mesh(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",)))
    one_axis = check_mesh(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",)))  # training's older meshes
    assert one_axis.shape == {"data": 1, "tensor": 1}
    with pytest.raises(InputError, match="mesh must be a jax.sharding.Mesh"):
        check_mesh("2x2")
    assert make_mesh().shape == {"data": 1, "tensor": 1}


def test_cli_refuses_a_mesh_larger_than_the_machine(capsys):
    from eagle3_jax.cli import main
    from eagle3_jax.demo import demo_paths

    target, _ = demo_paths("toy")
    assert main(["generate", "--target", target, "--prompt-ids", "5,6", "--tensor-parallel", "2"]) == 1
    assert "needs 2 devices, but 1 are available" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--target", target, "--prompt-ids", "5,6", "--coordinator", "127.0.0.1:1"])
    assert exit_.value.code == 2 and "need --distributed" in capsys.readouterr().err


def test_serve_refuses_a_batch_the_data_axis_does_not_divide(capsys):
    from eagle3_jax.cli import main
    from eagle3_jax.demo import demo_paths

    target, _ = demo_paths("toy")
    assert main(["serve", "--target", target, "--max-batch", "3", "--data-parallel", "2", "--port", "0"]) == 1
    assert "--max-batch (3) must be a multiple of --data-parallel (2)" in capsys.readouterr().err


# ------------------------------------------------------------------ eight simulated devices

_worker: tuple[subprocess.Popen, object, object] | None = None


def start_worker():
    """Starts ``mesh_worker.py`` with eight simulated devices (once); conftest.py calls this as soon as the
    selected tests need it, so that it runs beside the rest of the suite."""
    global _worker
    if _worker is None:
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu",
                   EAGLE3_JAX_COMPILE_CACHE="off")  # its programs are its own; no second writer in the cache
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # files: a full pipe would block it
        proc = subprocess.Popen([sys.executable, os.path.join(TESTS, "mesh_worker.py")], stdout=out, stderr=err,
                                text=True, cwd=TESTS, env=env)
        _worker = (proc, out, err)
    return _worker


def stop_worker() -> None:
    if _worker is not None and _worker[0].poll() is None:
        _worker[0].kill()


@pytest.fixture(scope="module")
def mesh_results():
    proc, out, err = start_worker()
    proc.wait(timeout=1500)
    out.seek(0)
    err.seek(0)
    assert proc.returncode == 0, err.read()[-4000:]
    return json.loads(out.read().strip().splitlines()[-1])


@pytest.mark.slow
def test_the_server_on_a_mesh_gives_one_devices_tokens(mesh_results):
    """``eagle3-jax serve --tensor-parallel 2 --data-parallel 2``'s engine: continuous batching on a mesh."""
    result = mesh_results["server"]
    assert result["identical"], "the server's tokens on a 2 x 2 mesh differ from Generator.generate's on one device"
    assert result["reasons"] == ["length"], result["reasons"]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_tokens_on_a_mesh_equal_one_device(mesh_results, case):
    result = mesh_results[case]
    assert result["identical"], f"{case}: tokens or accept lengths differ from one device"
    if " plain " not in case and case.startswith("demo"):  # the trained head accepts: paths are compacted
        assert result["acceptance"] > 1.2


@pytest.mark.slow
def test_meshes_cover_two_four_and_eight_devices(mesh_results):
    assert mesh_results["devices"] == 8
    assert {mesh_results[c]["devices"] for c in CASES} == {2, 4, 8}
    # the demo target has 2 KV heads: tensor 4 replicates them, and says so; tensor 2 shards them
    assert mesh_results["demo 2x4 tree b8"]["replicated_kv_warning"]
    assert not mesh_results["demo 2x2 tree b8"]["replicated_kv_warning"]


@pytest.mark.slow
def test_weights_load_onto_their_shards(mesh_results):
    loading = mesh_results["loading"]
    for kind in ("safetensors", "converted"):
        got = loading[kind]
        assert got["wrong"] == [], f"{kind}: parameters off their table's sharding or with other values"
        assert got["sharded"] > got["total"] // 2  # projections, MLP and embedding: not replicated
        assert got["gate_shard_shape"] == [got["gate_shape"][0], got["gate_shape"][1] // 2]
    errors = loading["plan_errors"]
    assert errors["tensor 3"].startswith("tensor parallel 3 (the mesh's tensor axis, --tensor-parallel) does not "
                                         "divide the model's 4 attention heads; choose one of 1, 2, 4")
    assert "2 KV heads" in errors["tensor 4"] and "replicated" in errors["tensor 4"]
