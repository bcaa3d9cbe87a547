"""``python -m bonylib`` is the same as the ``bony`` command."""

import sys

if sys.argv[1:2] == ["pretrain"]:
    # before the imports that take seconds: a stop signal in that window must stop the run, not kill it
    from bonylib.signals import catch_stop_signals

    catch_stop_signals()

from bonylib.cli import main  # noqa: E402

raise SystemExit(main())
