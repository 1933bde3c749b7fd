"""Package data: small files shipped with eagle3-jax (``bench/``: benchmark prompt slices, see its README.md)."""
