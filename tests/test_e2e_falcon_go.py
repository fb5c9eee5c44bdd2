"""The real, unmodified Go falcon-agent against a real hbs process (issue 10, in progress).

Built from the upstream source by its own build.sh (see ``tests/falcon_go.py``), five agents
under a real supervisord, a real artifact server on 127.0.0.1, hbs speaking the falcon
JSON-RPC protocol; published with the article's ``POST /agent/upgrade``.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path

import pytest

from selfupgrade.testing import ArtifactServer

from .falcon_go import GoFleet, build_agents
from .fleet import Hbs, Sampler, wait_until

pytestmark = pytest.mark.real

OLD, NEW = "6.1.0", "6.1.1"


def holders(db: Path, task_id: str):  # type: ignore[no-untyped-def]
    def probe() -> int:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            (n,) = conn.execute(
                "SELECT COUNT(*) FROM leases WHERE task_id = ? AND until > ?",
                (task_id, time.time()),
            ).fetchone()
        return int(n)

    return probe


def test_real_agents_upgrade_never_more_than_the_queue_at_once(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    binaries = build_agents(OLD, NEW)
    new = binaries[NEW].read_bytes()
    artifact_server.add(f"open-falcon/bin_{NEW}", new)
    wgeturl = artifact_server.url("open-falcon")
    db = tmp_path / "hbs.db"
    with (
        Hbs(f"sqlite:{db}", tmp_path / "hbs.log", rpc=True, queue=2, lease_s=60) as hbs,
    ):
        assert hbs.rpc_port is not None
        with GoFleet(tmp_path, 5, binaries[OLD], hbs.rpc_port) as fleet:
            wait_until(
                "5 agents on 6.1.0",
                lambda: sorted(hbs.versions().values()) == [OLD] * 5,
                explain=hbs.log,
            )
            body = {
                "wgeturl": wgeturl,
                "version": NEW,
                "binfile_md5": hashlib.md5(new).hexdigest(),
            }
            reply = hbs.publish(body)
            assert reply.status_code == 200, reply.text
            task_id = reply.json()["data"]["task_id"]
            started = time.monotonic()
            with Sampler(holders(db, task_id)) as held:
                wait_until(
                    "5 agents on 6.1.1",
                    lambda: (
                        sorted(hbs.versions().values()) == [NEW] * 5
                        and hbs.status()["counters"]["done"] == 5
                    ),
                    timeout_s=120,
                    explain=hbs.log,
                )
            took = time.monotonic() - started
            downloads = [r for r in artifact_server.requests if r.path.endswith(f"bin_{NEW}")]
            starts = {name: fleet.starts(name) for name in fleet.names}
            print(
                f"5 real agents on {NEW} in {took:.1f} s; slots held at most {held.peak} "
                f"(limit 2, {held.samples} samples); downloads at once at most "
                f"{artifact_server.peak_active}; downloads {len(downloads)}; starts {starts}"
            )
            assert held.samples > 50 and 0 < held.peak <= 2, held.peak
            assert artifact_server.peak_active <= 2
            assert all(fleet.program(name) == new for name in fleet.names)
            assert len(downloads) == 5  # one download per agent
            assert all(n == 2 for n in starts.values()), starts  # one restart each
