"""``python -m prism_ext``: the ``prism`` command (how local workers are started)."""

import sys

from .cli import main

sys.exit(main())
