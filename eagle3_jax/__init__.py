"""eagle3-jax: EAGLE-3 speculative decoding for Qwen3 in JAX/Flax."""

__version__ = "0.1.0"

from eagle3_jax._xla_flags import apply_default_flags

apply_default_flags()

from eagle3_jax.config import Eagle3Config, Qwen3Config
from eagle3_jax.errors import CheckpointError, ConfigError, Eagle3Error, InputError, NumericsError
from eagle3_jax.generation import GenerationOutput, Generator, generate, require_finite
from eagle3_jax.kv_cache import KVCache
from eagle3_jax.loading import convert_draft, convert_target, load_draft, load_target, save_draft
from eagle3_jax.models.eagle3 import Eagle3DraftHead
from eagle3_jax.models.qwen3 import Qwen3ForCausalLM
from eagle3_jax.sampling import SamplingParams

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Eagle3Config",
    "Eagle3DraftHead",
    "Eagle3Error",
    "GenerationOutput",
    "Generator",
    "InputError",
    "KVCache",
    "NumericsError",
    "Qwen3Config",
    "Qwen3ForCausalLM",
    "SamplingParams",
    "convert_draft",
    "convert_target",
    "generate",
    "load_draft",
    "load_target",
    "require_finite",
    "save_draft",
]
