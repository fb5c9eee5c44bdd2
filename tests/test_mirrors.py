"""Issue 15, point 1 (the agent's side and hbs's check): an artifact with mirrors.

Real HTTP servers on 127.0.0.1 (selfupgrade.testing.ArtifactServer, one per mirror, each with
its fault) and the real HttpFetcher: one address with nothing listening, one server that sends
other bytes, one that drops the connection midway every time, one that serves.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from selfupgrade import Role
from selfupgrade._download import Fetched, download_artifact
from selfupgrade.errors import DigestMismatch, DownloadError
from selfupgrade.models import Artifact, Digest, Release, UpgradeOrder, parse_version
from selfupgrade.server.artifacts import ArtifactCheck, ArtifactUnavailable
from selfupgrade.testing import ArtifactServer, free_port
from selfupgrade.testing.artifact_server import Fault
from selfupgrade.transport.http import HttpFetcher
from selfupgrade.verify.digest import DigestVerifier

DATA = bytes(range(256)) * 4096  # 1 MiB


def artifact(urls: list[str], data: bytes = DATA) -> Artifact:
    return Artifact(
        Role.BIN,
        urls[0],
        Digest("sha256", hashlib.sha256(data).hexdigest()),
        size=len(data),
        mirrors=tuple(urls[1:]),
    )


def fetch(art: Artifact, dest: Path) -> Fetched:
    return download_artifact(
        art, dest, fetcher=HttpFetcher(), verifier=DigestVerifier(), max_bytes=1 << 30, timeout_s=60
    )


@pytest.fixture
def mirrors() -> Iterator[list[ArtifactServer]]:
    servers = [ArtifactServer() for _ in range(3)]
    for server in servers:
        server.start()
    yield servers
    for server in servers:
        server.stop()


def test_a_down_a_lying_and_a_dropping_mirror_then_the_file(
    tmp_path: Path, mirrors: list[ArtifactServer]
) -> None:
    liar, dropper, good = mirrors
    down = f"http://127.0.0.1:{free_port()}/bin"
    urls = [
        down,
        liar.add("bin", DATA, fault=Fault(wrong_bytes=True)),
        dropper.add("bin", DATA, fault=Fault(drop_after=100_000, drop_times=1000)),
        good.add("bin", DATA),
    ]
    fetched = fetch(artifact(urls), tmp_path / "staged")
    assert (tmp_path / "staged").read_bytes() == DATA
    assert fetched.url == urls[3] and fetched.resumed_from == (urls[2],)
    resumed = [r for r in good.requests if r.path == "/bin"]
    print(f"{fetched}; the good mirror was asked {[(r.range, r.status) for r in resumed]}")
    # the dropping mirror gave the first part (its own resumptions included); the good one
    # was asked only for the rest
    assert len(resumed) == 1 and resumed[0].status == 206
    start = int(resumed[0].range.removeprefix("bytes=").rstrip("-"))  # type: ignore[union-attr]
    assert 100_000 <= start < len(DATA)


def test_bytes_that_fail_the_digest_are_thrown_away_before_the_next_mirror(
    tmp_path: Path, mirrors: list[ArtifactServer]
) -> None:
    liar, good, _ = mirrors
    urls = [liar.add("bin", DATA, fault=Fault(wrong_bytes=True)), good.add("bin", DATA)]
    fetched = fetch(artifact(urls), tmp_path / "staged")
    assert fetched.url == urls[1] and fetched.resumed_from == ()
    assert [r.range for r in good.requests] == [None]  # the whole file, not a Range
    assert (tmp_path / "staged").read_bytes() == DATA


def test_when_every_mirror_fails_the_error_names_each_and_nothing_is_left(
    tmp_path: Path, mirrors: list[ArtifactServer]
) -> None:
    missing, dropper, _ = mirrors
    urls = [
        f"http://127.0.0.1:{free_port()}/bin",
        missing.add("bin", DATA, fault=Fault(status=404)),
        dropper.add("bin", DATA, fault=Fault(drop_after=10_000, drop_times=1000)),
    ]
    with pytest.raises(DownloadError) as failed:
        fetch(artifact(urls), tmp_path / "staged")
    print(failed.value)
    assert all(url in str(failed.value) for url in urls)
    assert not (tmp_path / "staged").exists()


def test_the_last_mirror_lying_is_a_digest_mismatch(
    tmp_path: Path, mirrors: list[ArtifactServer]
) -> None:
    missing, liar, _ = mirrors
    urls = [
        missing.add("bin", DATA, fault=Fault(status=503)),
        liar.add("bin", DATA, fault=Fault(wrong_bytes=True)),
    ]
    with pytest.raises(DigestMismatch):
        fetch(artifact(urls), tmp_path / "staged")
    assert not (tmp_path / "staged").exists()


def test_mirrors_travel_in_the_order_and_bad_ones_are_refused() -> None:
    art = artifact(["http://a.example/bin", "https://b.example/bin", "http://c.example/bin"])
    order = UpgradeOrder(release=Release(parse_version("1.1"), (art,)))
    wire = order.to_wire()
    assert wire["artifacts"]["bin"]["mirrors"] == ["https://b.example/bin", "http://c.example/bin"]
    assert UpgradeOrder.from_wire(wire).release.artifacts[0].urls == art.urls
    for bad, says in (
        (["file:///etc/passwd"], "only http and https"),
        ("http://b.example/bin", "must be a list"),
        ([f"http://m{i}.example/bin" for i in range(17)], "at most 16"),
    ):
        wire["artifacts"]["bin"]["mirrors"] = bad
        with pytest.raises(ValueError, match=says):
            UpgradeOrder.from_wire(wire)
    plain = UpgradeOrder(release=Release(parse_version("1.1"), (artifact(["http://a/b"]),)))
    assert "mirrors" not in plain.to_wire()["artifacts"]["bin"]  # the seed's shape


def test_hbs_checks_every_mirror_before_a_publish(mirrors: list[ArtifactServer]) -> None:
    good, liar, _ = mirrors
    check = ArtifactCheck(deadline_s=10)
    fine = artifact([good.add("bin", DATA), liar.add("ok", DATA)])
    check.check(Release(parse_version("1.1"), (fine,)))
    bad_url = liar.add("bin", DATA, fault=Fault(wrong_bytes=True))
    with pytest.raises(ArtifactUnavailable) as refused:
        check.check(Release(parse_version("1.1"), (artifact([good.url("bin"), bad_url]),)))
    print(refused.value)
    assert bad_url in str(refused.value)


# ---- hbs: a mirror per site, by the hosts' labels ------------------------------------------


def _served_release(origin: ArtifactServer) -> tuple[str, dict[str, object]]:
    """Release 1.1 with its program served by ``origin``: the URL and the rollout's release."""
    url = origin.add("bin_1.1", DATA)
    digest = str(artifact([url]).digest)
    return url, {"version": "1.1", "artifacts": {"bin": {"url": url, "digest": digest}}}


def _order_for(hbs_url: str, host: str, labels: dict[str, str]) -> dict[str, object]:
    beat = {"host": host, "version": "1.0", "labels": labels}
    reply = httpx.post(f"{hbs_url}/selfupgrade/v1/heartbeat", json=beat, timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()["order"]  # type: ignore[no-any-return]


@pytest.mark.real
def test_hbs_gives_each_site_its_mirror_first_and_checks_every_one(
    tmp_path: Path, mirrors: list[ArtifactServer]
) -> None:
    """A real hbs (``python -m selfupgrade.server``): the rollout's plan says that hosts of
    dc=bj fetch from the bj mirror first; a host of dc=bj gets that URL first and the
    release's after it, any other host the release's own. A plan whose mirror serves other
    bytes is refused at publish, naming it, and nothing is published."""
    from examples.fleet import Hbs

    origin, bj, liar = mirrors
    url, release = _served_release(origin)
    bj_url = bj.add("bin_1.1", DATA)
    plan = {
        "waves": [{"name": "all", "percent": 100, "max_in_flight": 10}],
        "mirrors": [{"match": {"dc": "bj"}, "artifacts": {"bin": [bj_url]}}],
    }
    with Hbs(f"sqlite:{tmp_path / 'hbs.db'}", tmp_path / "hbs.log", probation_s=0) as hbs:
        for host, labels in (("bj-1", {"dc": "bj"}), ("sh-1", {"dc": "sh"})):
            _order_for(hbs.url, host, labels)  # known before the rollout
        bad_plan = {
            **plan,
            "mirrors": [
                {
                    "match": {"dc": "bj"},
                    "artifacts": {
                        "bin": [liar.add("bin_1.1", DATA, fault=Fault(wrong_bytes=True))]
                    },
                }
            ],
        }
        refused = httpx.post(
            f"{hbs.url}/selfupgrade/v1/rollouts",
            json={"release": release, "plan": bad_plan},
            timeout=30,
        )
        print(refused.status_code, refused.text[:300])
        assert refused.status_code == 400 and liar.url("bin_1.1") in refused.text
        assert refused.json()["field"] == "plan.mirrors[0]"
        assert hbs.status()["task"] is None
        hbs.start_rollout({"release": release, "plan": plan})
        bj_order = _order_for(hbs.url, "bj-1", {"dc": "bj"})
        sh_order = _order_for(hbs.url, "sh-1", {"dc": "sh"})
        restarting = {
            "host": "bj-1",
            "version": "1.0",
            "labels": {"dc": "bj"},
            "state": "restarting",
            "task_id": bj_order["task_id"],
            "served_by": {"bin": bj_url},
        }
        httpx.post(f"{hbs.url}/selfupgrade/v1/heartbeat", json=restarting, timeout=10)
        said = wait_for_line(hbs.log_path, "bj-1 restarts into 1.1")
    bj_bin = bj_order["artifacts"]["bin"]  # type: ignore[index]
    sh_bin = sh_order["artifacts"]["bin"]  # type: ignore[index]
    print(f"bj-1 gets {bj_bin['url']} then {bj_bin.get('mirrors')}; sh-1 gets {sh_bin['url']}")
    assert (bj_bin["url"], bj_bin["mirrors"]) == (bj_url, [url])
    assert sh_bin["url"] == url and "mirrors" not in sh_bin
    assert f"fetched bin from {bj_url}" in said, said


@pytest.mark.real
def test_a_rule_that_names_a_wave_applies_from_that_wave_on(
    tmp_path: Path, mirrors: list[ArtifactServer]
) -> None:
    """Issue 15, point 1, per wave: the canary fetches from the origin, and once the rollout
    is on the wave "all", its hosts get the mirror seeded for it first (a real hbs)."""
    from examples.fleet import Hbs

    origin, seeded, _ = mirrors
    url, release = _served_release(origin)
    seeded_url = seeded.add("bin_1.1", DATA)
    plan = {
        "waves": [
            {"name": "canary", "hosts": 1, "max_in_flight": 1, "bake_s": 0},
            {"name": "all", "percent": 100, "max_in_flight": 10},
        ],
        "mirrors": [{"wave": "all", "artifacts": {"bin": [seeded_url]}}],
    }
    hosts = ["h-1", "h-2"]
    with Hbs(f"sqlite:{tmp_path / 'hbs.db'}", tmp_path / "hbs.log", probation_s=0) as hbs:
        for host in hosts:
            _order_for(hbs.url, host, {})
        hbs.start_rollout({"release": release, "plan": plan})
        orders = {host: _order_for(hbs.url, host, {}) for host in hosts}
        canary = next(h for h, order in orders.items() if order)
        other = next(h for h in hosts if h != canary)
        task_id = orders[canary]["task_id"]
        done = {"host": canary, "version": "1.1", "task_id": task_id, "confirmed": True}
        reply = httpx.post(f"{hbs.url}/selfupgrade/v1/heartbeat", json=done, timeout=10)
        assert reply.status_code == 200, reply.text
        deadline = time.monotonic() + 10
        later: dict[str, object] | None = None
        while later is None and time.monotonic() < deadline:
            later = _order_for(hbs.url, other, {})
            time.sleep(0.1)
    canary_bin = orders[canary]["artifacts"]["bin"]  # type: ignore[index]
    assert later is not None, "the second wave never started"
    later_bin = later["artifacts"]["bin"]  # type: ignore[index]
    print(f"canary {canary} gets {canary_bin['url']}; {other}, in 'all', {later_bin['url']}")
    assert canary_bin["url"] == url and "mirrors" not in canary_bin
    assert (later_bin["url"], later_bin["mirrors"]) == (seeded_url, [url])


def wait_for_line(path: Path, text: str, timeout_s: float = 10) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = [x for x in path.read_text().splitlines() if text in x] if path.exists() else []
        if lines:
            return lines[-1]
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in {path}")


def test_a_plan_with_a_bad_mirror_rule_names_the_field() -> None:
    from selfupgrade.server._fields import FieldError
    from selfupgrade.server.plan import Plan

    waves = [{"name": "all", "percent": 100}]
    for rules, field_name in (
        ([{"match": {}, "artifacts": {"bin": ["http://m/b"]}}], "plan.mirrors[0].match"),
        ([{"match": {"dc": "bj"}, "artifacts": {"exe": ["http://m/b"]}}], "artifacts.exe"),
        ([{"match": {"dc": "bj"}, "artifacts": {"bin": ["ftp://m/b"]}}], "artifacts.bin"),
        ([{"match": {"dc": "bj"}, "artifacts": {}}], "plan.mirrors[0].artifacts"),
        ("http://m/b", "plan.mirrors"),
    ):
        with pytest.raises(FieldError) as refused:
            Plan.from_json({"waves": waves, "mirrors": rules})
        assert field_name in refused.value.field, (field_name, refused.value.field)
    plan = Plan.from_json(
        {"waves": waves, "mirrors": [{"match": {"dc": "bj"}, "artifacts": {"bin": ["http://m/b"]}}]}
    )
    assert Plan.from_json(plan.to_json()) == plan
    assert plan.mirror_rule({"dc": "bj", "rack": "1"}) == 0 and plan.mirror_rule({}) is None
    with pytest.raises(FieldError) as refused:
        Plan.from_json(
            {"waves": waves, "mirrors": [{"wave": "later", "artifacts": {"bin": ["http://m/b"]}}]}
        )
    assert refused.value.field == "plan.mirrors[0].wave" and "'all'" in str(refused.value)


def test_a_rule_that_names_a_wave_is_chosen_only_on_that_wave() -> None:
    from selfupgrade.server.plan import Plan

    plan = Plan.from_json(
        {
            "waves": [{"name": "canary", "hosts": 1}, {"name": "all", "percent": 100}],
            "mirrors": [
                {"match": {"dc": "bj"}, "wave": "all", "artifacts": {"bin": ["http://bj/b"]}},
                {"wave": "all", "artifacts": {"bin": ["http://seeded/b"]}},
                {"match": {"dc": "bj"}, "artifacts": {"bin": ["http://bj-origin/b"]}},
            ],
        }
    )
    assert Plan.from_json(plan.to_json()) == plan
    assert [plan.mirror_rule({"dc": "bj"}, w) for w in (0, 1, None)] == [2, 0, 2]
    assert [plan.mirror_rule({}, w) for w in (0, 1)] == [None, 1]


def test_the_operators_guide_example_is_a_valid_rollout() -> None:
    """The guide's JSON, read as hbs reads a rollout: the dc=sh host gets its own mirror."""
    import json
    import re

    from selfupgrade.server.rollouts import rollout_from_json
    from selfupgrade.server.tasks import TaskLimits

    guide = (Path(__file__).resolve().parent.parent / "docs" / "operators-guide.md").read_text()
    section = guide.split("## Mirrors", 1)[1].split("\n## ", 1)[0]
    body = json.loads(re.search(r"```json\n(.*?)```", section, re.S).group(1))  # type: ignore[union-attr]
    body["release"]["artifacts"]["bin"]["digest"] = "sha256:" + "0" * 64  # its "..." filled
    task = rollout_from_json(body, TaskLimits(), now=0.0)
    rule = task.effective_plan.mirror_rule({"dc": "sh"})
    assert task.order(rule).release.artifacts[0].urls == (
        "http://files.sh/bin_6.0.1",
        "http://files/bin_6.0.1",
    )
