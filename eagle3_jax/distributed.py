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
(``host:port`` of process 0), ``num_processes`` and ``process_id``: the
processes then meet first (:func:`rendezvous`), so that one that never comes
is a clear error after a timeout (``--distributed-timeout``, default 60 s)
rather than JAX aborting the process after five silent minutes. On CPUs the
processes talk through gloo (what the tests use, on 127.0.0.1).
"""

from __future__ import annotations

import socket
import time

from eagle3_jax.errors import InputError

_initialized = False
# Seconds the processes of a run have, by default, to find each other.
DEFAULT_TIMEOUT = 60.0
_HELLO = "eagle3-jax-rendezvous 1"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Connects this process to the others (once per process); an InputError with the reason if it can not.

    With an explicit coordinator, the processes first meet in :func:`rendezvous` (process 0 listens on the
    coordinator's address, the others connect), so that a process that never comes is one clear error
    after ``timeout`` seconds (naming the coordinator and the missing processes) instead of JAX's abort of
    the whole process; process 0's coordination service then binds that address only, not every interface.
    """
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
    if not timeout > 0:
        raise InputError(f"the distributed timeout must be positive, got {timeout}")
    if coordinator_address is not None:
        rendezvous(coordinator_address, num_processes, process_id, timeout)
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes: collectives over TCP
    except Exception:  # a JAX without the option: CPU meshes then stay within one process
        pass
    options = {"initialization_timeout": max(1, int(round(timeout)))}
    if coordinator_address is not None and process_id == 0:
        options["coordinator_bind_address"] = coordinator_address  # that address only, not every interface
    try:
        import inspect

        accepted = inspect.signature(jax.distributed.initialize).parameters
        options = {k: v for k, v in options.items() if k in accepted}
    except (TypeError, ValueError):
        options = {}
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, **options)
    except Exception as e:  # RuntimeError, ValueError, XlaRuntimeError: all "could not connect"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise InputError(f"could not start the distributed runtime ({first}); check --coordinator (process 0's "
                         "host:port, reachable from every process), --num-processes and --process-id, or run "
                         "where JAX detects the cluster") from None
    _initialized = True
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        _connect_quietly()


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6 address]:port``) -> (host, port); an InputError naming the address otherwise."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"--coordinator must be HOST:PORT (a port in [1, 65535]), got {address!r}")
    return host, int(port)


def rendezvous(address: str, num_processes: int, process_id: int, timeout: float) -> None:
    """The processes of one run meet before JAX's runtime starts: process 0 listens on ``address`` and
    waits up to ``timeout`` seconds for processes 1..P-1, each of which connects (retrying until the
    same deadline) and waits for process 0's word that everyone is there. Any failure is an InputError
    naming the coordinator and what is missing, in every process that is still waiting."""
    if num_processes <= 1:
        return
    host, port = split_address(address)
    deadline = time.monotonic() + timeout
    if process_id == 0:
        _gather(address, host, port, num_processes, timeout, deadline)
    else:
        _join(address, host, port, num_processes, process_id, timeout, deadline)


def _gather(address: str, host: str, port: int, num_processes: int, timeout: float, deadline: float) -> None:
    try:
        server = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except (OSError, OverflowError) as e:
        raise InputError(f"--coordinator {address}: process 0 can not listen there "
                         f"({getattr(e, 'strerror', None) or e}); give an address of process 0's host and a free "
                         "port") from None
    joined: dict[int, socket.socket] = {}
    problem = None
    try:
        while len(joined) < num_processes - 1 and problem is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            server.settimeout(remaining)
            try:
                conn, _ = server.accept()
            except TimeoutError:
                break
            conn.settimeout(max(1.0, min(5.0, remaining)))
            try:
                words = _read_line(conn).split()
            except OSError:
                conn.close()
                continue
            if len(words) != 4 or " ".join(words[:2]) != _HELLO or not all(w.isdigit() for w in words[2:]):
                conn.close()  # not one of ours (a port scanner, a stray client)
                continue
            pid, count = int(words[2]), int(words[3])
            if count != num_processes:
                problem = (f"process {pid} was started with --num-processes {count}, process 0 with "
                           f"{num_processes}")
            elif pid in joined or not 0 < pid < num_processes:
                problem = f"two processes joined as --process-id {pid}" if pid in joined else \
                    f"a process joined as --process-id {pid}, outside [1, {num_processes})"
            joined.setdefault(pid, conn)
            if problem is not None and conn is not joined[pid]:
                conn.close()
        missing = sorted(set(range(1, num_processes)) - set(joined))
        if problem is None and missing:
            problem = (f"process{'es' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of "
                       f"{num_processes} did not join within {timeout:g} s (--distributed-timeout)")
        verdict = "go" if problem is None else f"error {problem}"
        for conn in joined.values():
            try:
                conn.sendall((verdict + "\n").encode())
                conn.settimeout(5.0)
                conn.recv(1)  # the peer closes first (its port, not the coordinator's, waits in TIME_WAIT)
            except OSError:
                pass
    finally:
        for conn in joined.values():
            conn.close()
        server.close()
    if problem is not None:
        raise InputError(f"the distributed run did not start: {problem}, at the coordinator {address} (process "
                         "0); start the same command on every host, each with its own --process-id")


def _join(address: str, host: str, port: int, num_processes: int, process_id: int, timeout: float,
          deadline: float) -> None:
    conn = None
    while conn is None:
        try:
            conn = socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic())))
        except OSError:
            if time.monotonic() >= deadline:
                raise InputError(f"the distributed run did not start: the coordinator {address} (process 0) could "
                                 f"not be reached within {timeout:g} s (--distributed-timeout); start process 0 "
                                 "there, or check the address and the network") from None
            time.sleep(0.2)
    try:
        conn.sendall(f"{_HELLO} {process_id} {num_processes}\n".encode())
        # Process 0 answers by its own deadline, at most `timeout` after it began to listen, which was before
        # this connection: waiting that long from now (not from this process's start) never gives up first.
        conn.settimeout(timeout + 10.0)
        try:
            answer = _read_line(conn)
        except OSError:
            answer = ""
    finally:
        conn.close()
    if answer == "go":
        return
    if answer.startswith("error "):
        raise InputError(f"the distributed run did not start: {answer[6:]}, at the coordinator {address} "
                         "(process 0)")
    raise InputError(f"the distributed run did not start: the coordinator {address} (process 0) did not answer "
                     f"within {timeout:g} s (--distributed-timeout)")


def _read_line(conn: socket.socket, limit: int = 1024) -> str:
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = conn.recv(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data.decode("ascii", "replace").strip()


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
