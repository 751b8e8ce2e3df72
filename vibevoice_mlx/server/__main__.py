"""`python -m vibevoice_mlx.server --model <folder>`: the `serve` command without the main CLI."""

import logging
import sys

from .cli import serve

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    serve(prog_name="python -m vibevoice_mlx.server")
