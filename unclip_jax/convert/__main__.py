"""`python -m unclip_jax.convert`: see `unclip_jax.convert.cli`."""
import sys

from unclip_jax.convert.cli import main

if __name__ == "__main__":
  sys.exit(main())
