import sys

from eagle3_jax.cli import main

sys.exit(main())
