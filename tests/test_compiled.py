"""The compiled-program cache: one compilation per shape, the most recently used kept."""

import jax.numpy as jnp

from eagle3_jax.compiled import CompiledFunction


def test_lru_keeps_the_most_recent_programs():
    fn = CompiledFunction(lambda scale, x: x * scale, num_static=1, max_executables=2)
    for n in (1, 2, 3):
        out, seconds = fn(2.0, jnp.ones(n))
        assert out.tolist() == [2.0] * n and seconds > 0
    assert fn.num_compiles == 3
    fn(2.0, jnp.ones(3))  # still cached
    fn(2.0, jnp.ones(2))
    assert fn.num_compiles == 3
    _, seconds = fn(2.0, jnp.ones(1))  # the least recently used was dropped
    assert fn.num_compiles == 4 and seconds > 0
    CompiledFunction.clear_all()
    fn(2.0, jnp.ones(1))
    assert fn.num_compiles == 5
