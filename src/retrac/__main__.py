"""``python -m retrac``: the ``retrac`` command."""

import sys

from retrac.cli import main

sys.exit(main())
