"""``python -m mlmix.eval CONFIG``: the same as ``mlmix eval CONFIG``."""

import sys

from .runner import main

sys.exit(main())
