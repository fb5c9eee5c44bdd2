"""Hostile input changes nothing: hbs never answers 500 or loses state; agents refuse tricks."""

from __future__ import annotations

import contextlib
import json
import re
import socket
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

import selfupgrade
from selfupgrade import (
    Artifact,
    Digest,
    Heartbeat,
    Layout,
    OrderRejected,
    Release,
    Role,
    TripleInstaller,
    UnsafePath,
    Updater,
    UpdaterConfig,
    UpgradeOrder,
    parse_version,
)
from selfupgrade.server import ControlPlane, MemoryStore, task_from_seed
from selfupgrade.server.app import AppConfig, create_app
from selfupgrade.server.plan import Plan
from selfupgrade.server.rollouts import rollout_from_json
from selfupgrade.server.tasks import TaskLimits
from selfupgrade.testing import TOY_FILES, ArtifactServer, FakeRestarter, FakeTransport, toy_release

from .fleet import Hbs

# ---- property-based: schemathesis against hbs's own OpenAPI ------------------------------------

FUZZED = create_app(ControlPlane(MemoryStore()), AppConfig(loopback_admin_only=False))
schema = schemathesis.openapi.from_asgi("/selfupgrade/v1/openapi.json", FUZZED)
schema.config.generation.update(
    modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
    allow_x00=True,
)


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_the_schema_allows_or_forbids_gets_a_500(case: Any) -> None:
    """Positive and negative examples for every operation (admin routes opened to reach the
    validation behind them); bounded to 40 examples per operation."""
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, response.text[:300])


# ---- property-based: every parser raises only ValueError ------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=30,
)
FIELDS = st.sampled_from(
    [
        "host",
        "version",
        "state",
        "error",
        "task_id",
        "failed_version",
        "labels",
        "files",
        "confirmed",
        "failures",
        "artifacts",
        "allow_downgrade",
        "manifest",
        "rollback",
        "wgeturl",
        "binfile_md5",
        "cfgfile_md5",
        "type",
        "waves",
        "selector",
        "window",
        "plan",
        "release",
        "limits",
    ]
)
OBJECTS = st.dictionaries(FIELDS, JSON, max_size=8) | JSON
PARSERS = {
    "heartbeat": Heartbeat.from_wire,
    "order": UpgradeOrder.from_wire,
    "plan": Plan.from_json,
    "seed": lambda d: task_from_seed(d, limits=TaskLimits(), now=0),
    "rollout": lambda d: rollout_from_json(d, TaskLimits(), 0),
}


@pytest.mark.parametrize("name", sorted(PARSERS))
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=OBJECTS)
def test_parsers_raise_only_value_errors(name: str, data: object) -> None:
    with contextlib.suppress(ValueError):  # FieldError, InvalidVersion, UnsafeURL, UnsafePath
        PARSERS[name](data)


# ---- a table of hostile requests: 4xx, and nothing changes ---------------------------------------

MD5 = "0" * 32
HOSTILE: list[tuple[str, str, bytes | str, int]] = [
    ("POST", "/agent/upgrade", "not json", 400),
    ("POST", "/agent/upgrade", "[]", 400),
    (
        "POST",
        "/agent/upgrade",
        json.dumps({"wgeturl": 5, "version": "1.0", "binfile_md5": MD5}),
        400,
    ),
    (
        "POST",
        "/agent/upgrade",
        json.dumps({"wgeturl": "file:///etc/passwd", "version": "1.0", "binfile_md5": MD5}),
        400,
    ),
    (
        "POST",
        "/agent/upgrade",
        json.dumps({"wgeturl": "ftp://h/x", "version": "1.0", "binfile_md5": MD5}),
        400,
    ),
    (
        "POST",
        "/agent/upgrade",
        json.dumps({"wgeturl": "http://h/x", "version": "../../etc/passwd", "binfile_md5": MD5}),
        400,
    ),
    (
        "POST",
        "/agent/upgrade",
        json.dumps({"wgeturl": "http://h/x", "version": "1.0\u0000", "binfile_md5": MD5}),
        400,
    ),
    (
        "POST",
        "/agent/upgrade",
        json.dumps({"wgeturl": "http://h/x", "version": "1.0", "type": {}, "binfile_md5": MD5}),
        400,
    ),
    (
        "POST",
        "/agent/upgrade",
        json.dumps({"wgeturl": "http://h/x", "version": "1.0", "type": "0", "binfile_md5": MD5}),
        400,
    ),
    (
        "POST",
        "/agent/upgrade",
        json.dumps({"wgeturl": "http://h/x", "version": "1.0", "binfile_md5": "nope"}),
        400,
    ),
    (
        "POST",
        "/agent/upgrade",
        json.dumps(
            {"wgeturl": "http://h/x", "version": "1.0", "binfile_md5": MD5, "pad": "x" * 100_000}
        ),
        413,
    ),
    ("PUT", "/agent/upgrade", "{}", 405),
    ("POST", "/selfupgrade/v1/heartbeat", "{", 400),
    ("POST", "/selfupgrade/v1/heartbeat", json.dumps({"host": "", "version": "1.0"}), 400),
    ("POST", "/selfupgrade/v1/heartbeat", json.dumps({"host": "h", "version": "../../x"}), 400),
    ("POST", "/selfupgrade/v1/heartbeat", json.dumps({"host": "h", "version": 1.0}), 400),
    (
        "POST",
        "/selfupgrade/v1/heartbeat",
        json.dumps({"host": "h", "version": "1.0", "state": "pwned"}),
        400,
    ),
    (
        "POST",
        "/selfupgrade/v1/heartbeat",
        json.dumps({"host": "h", "version": "1.0", "labels": {"k": 1}}),
        400,
    ),
    (
        "POST",
        "/selfupgrade/v1/heartbeat",
        json.dumps({"host": "h", "version": "1.0", "files": []}),
        400,
    ),
    ("POST", "/selfupgrade/v1/heartbeat", json.dumps({"host": "h\x00", "version": "1.0"}), 400),
    ("POST", "/selfupgrade/v1/heartbeat", b"\xff\xfe" * 100, 400),
    (
        "POST",
        "/selfupgrade/v1/rollouts",
        json.dumps({"plan": {"waves": [{"percent": 500}]}, "version": "1.0"}),
        400,
    ),
    (
        "POST",
        "/selfupgrade/v1/rollouts",
        json.dumps(
            {
                "plan": {"waves": [{"percent": 50}]},
                "release": {
                    "version": "1.0",
                    "artifacts": {"bin": {"url": "file:///bin/sh", "digest": "md5:" + MD5}},
                },
            }
        ),
        400,
    ),
    (
        "POST",
        "/selfupgrade/v1/rollouts",
        json.dumps({"plan": {"waves": [{"percent": 50}]}, "manifest": 7}),
        400,
    ),
    ("POST", "/selfupgrade/v1/rollouts/nope/pause", "", 404),
    ("POST", "/selfupgrade/v1/versions/bad", json.dumps({"version": "1.0/../x"}), 400),
]


def snapshot(c: TestClient) -> list[object]:
    return [
        c.get(p).json()
        for p in (
            "/agent/upgrade/nowargs",
            "/agentversions",
            "/selfupgrade/v1/rollouts",
            "/selfupgrade/v1/versions/bad",
        )
    ]


def test_a_malformed_manifest_is_refused_by_name() -> None:
    c = TestClient(
        create_app(ControlPlane(MemoryStore())),
        base_url="http://127.0.0.1:6031",
        client=("127.0.0.1", 5000),
    )
    body = {
        "plan": {"waves": [{"percent": 50}]},
        "manifest": 7,
        "wgeturl": "http://h/f",
        "version": "1.0",
        "binfile_md5": MD5,
    }
    reply = c.post("/selfupgrade/v1/rollouts", content=json.dumps(body))
    assert (reply.status_code, reply.json()["field"]) == (400, "manifest")


def test_hostile_requests_are_refused_and_change_nothing() -> None:
    c = TestClient(
        create_app(ControlPlane(MemoryStore())),
        base_url="http://127.0.0.1:6031",
        client=("127.0.0.1", 5000),
    )
    c.post("/selfupgrade/v1/heartbeat", content=json.dumps({"host": "h1", "version": "1.0"}))
    assert (
        c.post(
            "/agent/upgrade",
            content=json.dumps(
                {"wgeturl": "http://127.0.0.1:9/f", "version": "1.1", "binfile_md5": MD5}
            ),
        ).status_code
        == 200
    )
    before = snapshot(c)
    for method, path, body, status in HOSTILE:
        reply = c.request(method, path, content=body)
        assert reply.status_code == status, (method, path, body[:80], reply.text)
        assert reply.json()["msg"] == "error"
    assert snapshot(c) == before


# ---- header floods against a real hbs ------------------------------------------------------------


def raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        got = b""
        try:
            s.sendall(data)
            while chunk := s.recv(65536):
                got += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
        return got


def test_header_floods_are_refused_without_growing_memory(tmp_path: Path) -> None:
    with Hbs(f"sqlite:{tmp_path / 'hbs.db'}", tmp_path / "hbs.log") as hbs:
        assert hbs.proc is not None
        proc = psutil.Process(hbs.proc.pid)
        hbs.publish({"wgeturl": "http://127.0.0.1:9/f", "version": "1.1", "binfile_md5": MD5})
        before = httpx.get(f"{hbs.url}/agent/upgrade/nowargs").json()
        rss = proc.memory_info().rss
        big = raw(
            hbs.port,
            b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 50_000_000 + b"\r\n\r\n",
        )
        many = raw(
            hbs.port,
            b"GET /health HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-%d: y\r\n" % i for i in range(20_000))
            + b"\r\n",
        )
        assert big == b"" or big.startswith(b"HTTP/1.1 431")
        assert many.startswith(b"HTTP/1.1 431")
        assert proc.memory_info().rss - rss < 32 << 20  # 50 MB sent, far less kept
        assert httpx.get(f"{hbs.url}/health").text == "ok"
        assert httpx.get(f"{hbs.url}/agent/upgrade/nowargs").json() == before


# ---- the agent refuses path and symlink tricks ------------------------------------------------


def agent(tmp: Path, install: Path) -> Updater:
    return Updater(
        version="1.0",
        layout=Layout(install, TOY_FILES),
        transport=FakeTransport(),
        installer=TripleInstaller(tmp / "state"),
        restarter=FakeRestarter(),
        config=UpdaterConfig(host="h"),
    )


def receive(updater: Updater, wire: dict[str, Any]) -> None:
    """What an agent does with an order from the wire: parse it, then carry it out."""
    updater.upgrade(UpgradeOrder.from_wire(wire))


@pytest.mark.parametrize("target", ["../escape", "a/../../escape", "/etc/cron.d/x", "sub/../../x"])
def test_targets_outside_the_install_directory_are_refused(
    tmp_path: Path, artifact_server: ArtifactServer, target: str
) -> None:
    install = tmp_path / "opt"
    toy_release("1.0").install(install)
    url = artifact_server.add("x", b"payload")
    wire = {
        "version": "1.1",
        "artifacts": {"cfg": {"url": url, "digest": "sha256:" + "0" * 64, "target": target}},
    }
    with pytest.raises(OrderRejected):
        receive(agent(tmp_path, install), wire)
    assert artifact_server.requests == []  # refused before any download
    assert not (tmp_path / "escape").exists()


def test_symlink_tricks_are_refused(tmp_path: Path, artifact_server: ArtifactServer) -> None:
    install = tmp_path / "opt"
    toy_release("1.0").install(install)
    outside = tmp_path / "outside"
    outside.mkdir()
    (install / "link-dir").symlink_to(outside)  # a directory inside that points outside
    (install / "link-file").symlink_to(tmp_path / "victim")
    layout = Layout(install, TOY_FILES)
    url = artifact_server.add("x", b"payload")
    digest = Digest("sha256", "0" * 64)
    with pytest.raises(UnsafePath, match="outside"):
        layout.resolve(Artifact(Role.CFG, url, digest, target="link-dir/cfg.json"))
    with pytest.raises(UnsafePath, match="symlink"):
        layout.resolve(Artifact(Role.CFG, url, digest, target="link-file"))
    (install / "toy.json").unlink()
    (install / "toy.json").symlink_to(tmp_path / "victim")  # the configured file is a link
    with pytest.raises(UnsafePath, match="symlink"):
        layout.resolve(Artifact(Role.CFG, url, digest))
    with pytest.raises(OrderRejected):
        agent(tmp_path, install).upgrade(
            UpgradeOrder(
                Release(
                    parse_version("1.1"), (Artifact(Role.CFG, url, digest, target="link-dir/x"),)
                )
            )
        )
    assert list(outside.iterdir()) == [] and not (tmp_path / "victim").exists()


# ---- least privilege: the updater never shells out -----------------------------------------------


def test_the_package_never_runs_a_shell() -> None:
    root = Path(selfupgrade.__file__).parent
    shell = re.compile(
        r"shell\s*=\s*True|os\.system\(|os\.popen\(|getoutput\(|getstatusoutput\(|pty\.spawn\("
    )
    offenders = [
        f"{p.relative_to(root)}:{i}"
        for p in root.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if shell.search(line)
    ]
    assert offenders == []
