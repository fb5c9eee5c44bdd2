"""``python -m examples.hbs_server``."""

from .server import main

raise SystemExit(main())
