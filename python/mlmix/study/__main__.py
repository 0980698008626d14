"""``python -m mlmix.study [CONFIG]``."""

import sys

from .runner import main

sys.exit(main())
