"""``python -m fetchpool`` is the ``fetchpool`` command."""

import sys

from fetchpool.cli import main

sys.exit(main())
