"""The main demo: ``python -m examples.demo`` (see examples/single_daemon.py)."""

from __future__ import annotations

from .single_daemon import main

if __name__ == "__main__":
    raise SystemExit(main())
