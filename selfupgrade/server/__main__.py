"""``python -m selfupgrade.server`` and the ``selfupgrade-hbs`` command: run hbs."""

from __future__ import annotations

import sys

__all__ = ["run"]


def run() -> int:
    """Start hbs (:func:`selfupgrade.server.hbs.main`), or say which extra is missing."""
    try:
        from .hbs import main
    except ImportError as exc:
        print(
            f"selfupgrade-hbs: {exc.name or exc} is not installed; hbs needs the server extra: "
            "pip install 'selfupgrade[server]'",
            file=sys.stderr,
        )
        return 2
    return main()


if __name__ == "__main__":
    raise SystemExit(run())
