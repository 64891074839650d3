"""``python -m pyinfluence``: the same command line as the ``pyinfluence`` console script."""

import sys

from pyinfluence.cli.commands import main

if __name__ == "__main__":
    sys.exit(main())
