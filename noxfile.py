"""Sessions: tests, lint, typecheck, demo (and bench, once benchmarks exist).

``python3 -m nox -s tests`` installs the package with its test extras in a virtualenv and runs
pytest; extra arguments go to pytest (``python3 -m nox -s tests -- -k crash``).
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite, real processes and servers included."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package."""
    session.install("-e", ".[test]", "mypy", "types-psutil")
    session.run("mypy", "--strict", "selfupgrade")


@nox.session
def demo(session: nox.Session) -> None:
    """The fleet demo: N agents upgrade themselves through hbs (arguments go to the demo)."""
    session.install("-e", ".[server,redis,supervisor]")
    session.run("python", "-m", "examples.demo", *session.posargs)
