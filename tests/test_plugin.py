"""The pytest plugin: its fixtures, as a user's test suite sees them (through pytester), and as
our own suite uses them."""

from __future__ import annotations

import sys
import time

import pytest

from selfupgrade.testing import ArtifactServer, Fleet, ReleaseFactory

pytest_plugins = ["pytester"]


def test_a_users_test_file_gets_the_fixtures_without_a_conftest(pytester: pytest.Pytester) -> None:
    """The fixtures come from the pytest11 entry point of the installed package."""
    pytester.makepyfile(
        test_user="""
        from selfupgrade import Role

        def test_upgrade(hbs, fleet, artifact_server, release_factory):
            new = release_factory.toy("1.1")
            hbs.publish({"wgeturl": artifact_server.publish(new), "version": "1.1",
                         "binfile_md5": new.digest(Role.BIN, "md5").hex})
            fleet.wait_until(version="1.1", timeout_s=60)
            assert set(fleet.versions().values()) == {"1.1"}
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=1)


def test_errors_in_a_server_thread_fail_the_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_user="""
        import httpx

        def test_breaks_the_server(artifact_server):
            artifact_server._entries["/x"] = "not an entry"  # the handler will raise
            try:
                httpx.get(artifact_server.url("x"), timeout=5)
            except httpx.HTTPError:
                pass  # the client only sees a dropped connection...
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=1, errors=1)  # ...the fixture re-raises the cause at teardown
    result.stdout.fnmatch_lines(["*AttributeError*"])


def test_the_classes_work_without_pytest(tmp_path) -> None:  # type: ignore[no-untyped-def]
    factory = ReleaseFactory()
    from selfupgrade.testing import HbsServer

    with (
        HbsServer(tmp_path / "hbs") as hbs,
        ArtifactServer() as files,
        Fleet(hbs.heartbeat_url, tmp_path / "fleet", release=factory.toy("1.0"), n=2) as fleet,
    ):
        new = factory.toy("1.1")
        base = files.publish(new)
        from selfupgrade import Role

        hbs.publish(
            {
                "wgeturl": base,
                "version": "1.1",
                "binfile_md5": new.digest(Role.BIN, "md5").hex,
                "cfgfile_md5": new.digest(Role.CFG, "md5").hex,
                "type": 2,
            }
        )
        fleet.wait_until(version="1.1", timeout_s=60)
        assert fleet.installed("agent-1")[Role.BIN] == new.files[Role.BIN]


# ---- our own suite uses the fixtures -------------------------------------------------------


def test_a_fleet_upgrades_through_hbs(hbs, make_fleet, artifact_server, release_factory) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet(n=6)
    new = release_factory.toy("1.1")
    base = artifact_server.publish(new)
    detail = hbs.start_rollout(
        {
            "release": {"version": "1.1", "artifacts": new.order(base).to_wire()["artifacts"]},
            "plan": {
                "waves": [
                    {"name": "canary", "hosts": 1},
                    {"name": "all", "percent": 100, "max_in_flight": 3},
                ]
            },
        }
    )
    fleet.wait_until(version="1.1", timeout_s=60)
    deadline = time.monotonic() + 10  # the last confirming heartbeat may still be on its way
    while hbs.rollout(detail["task"]["id"])["status"] != "complete" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hbs.rollout(detail["task"]["id"])["done"] == 6


def test_a_signed_release_rolls_out_to_agents_that_trust_the_factorys_key(
    hbs, make_fleet, artifact_server, release_factory
) -> None:  # type: ignore[no-untyped-def]
    from selfupgrade.verify.signature import SignatureVerifier

    def verifier() -> SignatureVerifier:
        keys = release_factory.trusted_keys()
        return SignatureVerifier(keys, product="toyd", platform="linux-x86_64")

    fleet = make_fleet(n=2, verifier=verifier)
    plan = {"waves": [{"percent": 100}]}
    new = release_factory.signed(
        release_factory.toy("1.1"), product="toyd", platform="linux-x86_64"
    )
    body = new.rollout(artifact_server.publish(new), plan)
    assert body["manifest"]["signed"]["version"] == "1.1"
    assert body["release"]["artifacts"]["bin"]["url"].startswith(artifact_server.base_url)
    hbs.start_rollout(body)
    fleet.wait_until(version="1.1", timeout_s=60)
    unsigned = release_factory.toy("1.2")  # the same agents refuse a release nobody signed
    rid = hbs.start_rollout(unsigned.rollout(artifact_server.publish(unsigned), plan))["task"]["id"]
    deadline = time.monotonic() + 30
    while hbs.rollout(rid)["status"] != "halted" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "no signed manifest" in hbs.rollout(rid)["halt_reason"], fleet.describe()
    assert set(fleet.versions().values()) == {"1.1"}


def test_kill_and_crash_next_start(hbs, fleet, artifact_server, release_factory) -> None:  # type: ignore[no-untyped-def]
    from selfupgrade import Role

    crashing = release_factory.toy("1.1")
    base = artifact_server.publish(crashing)
    fleet.kill("agent-1")  # it comes back (a second start)
    deadline = time.monotonic() + 10
    while fleet.agents["agent-1"].starts < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fleet.agents["agent-1"].starts == 2
    for name in fleet.names:
        fleet.crash_next_start(name)  # the next start (into 1.1) fails once...
        fleet.crash_next_start(name)  # ...and again: over max_starts=2, the guard rolls back
    hbs.publish(
        {"wgeturl": base, "version": "1.1", "binfile_md5": crashing.digest(Role.BIN, "md5").hex}
    )
    old = release_factory.toy("1.0")
    deadline = time.monotonic() + 30
    while hbs.status()["counters"]["failures"] < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert hbs.status()["counters"]["failures"] >= 3, fleet.describe()
    assert all(fleet.installed(n)[Role.BIN] == old.files[Role.BIN] for n in fleet.names)
    assert all(h.crashes == 2 for h in fleet.agents.values()), fleet.describe()


def test_a_users_daemon_as_real_processes(
    hbs, make_fleet, artifact_server, release_factory
) -> None:  # type: ignore[no-untyped-def]
    """The toy stands in for a user's daemon: real processes through the guard."""
    from selfupgrade import Role

    fleet = make_fleet(
        n=2,
        mode="process",
        command=[sys.executable, "{install}/toyd"],
        env={"TOY_HOST": "{host}", "TOY_HBS": "{hbs}", "TOY_STATE_DIR": "{state}"},
    )
    new = release_factory.toy("1.1")
    base = artifact_server.publish(new)
    hbs.publish({"wgeturl": base, "version": "1.1", "binfile_md5": new.digest(Role.BIN, "md5").hex})
    fleet.wait_until(version="1.1", timeout_s=60)
    fleet.kill("agent-1")
    fleet.wait_until(version="1.1", timeout_s=30)
