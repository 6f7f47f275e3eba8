"""``python -m hyphae.cli`` — the same as the ``hyphae`` console script."""

import sys

from .main import main

sys.exit(main())
