"""``python -m s2attn``: the same as the ``s2attn`` command (:mod:`s2attn.apps.cli`).

A program, not a module anything imports: the one place outside :mod:`s2attn.apps` that names it.
"""

import sys

from .apps.cli import main

sys.exit(main())
