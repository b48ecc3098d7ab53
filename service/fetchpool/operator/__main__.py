"""``python -m fetchpool.operator``: the same as ``fetchpool operator``."""

import sys

from fetchpool.operator import main

sys.exit(main())
