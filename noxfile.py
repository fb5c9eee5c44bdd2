"""Sessions: tests, lint, typecheck, demo, bench.

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


@nox.session(python=["3.10", "3.13"])
def compat(session: nox.Session) -> None:
    """The core in-process tests (models, updater, installer, the control plane and its
    stores) on the lowest and the highest Python the package supports; the whole suite runs
    on the default one."""
    session.install("-e", ".[test]")
    session.run("pytest", "-q", "-p", "no:cacheprovider", *(session.posargs or COMPAT_TESTS))


COMPAT_TESTS = [
    "tests/test_models.py",
    "tests/test_policy.py",
    "tests/test_updater.py",
    "tests/test_installer.py",
    "tests/test_download.py",
    "tests/test_server_core.py",
    "tests/test_server_rollouts.py",
    "tests/test_silent_agents.py",
    "tests/test_exports.py",
]


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
def docs(session: nox.Session) -> None:
    """The docs site (Sphinx, MyST Markdown, furo; the API reference from the docstrings)
    in docs/_build/html, warnings as errors."""
    session.install("-e", ".[server,docs]")
    session.run("sphinx-build", "-b", "html", "-W", "--keep-going", "docs", "docs/_build/html")


@nox.session
def demo(session: nox.Session) -> None:
    """The fleet demo: N agents upgrade themselves through hbs (arguments go to the demo)."""
    session.install("-e", ".[server,redis,supervisor]")
    session.run("python", "-m", "examples.demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmarks (bench/): figures against their references, in a venv with only the
    package and the extras the agent and hbs use. Needs wrk, nginx, curl and redis-server
    (Debian packages). Each script also runs alone: ``python bench/<script> --help``."""
    session.install("-e", ".[server,redis,sign,supervisor]")
    for script in BENCHMARKS:
        session.run("python", f"bench/{script}")


BENCHMARKS = [
    "hbs_heartbeat.py",
    "hbs_replicas.py",
    "download.py",
    "agent_idle.py",
    "order_to_heartbeat.py",
    "simulator.py",
    "zero_downtime.py",
]
