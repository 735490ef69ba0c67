"""``python -m jaxkv``: the same as the ``jaxkv`` command."""

import sys

from jaxkv.cli import main

if __name__ == "__main__":
    sys.exit(main())
