"""``python -m selfupgrade``: the same as the ``selfupgrade`` command."""

from .cli import main

raise SystemExit(main())
