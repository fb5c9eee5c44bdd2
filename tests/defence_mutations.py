"""Check that every defence against the attacks of docs/security.md is needed.

Removes one defence at a time from the sources (restoring them afterwards, also on errors),
runs tests/test_attacks.py, and prints which tests failed without it. Every line must name the
tests of the attack that defence answers; "NOTHING FAILED" would mean a test that cannot fail.

    python tests/defence_mutations.py      (from the repository root)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SIGNATURE = Path("selfupgrade/verify/signature.py")
DOWNLOAD = Path("selfupgrade/_download.py")
HTTP = Path("selfupgrade/transport/http.py")

# name -> edits (file, text, replacement) that remove the defence
MUTANTS: dict[str, list[tuple[Path, str, str]]] = {
    "signature check": [
        (
            SIGNATURE,
            "        message = canonical(manifest.signed)\n",
            "        return\n        message = canonical(manifest.signed)\n",
        )
    ],
    "unsigned check": [(SIGNATURE, "        if order.manifest is None:\n", "        if False:\n")],
    "expiry": [(SIGNATURE, "        if manifest.expires <= now:", "        if False:")],
    "product/platform": [
        (
            SIGNATURE,
            "        if (manifest.product, manifest.platform) != (self.product, self.platform):",
            "        if False:",
        )
    ],
    "version": [(SIGNATURE, "        if manifest.version != order.version:", "        if False:")],
    "whole release": [
        (SIGNATURE, "        if roles != set(manifest.artifacts):", "        if False:")
    ],
    "rollback": [
        (
            SIGNATURE,
            "        if current is not None and manifest.version < current and "
            "not manifest.rollback:",
            "        if False:",
        )
    ],
    "signed size": [
        (SIGNATURE, "        if self._size > self._expected.size:", "        if False:")
    ],
    "signed digest": [
        (
            SIGNATURE,
            "        if not hmac.compare_digest(actual, self._expected.sha256):",
            "        if False:",
        )
    ],
    "deadline": [
        (DOWNLOAD, "        if self._clock() > self._deadline:", "        if False:"),
        (
            HTTP,
            "                        if time.monotonic() > deadline:",
            "                        if False:",
        ),
    ],
}


def run_without(edits: list[tuple[Path, str, str]]) -> list[str]:
    originals = {path: path.read_text() for path, _, _ in edits}
    try:
        for path, old, new in edits:
            text = path.read_text()
            if old not in text:
                raise SystemExit(f"{path} no longer contains {old.strip()!r}; update this script")
            path.write_text(text.replace(old, new, 1))
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "--timeout",
                "60",
                "-p",
                "no:cacheprovider",
                "tests/test_attacks.py",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        for path, text in originals.items():
            path.write_text(text)
    return [
        line.split("::", 1)[1].split(" ")[0]
        for line in result.stdout.splitlines()
        if line.startswith("FAILED")
    ]


def main() -> int:
    missing = 0
    for name, edits in MUTANTS.items():
        failed = run_without(edits)
        missing += not failed
        print(f"{name:18} -> {', '.join(failed) or 'NOTHING FAILED'}")
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
