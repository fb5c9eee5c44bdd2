"""Check that every defence against the attacks of docs/security.md is needed.

Removes one defence at a time from the sources (restoring them afterwards, also on errors),
runs tests/test_attacks.py, and prints which tests failed without it. Every line must name the
tests of the attack that defence answers; "NOTHING FAILED" would mean a test that cannot fail.

    python tests/defence_mutations.py      (from the repository root)
"""

import shutil
import subprocess
import sys

MUTANTS = {
    "signature check": (
        "selfupgrade/verify/signature.py",
        "        message = canonical(manifest.signed)\n",
        "        return\n        message = canonical(manifest.signed)\n",
    ),
    "unsigned check": (
        "selfupgrade/verify/signature.py",
        "        if order.manifest is None:\n",
        "        if False:\n",
    ),
    "expiry": (
        "selfupgrade/verify/signature.py",
        "        if manifest.expires <= now:",
        "        if False:",
    ),
    "product/platform": (
        "selfupgrade/verify/signature.py",
        "        if (manifest.product, manifest.platform) != (self.product, self.platform):",
        "        if False:",
    ),
    "version": (
        "selfupgrade/verify/signature.py",
        "        if manifest.version != order.version:",
        "        if False:",
    ),
    "whole release": (
        "selfupgrade/verify/signature.py",
        "        if roles != set(manifest.artifacts):",
        "        if False:",
    ),
    "rollback": (
        "selfupgrade/verify/signature.py",
        "        if current is not None and manifest.version < current and not manifest.rollback:",
        "        if False:",
    ),
    "signed size": (
        "selfupgrade/verify/signature.py",
        "        if self._size > self._expected.size:",
        "        if False:",
    ),
    "signed digest": (
        "selfupgrade/verify/signature.py",
        "        if not hmac.compare_digest(actual, self._expected.sha256):",
        "        if False:",
    ),
    "deadline": (
        "selfupgrade/_download.py",
        "        if self._clock() > self._deadline:",
        "        if False:",
    ),
}
results = {}
for name, (path, old, new) in MUTANTS.items():
    src = open(path).read()
    assert old in src, name
    shutil.copy(path, "/tmp/mutant.bak")
    try:
        if name == "deadline":
            http = "selfupgrade/transport/http.py"
            shutil.copy(http, "/tmp/mutant_http.bak")
            h = open(http).read()
            h2 = h.replace(
                "                        if time.monotonic() > deadline:",
                "                        if False:",
            )
            assert h2 != h
            open(http, "w").write(h2)
        open(path, "w").write(src.replace(old, new, 1))
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "--timeout",
                "60",
                "tests/test_attacks.py",
                "-p",
                "no:cacheprovider",
            ],
            capture_output=True,
            text=True,
        )
        failed = [
            l.split("::")[1].split(" ")[0]
            for l in out.stdout.splitlines()
            if l.startswith("FAILED")
        ]
        results[name] = failed or ["NOTHING FAILED"]
    finally:
        shutil.copy("/tmp/mutant.bak", path)
        if name == "deadline":
            shutil.copy("/tmp/mutant_http.bak", "selfupgrade/transport/http.py")
for k, v in results.items():
    print(f"{k:18} -> {', '.join(v)}")
