#!/usr/bin/env python
"""Convert a Hugging Face Qwen3/Qwen2 checkpoint to eagle3-jax's orbax format.

    python convert/convert_checkpoint.py SRC DST [--dtype bfloat16] [--overwrite]

Same as ``eagle3-jax convert``; see ``--help``.
"""

import sys

from eagle3_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
