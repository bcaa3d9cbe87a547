"""``python -m bonylib`` is the same as the ``bony`` command."""

from bonylib.cli import main

raise SystemExit(main())
