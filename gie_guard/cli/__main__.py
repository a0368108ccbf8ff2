"""``python -m gie_guard.cli``: the same as the ``gie-guard`` command."""

import sys

from . import main

sys.exit(main())
