"""The loop driver plain and speculative decoding share (docs/architecture.md#the-loop).

A decoding loop state is any pytree with ``result`` (a
:class:`~eagle3_jax.decoding.common.DecodeResult`) and ``iterations`` (an
int32 scalar); one ``step`` advances every unfinished row. :func:`run_loop`
runs steps in one ``lax.while_loop`` until every row has finished, or for at
most ``max_iterations`` more steps (chunks, for streaming and stop strings;
the host calls it again with the returned state).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

import jax
import jax.numpy as jnp

from eagle3_jax.decoding.common import RUNNING, DecodeResult


class LoopState(Protocol):
    result: DecodeResult
    iterations: jax.Array


S = TypeVar("S", bound=LoopState)


def run_loop(step: Callable[[S], S], state: S, max_iterations: jax.Array | None = None) -> S:
    """Runs ``step`` until no row is RUNNING (or ``max_iterations`` more steps ran).

    Args:
      step: state -> state, one forward (plain) or one cycle (speculative);
        it must advance ``state.iterations`` by one.
      state: the loop state after ``start``.
      max_iterations: int32 scalar, traced (changing it does not recompile);
        None runs to the end.
    """
    limit = jnp.iinfo(jnp.int32).max // 2 if max_iterations is None else max_iterations
    stop_at = state.iterations + limit

    def cond(s):
        return jnp.any(s.result.finish_reason == RUNNING) & (s.iterations < stop_at)

    return jax.lax.while_loop(cond, step, state)
