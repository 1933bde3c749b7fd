"""Defaults that every entry point shares (the Python API and the commands), in one place.

Imports nothing, so the command line's parsers can name them without loading JAX.
"""

# Generated tokens per prompt at most when a caller names none: Generator.generate, evaluate and
# run_benchmark, and the generate, eval and demo commands. (`eagle3-jax regenerate` rewrites whole
# training replies and says so: its own default is 1024; the server takes each request's max_tokens.)
DEFAULT_MAX_NEW_TOKENS = 256
