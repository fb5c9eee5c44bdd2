"""``python -m examples.hbs_server``: the short example server (``selfupgrade-hbs`` is hbs)."""

from .server import main

main()
