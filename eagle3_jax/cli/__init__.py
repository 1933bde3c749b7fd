"""The ``eagle3-jax`` command line: one module per subcommand.

Every user error (bad option, missing file, broken checkpoint, prompt too
long) ends with a one-line ``error: ...`` on stderr and a non-zero exit, never
a traceback: 1 for bad input or a failing environment (disk, memory), 2 for a
bad command line (with the subcommand's own usage), 3 for an exception the
project did not anticipate (a bug; ``EAGLE3_JAX_DEBUG=1`` shows its
traceback). ``--json`` prints JSON on stdout, for scripts.

Before anything else, :func:`main` applies eagle3-jax's recommended XLA
flags (:mod:`eagle3_jax.xla_flags`; ``EAGLE3_JAX_KEEP_XLA_FLAGS=1`` opts out).

Every command keeps its compiled programs in JAX's persistent compilation
cache (:mod:`eagle3_jax.compile_cache`; ``--no-compile-cache`` or
``EAGLE3_JAX_COMPILE_CACHE=off`` turn it off) and says on stderr when it
compiles, and how long that took.

Building the parser imports nothing heavy (no JAX, no transformers), so
``--help`` and usage errors answer at once; each command imports what it needs
when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from eagle3_jax.cli import compile, convert, demo, eval, generate, regenerate, serve, train
from eagle3_jax.cli.options import (
    COMPILE_MESSAGES,
    EXIT_ERROR,
    EXIT_INTERNAL,
    EXIT_USAGE,
    UsageError,
    end_progress_lines,
    is_main_process,
)
from eagle3_jax.cli.signals import interrupted

__all__ = ["EXIT_ERROR", "EXIT_INTERNAL", "EXIT_USAGE", "build_parser", "entry", "main"]

COMMANDS = (generate, serve, convert, train, regenerate, eval, demo, compile)


def build_parser() -> argparse.ArgumentParser:
    from eagle3_jax import __version__

    parser = argparse.ArgumentParser(
        prog="eagle3-jax",
        description="EAGLE-3 speculative decoding for Qwen3, Qwen2 and Llama in JAX. "
                    "Run 'eagle3-jax COMMAND --help' for details.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    for subparser in sub.choices.values():  # usage errors found after parsing show the command's own usage
        subparser.set_defaults(_parser=subparser)
        subparser.add_argument("--no-compile-cache", dest="compile_cache", action="store_false",
                               help="do not keep compiled programs on disk for the next run (by default they are kept "
                                    "in $EAGLE3_JAX_COMPILE_CACHE, else ~/.cache/eagle3-jax/jax-compile; "
                                    "EAGLE3_JAX_COMPILE_CACHE=off has the effect of this flag)")
    return parser


def entry() -> NoReturn:
    """The ``eagle3-jax`` command (the console script, ``python -m eagle3_jax``): :func:`main`'s status as the
    process's exit status.

    After an interruption (status 130) the process ends at once with it (``os._exit``, output flushed; the
    command's own clean-up has run): CPython marks a ``KeyboardInterrupt`` raised inside Python code that a
    native library runs (``PyRun_String``: JAX's and torch's start-up do) as unhandled even when it was
    caught, and would then end the process by SIGINT instead of with the status.
    """
    code = main()
    if code == 130 and interrupted():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(130)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    import signal

    from eagle3_jax.cli.signals import InterruptGuard

    # Ctrl-C and SIGTERM end every command as an interruption (its clean-up runs, exit 130), even when some
    # library swallows the KeyboardInterrupt (cli/signals.py); the server ends gracefully once it serves.
    with InterruptGuard((signal.SIGINT, signal.SIGTERM)):
        try:
            return _main(argv)
        except KeyboardInterrupt:  # one that came before _main's own handlers (flags, parsing, imports)
            return _report("interrupted", 130)


def _main(argv: Sequence[str] | None) -> int:
    from eagle3_jax.xla_flags import apply_default_flags

    apply_default_flags()  # first: XLA reads $XLA_FLAGS when JAX starts a backend
    # transformers' advice lines (e.g. "PyTorch was not found. Models won't be available") are about its own
    # models, which no command uses (tokenizers and configs only): not news for a user of this CLI
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would report them with the top-level usage; the command's own is the useful one
        (getattr(args, "_parser", None) or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    import warnings

    from eagle3_jax.errors import Eagle3Error

    saved_env = os.environ.get(_CACHE_ENV)
    saved_show = warnings.showwarning
    warnings.showwarning = _show_warning  # the library's warnings as one 'warning: ...' line each
    remove_listener = None
    try:
        remove_listener = _start_compile_cache(args)
        return args.func(args)
    except UsageError as e:
        end_progress_lines()
        (getattr(args, "_parser", None) or parser).error(str(e))
    except KeyboardInterrupt:
        return _report("interrupted", 130)
    except MemoryError:
        if interrupted():
            return _report("interrupted", 130)
        return _report("error: out of host memory; lower --max-cache-len, --max-new-tokens or the batch size",
                       EXIT_ERROR)
    except Exception as e:
        if interrupted():  # a library turned the interruption into an error of its own
            return _report("interrupted", 130)
        if isinstance(e, Eagle3Error):
            return _report(f"error: {e}", EXIT_ERROR)
        if isinstance(e, OSError):  # the environment, not the input: a full disk, a permission, a vanished file
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            return _report(f"error: {where}{e.strerror or e}", EXIT_ERROR)
        if os.environ.get("EAGLE3_JAX_DEBUG"):
            raise
        return _report(f"error: internal error ({type(e).__name__}: {str(e).strip()[:300]}); this is a bug in "
                       "eagle3-jax, please report it with the traceback that EAGLE3_JAX_DEBUG=1 shows", EXIT_INTERNAL)
    finally:
        warnings.showwarning = saved_show
        if remove_listener is not None:
            remove_listener()
        COMPILE_MESSAGES.release()  # (held back by a stream an error cut short)
        COMPILE_MESSAGES.end_line()
        if saved_env is None:
            os.environ.pop(_CACHE_ENV, None)
        else:
            os.environ[_CACHE_ENV] = saved_env


_CACHE_ENV = "EAGLE3_JAX_COMPILE_CACHE"  # eagle3_jax.compile_cache.ENV, without importing JAX for --help


def _start_compile_cache(args):
    """Turns the persistent compilation cache on (unless --no-compile-cache) and the compile messages on.

    Returns the function that stops the messages.
    """
    import warnings

    from eagle3_jax import compile_cache
    from eagle3_jax.compiled import add_compile_listener

    if not getattr(args, "compile_cache", True):
        os.environ[_CACHE_ENV] = "off"  # for the Generators the command makes (restored when it returns)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compile_cache.enable()
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return add_compile_listener(COMPILE_MESSAGES)




def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if not is_main_process():  # process 0 of a --distributed run says it for all
        return
    COMPILE_MESSAGES.end_line()
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _report(line: str, code: int) -> int:
    """Prints ``line`` on stderr, on a line of its own, and returns the exit status ``code``."""
    COMPILE_MESSAGES.end_line()
    end_progress_lines()
    print(line, file=sys.stderr)
    return code
