"""``python -m greenpool``: the command line of :mod:`greenpool.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
