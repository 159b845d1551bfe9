"""``python -m jaxpeft``: the ``jaxpeft`` command line (see ``jaxpeft.cli``)."""

import sys

from jaxpeft.cli import main

sys.exit(main())
