"""``python -m fxprune``: the same command line as the ``fxprune`` console script."""
import sys

from .cli import main

sys.exit(main())
