"""``python -m prism_ext.cli``: the ``prism`` command."""

import sys

from . import main

sys.exit(main())
