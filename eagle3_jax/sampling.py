"""Token selection: greedy, and sampling with temperature, top-k and top-p.

The order of the filters is HF's: temperature, then top-k, then top-p.
``temperature`` and ``top_p`` are traced arrays, so changing them does not
recompile. They are scalars (one setting for the batch, with a static greedy
flag and ``top_k``) or [batch] arrays: a setting per row, with a traced
per-row top-k and per-row greedy flags beside them (:class:`RowSampling`).
The library and the server run the per-row kind, so no sampling setting
recompiles there; a batch whose rows are all greedy takes the argmax branch
of a ``lax.cond`` at run time (:func:`all_greedy`).

Randomness is per row: a loop state holds one PRNG key per row
(:func:`row_keys`), split per row at each step (:func:`split_rows`), so a
row's draws depend on its own key only, never on the other rows of its batch:
a request sampled with seed s gives the same tokens alone or batched.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from eagle3_jax.validation import check_int, check_real

# top-k beyond this is pointless and costs a sort of that width (2**24 exceeds every real vocabulary).
MAX_TOP_K = 2**24
# The smallest normal float32. The programs compute in float32, where a smaller positive temperature or top-p
# is 0 or a subnormal (flushed to 0 on CPU and TPU): such a temperature is greedy decoding, its limit
# (:func:`device_temperature`), and such a top-p keeps the top token only (``filter_logits``), its limit.
MIN_NORMAL = float(np.finfo(np.float32).tiny)
# The largest float32: a temperature above it would be infinite on the device.
MAX_TEMPERATURE = float(np.finfo(np.float32).max)


def device_temperature(temperature: float) -> float:
    """The temperature the programs use for ``temperature`` (checked: finite, >= 0): 0.0 (greedy) when it is
    below the smallest normal float32, where the device would divide by 0 or by a flushed subnormal."""
    return 0.0 if temperature < MIN_NORMAL else temperature


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. ``temperature == 0`` means greedy (argmax).

    Attributes:
      temperature: softmax temperature; 0 selects greedy decoding. A
        temperature below the smallest normal float32 (about 1.18e-38) is
        greedy too, its limit (the programs compute in float32, where it would
        be 0); at most the largest float32.
      top_p: nucleus sampling, keep the smallest set of tokens whose
        probability reaches top_p (1.0 disables it); the most likely token is
        always kept, so a top_p below every probability (however tiny) keeps it alone.
      top_k: keep only the k most likely tokens (0 disables it).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        # Normalised to Python numbers: the dataclass is hashed into compile-cache keys.
        temperature = check_real("temperature", self.temperature, minimum=0.0, maximum=MAX_TEMPERATURE)
        object.__setattr__(self, "temperature", device_temperature(temperature))
        object.__setattr__(self, "top_p", check_real("top_p", self.top_p, minimum=0.0, maximum=1.0,
                                                     open_minimum=True))
        object.__setattr__(self, "top_k", check_int("top_k", self.top_k, minimum=0, maximum=MAX_TOP_K))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _per_row(x: jax.Array, ndim: int) -> jax.Array:
    """A scalar, or a [batch] array reshaped to [batch, 1, ...] (``ndim`` dims) to broadcast over logits."""
    x = jnp.asarray(x)
    return x.reshape(x.shape + (1,) * (ndim - x.ndim)) if x.ndim else x


def filter_logits(logits: jax.Array, temperature: jax.Array, top_p: jax.Array, top_k: int,
                  row_top_k: jax.Array | None = None) -> jax.Array:
    """Temperature-scaled logits with everything outside top-k / top-p set to -inf.

    Args:
      logits: [batch, ..., vocab] float32.
      temperature, top_p: scalars, or [batch] arrays (one per row).
      top_k: static; 0 keeps the whole vocabulary.
      row_top_k: None, or [batch] int32 traced top-k per row (0 = off), applied
        with a full sort (for batches whose rows differ; ``top_k`` must be 0).
    Returns:
      [batch, ..., vocab] float32; ``softmax`` of it is the sampling distribution.
    """
    if row_top_k is not None and top_k:
        raise ValueError("filter_logits: a per-row top-k needs the static top_k to be 0")
    logits = logits.astype(jnp.float32)
    temperature = _per_row(temperature, logits.ndim)
    # A temperature so small that the largest logit over it overflows float32 would make every logit +-inf
    # (NaN after softmax): such rows are shifted so that their largest logit is 0 before dividing, and the
    # others go to -inf (probability 0: the greedy limit). The same distribution; other rows are unchanged.
    top = jnp.max(logits, axis=-1, keepdims=True)
    logits = jnp.where(jnp.isfinite(top / temperature), logits / temperature, (logits - top) / temperature)
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        ranked = jax.lax.top_k(logits, top_k)[0]  # [..., top_k], descending
        logits = jnp.where(logits < ranked[..., -1:], -jnp.inf, logits)
    else:
        ranked = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
    if row_top_k is not None:
        k = _per_row(row_top_k, logits.ndim)
        on = (k > 0) & (k < vocab)
        kth = jnp.take_along_axis(ranked, jnp.broadcast_to(jnp.clip(k - 1, 0, vocab - 1), ranked.shape[:-1] + (1,)),
                                  axis=-1)
        logits = jnp.where(on & (logits < kth), -jnp.inf, logits)
        ranked = jnp.where(on & (jnp.arange(vocab) >= k), -jnp.inf, ranked)
    top_p = _per_row(top_p, logits.ndim)
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p
    kept = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)  # the top token is always kept (top_p ~ 0)
    threshold = jnp.take_along_axis(ranked, kept - 1, axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowSampling:
    """Sampling settings that differ between the rows of one batch (traced: they never recompile).

    Attributes:
      greedy: [batch] bool, rows decoded greedily (argmax, greedy acceptance)
        inside a sampling program; their tokens are those of a greedy program.
      top_k: [batch] int32 top-k per row (0 = off).
    """

    greedy: jax.Array
    top_k: jax.Array


def row_keys(rng: jax.Array, batch: int) -> jax.Array:
    """[batch] PRNG keys: ``rng`` as given if it already holds one per row, else row i's key
    ``fold_in(rng, i)`` (so row 0 of a batch and a batch of one draw alike). Typed keys
    (``jax.random.key``) and raw ones (``jax.random.PRNGKey``) are both accepted."""
    if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)  # a raw key (``jax.random.PRNGKey``): uint32 [2], or [batch, 2]
    if rng.ndim == 1:
        return rng
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(batch, dtype=jnp.uint32))


def split_rows(keys: jax.Array, num: int = 2) -> tuple[jax.Array, ...]:
    """Splits each row's key: ``num`` arrays of [batch] keys."""
    parts = jax.vmap(lambda k: jax.random.split(k, num))(keys)  # [batch, num]
    return tuple(parts[:, i] for i in range(num))


def next_keys(keys: jax.Array, settings) -> tuple[jax.Array, jax.Array]:
    """(the keys to carry on, the keys to draw with now), both [batch]; greedy programs (``settings.greedy``)
    draw nothing and leave the keys as they are."""
    if settings.greedy:
        return keys, keys
    return split_rows(keys)


def categorical_rows(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """One draw per row from ``logits`` [batch, vocab] with that row's key: [batch] int32."""
    return jax.vmap(lambda k, x: jax.random.categorical(k, x, axis=-1))(keys, logits).astype(jnp.int32)


def select_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array, *,
                  greedy: bool, top_k: int, rows: RowSampling | None = None) -> jax.Array:
    """Next tokens [batch] int32 from logits [batch, vocab], drawn with each row's key ([batch] keys)."""
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy:
        return argmax

    def sampled() -> jax.Array:
        filtered = filter_logits(logits, temperature, top_p, top_k, None if rows is None else rows.top_k)
        drawn = categorical_rows(keys, filtered)
        return drawn if rows is None else jnp.where(rows.greedy, argmax, drawn)

    if rows is None:
        return sampled()
    # Greedy is a runtime value here: a batch whose rows are all greedy skips the filter (a sort of the
    # vocabulary) and the draw at run time, in the same compiled program (:func:`all_greedy`).
    return jax.lax.cond(all_greedy(rows), lambda: argmax, sampled)


def all_greedy(rows: RowSampling) -> jax.Array:
    r"""[] bool: every row of a per-row sampling program is greedy -- the branch of its ``lax.cond``\ s that
    selects by argmax alone (the tokens are those of the sampling branch, which picks argmax for greedy rows)."""
    return jnp.all(rows.greedy)
