"""JAX's persistent compilation cache, on by default: a program compiles once per machine, not once per run.

Compiling the speculative loop takes from seconds to minutes (on a 2-core CPU,
most of a first ``eagle3-jax demo``); JAX can keep the compiled programs on
disk and load them in the next process instead. :func:`enable` turns that on
(the CLI and :class:`~eagle3_jax.generation.Generator` call it) in a
per-user directory:

* ``$EAGLE3_JAX_COMPILE_CACHE`` if set (``0``, ``off``, ``none``, ``false``
  or ``no`` turn the cache off),
* else ``$XDG_CACHE_HOME/eagle3-jax/jax-compile``,
* else ``~/.cache/eagle3-jax/jax-compile``.

A cache directory configured for JAX itself (``jax_compilation_cache_dir``,
e.g. through ``JAX_COMPILATION_CACHE_DIR``) is respected as it is, thresholds
included. A directory that can not be written turns the cache off with one
warning; generation goes on without it. The cache holds at most ``MAX_BYTES``
(4 GiB; JAX drops the least recently used programs). The cache is trusted: programs in it
are run, so it must not be writable by other users (JAX's own warning).

JAX's cache is one per process: once on, it serves every compilation of the
process, and ``compile_cache=False`` only means "do not turn it on".
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import warnings

__all__ = ["ENV", "cache_dir", "default_cache_dir", "enable"]

ENV = "EAGLE3_JAX_COMPILE_CACHE"
OFF_VALUES = frozenset({"0", "off", "none", "false", "no"})

logger = logging.getLogger("eagle3_jax.compile_cache")

_lock = threading.Lock()
_enabled_dir: str | None = None  # the directory this module gave JAX
_failed: set[str] = set()  # directories found unwritable (warned about once)
_bounded = False  # whether this module set JAX's cache size bound


def default_cache_dir() -> str | None:
    """The cache directory the environment asks for; None when ``$EAGLE3_JAX_COMPILE_CACHE`` turns it off."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in OFF_VALUES:
        return None
    if value:
        return os.path.abspath(os.path.expanduser(value))
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "eagle3-jax", "jax-compile")


# Bytes the cache may hold before JAX drops the least recently used programs (a CPU program of the
# demo pair is about 100 kB; a GPU program of an 8B pair, a few MB).
MAX_BYTES = 4 << 30


def _config(name: str):
    import jax

    try:
        return getattr(jax.config, name)
    except AttributeError:
        return jax.config._read(name)


def cache_dir() -> str | None:
    """The persistent compilation cache directory JAX uses in this process (None: no cache)."""
    if not _config("jax_enable_compilation_cache"):
        return None
    return _config("jax_compilation_cache_dir") or None


def _writable(path: str) -> str | None:
    """None if ``path`` is (made) a writable directory, else why not."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


def enable(path: str | os.PathLike | bool | None = None) -> str | None:
    """Turns JAX's persistent compilation cache on; returns the directory in use, or None.

    Args:
      path: None or True for the default (:func:`default_cache_dir`, which the
        environment may turn off), False to leave the cache as it is (off
        unless something turned it on), or a directory.

    Idempotent and cheap: call it before compiling. A directory configured in
    JAX beforehand (not by this function) wins over ``path``.
    """
    global _enabled_dir, _bounded
    if path is False:
        return cache_dir()
    import jax

    with _lock:
        configured = _config("jax_compilation_cache_dir")
        if configured and configured != _enabled_dir:  # the user's own JAX setting
            return cache_dir()
        wanted = default_cache_dir() if path is None or path is True else os.path.abspath(os.fspath(path))
        if wanted is None or wanted == _enabled_dir:
            return cache_dir()
        if wanted in _failed:
            return cache_dir()
        problem = _writable(wanted)
        if problem is not None:
            _failed.add(wanted)
            warnings.warn(f"the compilation cache {wanted} can not be written ({problem}); compiling without it "
                          f"(set {ENV}=off to silence this, or point it at a writable directory)",
                          RuntimeWarning, stacklevel=2)
            return cache_dir()
        if _enabled_dir is not None:  # moving our cache elsewhere: JAX opens its cache once unless reset
            from jax.experimental.compilation_cache import compilation_cache

            compilation_cache.reset_cache()
        jax.config.update("jax_compilation_cache_dir", wanted)
        # Cache every program, however quick to compile (JAX's default skips those under 1 s: most
        # prefills on a GPU, and each of the small programs that loading runs).
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
        if _config("jax_compilation_cache_max_size") == -1 and _has_filelock():  # unbounded: JAX's default
            jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
            _bounded = True
        if _bounded:  # the bound is ours: every directory we point JAX at must suit it
            _add_missing_access_times(wanted)
        _enabled_dir = wanted
        logger.debug("persistent compilation cache at %s", wanted)
        return cache_dir()


def _add_missing_access_times(path: str) -> None:
    """Gives every program in ``path`` the access-time file JAX's size-bounded cache expects.

    A process that ran with an unbounded cache (JAX's default) writes programs
    without one; JAX's eviction then fails on them, and with it every later
    write to the cache. Each program missing one gets its file's mtime.
    """
    try:
        names = set(os.listdir(path))
    except OSError:
        return
    for name in names:
        if not name.endswith("-cache"):
            continue
        atime = name[: -len("-cache")] + "-atime"
        if atime in names:
            continue
        try:
            stamp = os.stat(os.path.join(path, name)).st_mtime_ns
            with open(os.path.join(path, atime), "xb") as f:
                f.write(int(stamp).to_bytes(8, "little"))
        except OSError:  # removed meanwhile, or written by another process first
            continue


def _has_filelock() -> bool:
    """JAX bounds its cache's size only with the ``filelock`` package (a dependency of huggingface_hub)."""
    try:
        import filelock  # noqa: F401
    except ImportError:
        return False
    return True
