"""The ``eagle3-jax`` command line: one module per subcommand.

Every user error (bad option, missing file, broken checkpoint, prompt too
long) ends with a one-line ``error: ...`` on stderr and a non-zero exit, never
a traceback: 1 for bad input or a failing environment (disk, memory), 2 for a
bad command line (with the subcommand's own usage), 3 for an exception the
project did not anticipate (a bug; ``EAGLE3_JAX_DEBUG=1`` shows its
traceback). ``--json`` prints JSON on stdout, for scripts.

Building the parser imports nothing heavy (no JAX, no transformers), so
``--help`` and usage errors answer at once; each command imports what it needs
when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from eagle3_jax.cli import convert, demo, eval, generate, regenerate, train
from eagle3_jax.cli.options import (
    EXIT_ERROR,
    EXIT_INTERNAL,
    EXIT_USAGE,
    UsageError,
    end_progress_lines,
)

__all__ = ["EXIT_ERROR", "EXIT_INTERNAL", "EXIT_USAGE", "build_parser", "main"]

COMMANDS = (generate, convert, train, regenerate, eval, demo)


def build_parser() -> argparse.ArgumentParser:
    from eagle3_jax import __version__

    parser = argparse.ArgumentParser(
        prog="eagle3-jax",
        description="EAGLE-3 speculative decoding for Qwen3 in JAX. Run 'eagle3-jax COMMAND --help' for details.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    for subparser in sub.choices.values():  # usage errors found after parsing show the command's own usage
        subparser.set_defaults(_parser=subparser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would report them with the top-level usage; the command's own is the useful one
        (getattr(args, "_parser", None) or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    from eagle3_jax.errors import Eagle3Error

    try:
        return args.func(args)
    except UsageError as e:
        end_progress_lines()
        (getattr(args, "_parser", None) or parser).error(str(e))
    except Eagle3Error as e:
        return _report(f"error: {e}", EXIT_ERROR)
    except KeyboardInterrupt:
        return _report("interrupted", 130)
    except MemoryError:
        return _report("error: out of host memory; lower --max-cache-len, --max-new-tokens or the batch size",
                       EXIT_ERROR)
    except OSError as e:  # the environment, not the input: a full disk, a permission, a vanished file
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return _report(f"error: {where}{e.strerror or e}", EXIT_ERROR)
    except Exception as e:
        if os.environ.get("EAGLE3_JAX_DEBUG"):
            raise
        return _report(f"error: internal error ({type(e).__name__}: {str(e).strip()[:300]}); this is a bug in "
                       "eagle3-jax, please report it with the traceback that EAGLE3_JAX_DEBUG=1 shows", EXIT_INTERNAL)


def _report(line: str, code: int) -> int:
    """Prints ``line`` on stderr, on a line of its own, and returns the exit status ``code``."""
    end_progress_lines()
    print(line, file=sys.stderr)
    return code
