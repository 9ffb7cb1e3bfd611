"""``python -m rkort``: the ``rkort`` command."""

import sys

from .cli import main

sys.exit(main())
