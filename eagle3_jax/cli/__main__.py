from eagle3_jax.cli import entry

entry()
