"""Tiny random HF checkpoints made with ``transformers`` (never downloaded).

Every model is float32 on CPU, with odd sizes and ``head_dim`` different from
hidden/heads, so that layout bugs (a transpose, a head split) can not cancel.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA compiles the tests' programs for the speed of compiling, not of running: the models are tiny, so
# compiling is most of the suite's time, and LLVM's optimisation level 0 takes about a third of it off
# (tests/test_generate.py: 98 s -> 64 s on 2 cores). Subprocesses (the CLI, the mesh worker) inherit it.
# EAGLE3_JAX_TEST_OPTIMIZED=1 compiles as users do.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if os.environ.get("EAGLE3_JAX_TEST_OPTIMIZED", "") in ("", "0") and \
        FAST_COMPILE_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()

import atexit
import shutil
import tempfile

# JAX's persistent compilation cache (eagle3_jax.compile_cache) in a directory of this test run's own, never
# the user's ~/.cache: isolated, and still a cache (a program dropped after its module, or compiled again by a
# CLI subprocess, is loaded instead of compiled). EAGLE3_JAX_TEST_COMPILE_CACHE=off runs the suite without it.
# Converted GGUF files (the SmolLM2 demo target) likewise go to this run's own cache, never ~/.cache. The
# process that makes the directories (pytest, or pytest-xdist's controller) removes them at exit; xdist's
# workers inherit them (EAGLE3_JAX_TEST_DIRS), so a program one worker compiled is loaded by the other.
_shared = os.environ.get("EAGLE3_JAX_TEST_DIRS")
if _shared is None:
    _compile_cache, _cache = (tempfile.mkdtemp(prefix=f"eagle3-jax-test-{what}-")
                              for what in ("compile-cache", "cache"))
    os.environ["EAGLE3_JAX_TEST_DIRS"] = os.pathsep.join((_compile_cache, _cache))
    for _made in (_compile_cache, _cache):
        atexit.register(shutil.rmtree, _made, ignore_errors=True)
else:
    _compile_cache, _cache = _shared.split(os.pathsep)
if os.environ.get("EAGLE3_JAX_TEST_COMPILE_CACHE", "").lower() in ("0", "off", "none", "false", "no"):
    os.environ["EAGLE3_JAX_COMPILE_CACHE"] = "off"
else:
    os.environ["EAGLE3_JAX_COMPILE_CACHE"] = _compile_cache
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)  # a user's own JAX cache would win over ours
os.environ["EAGLE3_JAX_CACHE"] = _cache

import dataclasses
import gc
import pathlib

import pytest
import torch
import transformers

DATA = pathlib.Path(__file__).resolve().parent / "data"


@dataclasses.dataclass
class HFModel:
    path: str
    model: transformers.PreTrainedModel
    config: transformers.PretrainedConfig


TINY = dict(vocab_size=97, hidden_size=40, intermediate_size=56, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6,
            initializer_range=0.2, eos_token_id=5, bos_token_id=1, pad_token_id=0)


# kind -> (transformers config class, model class, defaults over TINY)
HF_KINDS = {"qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 12}),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
            "llama": ("LlamaConfig", "LlamaForCausalLM", {})}


def make_hf_model(path: pathlib.Path, *, kind: str = "qwen3", seed: int = 0, max_shard_size: str | None = None,
                  **overrides) -> HFModel:
    """Builds a random tiny model, saves it with ``save_pretrained`` and returns it (eval mode, eager attention)."""
    torch.manual_seed(seed)
    config_class, model_class, defaults = HF_KINDS[kind]
    config = getattr(transformers, config_class)(**{**TINY, "tie_word_embeddings": False, **defaults, **overrides})
    model = getattr(transformers, model_class)(config)
    with torch.no_grad():  # HF initialises biases to zero (Qwen2's q/k/v, Llama's attention_bias); make them matter
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    model = model.eval()
    model.config._attn_implementation = "eager"
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **save_kwargs)
    return HFModel(path=str(path), model=model, config=config)


def pytest_collection_finish(session):
    """Starts the multi-device worker of tests/test_mesh.py and the server of tests/test_serve.py at once when
    their tests are selected: processes of their own that compile mostly on the core the single-device tests
    leave idle."""
    if os.environ.get("PYTEST_XDIST_WORKER"):  # under xdist a worker collects every test and runs only some:
        return  # the fixtures start these processes when their tests run
    for item in session.items:
        if "mesh_results" in getattr(item, "fixturenames", ()):
            item.module.start_worker()
            break
    for item in session.items:  # the OpenAI-compatible server of tests/test_serve.py: its start-up likewise
        if "server" in getattr(item, "fixturenames", ()) and item.module.__name__ == "test_serve":
            item.module.start_server()
            break


def pytest_sessionfinish(session):
    import sys

    mesh = sys.modules.get("test_mesh")
    if mesh is not None:
        mesh.stop_worker()
    serve = sys.modules.get("test_serve")
    if serve is not None:
        serve.stop_server()


@pytest.fixture(scope="module", autouse=True)
def _drop_compiled_programs():
    """Drops the compiled programs after each test module.

    On the CPU every compiled program keeps memory mappings of its own; the
    whole suite compiles thousands of programs, and keeping them all would
    reach the kernel's limit of mappings per process (vm.max_map_count,
    65530), where allocations start failing inside XLA or tokenizers.
    """
    yield
    from eagle3_jax.compiled import CompiledFunction

    CompiledFunction.clear_all()
    gc.collect()


@pytest.fixture(scope="session")
def hf_qwen3(tmp_path_factory) -> HFModel:
    """Untied Qwen3, head_dim 12 != 40 / 4."""
    return make_hf_model(tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="session")
def hf_qwen3_tied(tmp_path_factory) -> HFModel:
    return make_hf_model(tmp_path_factory.mktemp("qwen3_tied"), seed=1, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def hf_qwen3_sharded(tmp_path_factory) -> HFModel:
    """Saved in several safetensors shards with an index."""
    return make_hf_model(tmp_path_factory.mktemp("qwen3_sharded"), seed=2, max_shard_size="40KB")


@pytest.fixture(scope="session")
def hf_qwen2(tmp_path_factory) -> HFModel:
    """Qwen2-style: q/k/v biases, no q/k norm."""
    return make_hf_model(tmp_path_factory.mktemp("qwen2"), kind="qwen2", seed=3)


# Llama 3.1-style RoPE scaling, shrunk so that it changes the tiny model's frequencies at short positions
# (wavelengths over 32 / low_freq_factor are scaled, those under 32 / high_freq_factor kept, the band between
# interpolated).
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}


@pytest.fixture(scope="session")
def hf_llama(tmp_path_factory) -> HFModel:
    """Untied Llama with llama3 RoPE scaling and attention biases on q/k/v/o, head_dim 12 != 40 / 4."""
    return make_hf_model(tmp_path_factory.mktemp("llama"), kind="llama", head_dim=12, attention_bias=True,
                         rope_scaling=dict(LLAMA3_SCALING))


@pytest.fixture(scope="session")
def hf_llama_tied(tmp_path_factory) -> HFModel:
    """Tied Llama (as Llama 3.2 1B/3B), no biases, no scaling, head_dim derived (40 / 4 = 10)."""
    return make_hf_model(tmp_path_factory.mktemp("llama_tied"), kind="llama", tie_word_embeddings=True)


@pytest.fixture(scope="session", params=["qwen3", "qwen3_tied", "qwen3_sharded", "qwen2", "llama", "llama_tied"])
def hf_any(request) -> HFModel:
    return request.getfixturevalue(f"hf_{request.param}")


def hf_greedy(model, prompt: list[int], max_new_tokens: int, stop_ids: list[int] | tuple = ()) -> list[int]:
    """HF greedy continuation of one prompt; stops after any of ``stop_ids`` (which it includes)."""
    saved = model.generation_config
    model.generation_config = transformers.GenerationConfig(eos_token_id=list(stop_ids) or None, pad_token_id=0)
    try:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                 attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    finally:
        model.generation_config = saved
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir(tmp_path_factory) -> pathlib.Path:
    """The real Qwen3 tokenizer (tests/data/qwen3-tokenizer, shipped compressed), decompressed into a directory."""
    import lzma

    src = DATA / "qwen3-tokenizer"
    path = tmp_path_factory.mktemp("qwen3_tokenizer")
    (path / "tokenizer.json").write_bytes(lzma.decompress((src / "tokenizer.json.xz").read_bytes()))
    shutil.copy(src / "tokenizer_config.json", path / "tokenizer_config.json")
    return path


@pytest.fixture(scope="session")
def hf_qwen3_real_vocab(tmp_path_factory, qwen3_tokenizer_dir) -> HFModel:
    """A tiny Qwen3 with the full 151,936-token vocabulary and the real Qwen3 tokenizer beside it."""
    path = tmp_path_factory.mktemp("qwen3_real_vocab")
    hf = make_hf_model(path, seed=4, vocab_size=151936, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True,
                       eos_token_id=151645, bos_token_id=None, pad_token_id=151643)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen3_tokenizer_dir / name, path / name)
    return hf


def rewrite_safetensors(path, edit) -> None:
    """Applies ``edit(dict of arrays)`` to the safetensors file at ``path`` (a symlink is replaced, never followed)."""
    from eagle3_jax.weights.safetensors_io import SafetensorsFile, save_file

    f = SafetensorsFile(path)
    tensors = {k: f.read(k) for k in f.keys()}
    edit(tensors)
    if os.path.islink(path):
        os.unlink(path)
    save_file(tensors, path)
