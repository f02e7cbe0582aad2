"""``python -m mbwq_ops ...`` is the ``mbwq`` command (``python -m mbwq_ops demo``)."""
import sys

from .apps.cli import main

sys.exit(main())
