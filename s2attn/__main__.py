"""``python -m s2attn``: the same as the ``s2attn`` command."""

import sys

from .cli import main

sys.exit(main())
