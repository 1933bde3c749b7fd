"""Several processes, one mesh: ``jax.distributed`` (docs/architecture.md#multi-host).

Each host runs the same command (``eagle3-jax generate|eval|train
--distributed ...``) with the same arguments and data. :func:`initialize`
connects the processes before JAX starts a backend; ``jax.devices()`` then
lists every process's devices, the mesh (:func:`eagle3_jax.sharding.make_mesh`)
spans them, each process places only its own shards of the weights, and the
results are gathered to every process (:func:`eagle3_jax.sharding.to_host`).
Only process 0 prints and writes files.

On TPU pods, SLURM and Open MPI, ``jax.distributed.initialize()`` finds the
coordinator by itself; elsewhere give it ``coordinator_address``
(``host:port`` of process 0), ``num_processes`` and ``process_id``. On CPUs the
processes talk through gloo (what the tests use, on 127.0.0.1).
"""

from __future__ import annotations

from eagle3_jax.errors import InputError

_initialized = False


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Connects this process to the others (once per process); an InputError with the reason if it can not."""
    global _initialized
    if _initialized:
        return
    import jax

    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise InputError("--coordinator, --num-processes and --process-id go together (or give none of them to "
                         "let JAX detect the cluster: TPU pods, SLURM, Open MPI)")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise InputError(f"--process-id {process_id} must be in [0, {num_processes})")
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes: collectives over TCP
    except Exception:  # a JAX without the option: CPU meshes then stay within one process
        pass
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    except Exception as e:  # RuntimeError, ValueError, XlaRuntimeError: all "could not connect"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise InputError(f"could not start the distributed runtime ({first}); check --coordinator (process 0's "
                         "host:port, reachable from every process), --num-processes and --process-id, or run "
                         "where JAX detects the cluster") from None
    _initialized = True
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        _connect_quietly()


def _connect_quietly() -> None:
    """Makes the first cross-process collective now, with stdout pointed at stderr: gloo announces its
    connections on stdout, which must hold nothing but a command's output (--json)."""
    import os
    import sys

    from jax.experimental import multihost_utils

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        multihost_utils.sync_global_devices("eagle3_jax: processes connected")
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def is_main_process() -> bool:
    """True in process 0 (the one that prints and writes), and in a single-process run."""
    import jax

    return jax.process_index() == 0
