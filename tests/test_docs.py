"""The examples in the docs run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from selfupgrade import Role
from selfupgrade.testing import toy_release

pytest_plugins = ["pytester"]
DOCS = Path(__file__).resolve().parent.parent / "docs"


def block_after(page: str, heading: str) -> str:
    text = (DOCS / page).read_text()
    section = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


def test_the_users_test_in_testing_md_passes(pytester: pytest.Pytester) -> None:
    code = block_after("testing.md", "## A test of your own daemon")
    assert len(code.strip().splitlines()) < 30
    toy = toy_release("1.0")
    (pytester.path / "dist").mkdir()
    (pytester.path / "dist" / "toyd").write_bytes(toy.files[Role.BIN])
    (pytester.path / "dist" / "toy.json").write_bytes(toy.files[Role.CFG])
    pytester.makepyfile(test_users_daemon=code)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=1)
