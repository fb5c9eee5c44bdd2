"""Authenticated control: loopback admin routes, scoped tokens, agent tokens, TLS."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import trustme
from starlette.testclient import TestClient

from selfupgrade import Heartbeat, HttpSettings, HttpTransport, TransportError, parse_version
from selfupgrade.server import ControlPlane, MemoryStore
from selfupgrade.server.app import AppConfig, create_app
from selfupgrade.server.falcon_rpc import serve_falcon_rpc
from selfupgrade.testing import free_port, stop_pid
from selfupgrade.transport import FalconRpcTransport

from .fleet import Hbs

SEED = {"wgeturl": "http://127.0.0.1:9/f", "version": "1.1", "binfile_md5": "0" * 32}


def client(config: AppConfig, host: str = "127.0.0.1") -> TestClient:
    return TestClient(
        create_app(ControlPlane(MemoryStore()), config),
        base_url="http://127.0.0.1:6031",
        client=(host, 5000),
    )


@pytest.mark.parametrize(
    ("host", "headers", "status"),
    [
        ("127.0.0.1", {}, 200),
        ("127.8.9.10", {}, 200),
        ("::1", {}, 200),
        ("::ffff:127.0.0.1", {}, 200),
        ("10.1.2.3", {}, 403),
        ("::ffff:10.1.2.3", {}, 403),
        ("fe80::1", {}, 403),
        ("127.0.0.1", {"X-Forwarded-For": "203.0.113.9"}, 403),
        ("127.0.0.1", {"X-Real-IP": "203.0.113.9"}, 403),
        ("127.0.0.1", {"Forwarded": "for=203.0.113.9"}, 403),
    ],
)
def test_admin_routes_answer_only_local_callers(
    host: str, headers: dict[str, str], status: int
) -> None:
    c = client(AppConfig(), host)
    assert c.post("/agent/upgrade", content=json.dumps(SEED), headers=headers).status_code == status
    assert c.delete("/agent/upgrade", headers=headers).status_code == status
    assert c.get("/agentversions", headers=headers).status_code == 200  # reads stay open


@pytest.mark.parametrize(
    ("peer", "headers", "status"),
    [
        ("10.0.0.5", {"X-Forwarded-For": "127.0.0.1"}, 200),  # a local caller via the proxy
        ("10.0.0.5", {"X-Real-IP": "::1"}, 200),
        ("10.0.0.5", {"X-Forwarded-For": "203.0.113.9"}, 403),  # a remote caller via it
        # the caller's own claim first, what the proxy saw last: the last counts
        ("10.0.0.5", {"X-Forwarded-For": "127.0.0.1, 203.0.113.9"}, 403),
        ("10.0.0.5", {}, 403),  # through the proxy without saying who: unknown
        ("10.0.0.6", {"X-Forwarded-For": "127.0.0.1"}, 403),  # not a trusted proxy
        ("127.0.0.1", {}, 200),  # a direct local caller
    ],
)
def test_trusted_proxies_name_the_caller(peer: str, headers: dict[str, str], status: int) -> None:
    c = client(AppConfig(trusted_proxies=frozenset({"10.0.0.5"})), peer)
    reply = c.post("/agent/upgrade", content=json.dumps(SEED), headers=headers)
    assert reply.status_code == status, reply.text


def test_scoped_tokens() -> None:
    c = client(AppConfig(tokens={"r-token": "read", "w-token": "write"}, protect_reads=True))

    def post(token: str | None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return c.post("/agent/upgrade", content=json.dumps(SEED), headers=headers)

    assert post(None).status_code == 401
    assert post("nope").status_code == 401
    assert post("w-token-").status_code == 401
    assert post("r-token").status_code == 403
    assert post("w-token").status_code == 200
    assert c.get("/selfupgrade/v1/status").status_code == 401
    assert c.get("/metrics").status_code == 401
    assert (
        c.get("/selfupgrade/v1/status", headers={"Authorization": "Bearer r-token"}).status_code
        == 200
    )
    assert (
        c.get("/selfupgrade/v1/rollouts", headers={"Authorization": "Bearer w-token"}).status_code
        == 200
    )
    assert c.get("/health").status_code == 200


def test_the_admin_token_is_a_write_token() -> None:
    c = client(AppConfig(admin_token="s3cret"))
    assert c.post("/agent/upgrade", content=json.dumps(SEED)).status_code == 401
    ok = c.post(
        "/agent/upgrade", content=json.dumps(SEED), headers={"Authorization": "Bearer s3cret"}
    )
    assert ok.status_code == 200
    assert c.get("/agent/upgrade/nowargs").status_code == 200  # reads open unless protected


def beat(host: str) -> str:
    return json.dumps(Heartbeat(host=host, version=parse_version("1.0")).to_wire())


def test_heartbeats_with_a_shared_token() -> None:
    c = client(AppConfig(agent_token="fleet"))
    assert c.post("/selfupgrade/v1/heartbeat", content=beat("a")).status_code == 401
    auth = {"Authorization": "Bearer fleet"}
    assert c.post("/selfupgrade/v1/heartbeat", content=beat("a"), headers=auth).status_code == 200


def test_heartbeats_with_per_host_tokens() -> None:
    c = client(AppConfig(agent_tokens={"a": "token-a", "b": "token-b"}))
    a = {"Authorization": "Bearer token-a"}
    assert c.post("/selfupgrade/v1/heartbeat", content=beat("a"), headers=a).status_code == 200
    assert c.post("/selfupgrade/v1/heartbeat", content=beat("b"), headers=a).status_code == 401
    assert c.post("/selfupgrade/v1/heartbeat", content=beat("c"), headers=a).status_code == 401
    assert c.get("/agentversions").json()["data"] == {"a": "1.0"}  # refused beats count for nothing


def test_rpc_heartbeats_need_the_token_when_configured() -> None:
    plane = ControlPlane(MemoryStore())
    config = AppConfig(agent_tokens={"a": "token-a"})

    async def main() -> tuple[object, object]:
        server = await serve_falcon_rpc(plane, "127.0.0.1", 0, token_for=config.agent_token_for)
        port = server.sockets[0].getsockname()[1]
        try:

            def call(token: str | None) -> object:
                t = FalconRpcTransport(f"127.0.0.1:{port}", timeout_s=2, token=token)
                try:
                    return t.call(
                        "Agent.ReportStatus",
                        {
                            "Hostname": "a",
                            "AgentVersion": "1.0",
                            **({"Token": token} if token else {}),
                        },
                    )
                finally:
                    t.close()

            return await asyncio.to_thread(call, None), await asyncio.to_thread(call, "token-a")
        finally:
            server.close()
            await server.wait_closed()

    without, with_token = asyncio.run(main())
    assert without == {"code": 1, "Args": None}
    assert with_token == {"code": 0, "Args": None}
    assert plane.views.versions() == {"a": "1.0"}


# ---- real processes ------------------------------------------------------------------------


def nginx_binary() -> str:
    path = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )
    if path is None:
        if os.environ.get("SELFUPGRADE_REQUIRE_NGINX") == "1":
            pytest.fail("nginx is required (SELFUPGRADE_REQUIRE_NGINX=1) but not installed")
        pytest.skip("nginx is not installed (Debian: apt-get install nginx)")
    return path


def test_a_proxy_on_localhost_does_not_make_a_remote_caller_local(tmp_path: Path) -> None:
    """A real nginx on 127.0.0.1 in front of a real hbs: through it, admin routes are refused."""
    nginx = nginx_binary()
    # SEED's URL serves nothing: the artifact check is not what this test is about
    with Hbs(f"sqlite:{tmp_path / 'hbs.db'}", tmp_path / "hbs.log", no_artifact_check=True) as hbs:
        port = free_port()
        conf = tmp_path / "nginx.conf"
        conf.write_text(f"""
worker_processes 1;
daemon off;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/nginx-error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy;
  fastcgi_temp_path {tmp_path}/fcgi; uwsgi_temp_path {tmp_path}/uwsgi;
  scgi_temp_path {tmp_path}/scgi;
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://127.0.0.1:{hbs.port};
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    }}
  }}
}}
""")
        proc = subprocess.Popen(
            [nginx, "-c", str(conf), "-p", str(tmp_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        pytest.fail((tmp_path / "nginx-error.log").read_text())
                    time.sleep(0.05)
            via_proxy = httpx.post(
                f"http://127.0.0.1:{port}/agent/upgrade", content=json.dumps(SEED)
            )
            assert via_proxy.status_code == 403
            assert "only local callers" in via_proxy.json()["error"]
            assert httpx.get(f"http://127.0.0.1:{port}/agentversions").status_code == 200
            assert hbs.publish(SEED).status_code == 200  # directly, from this host: allowed
        finally:
            stop_pid(proc.pid)


def test_tls_with_a_pinned_ca(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path, ca_path = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))

    hbs = Hbs(
        f"sqlite:{tmp_path / 'hbs.db'}", tmp_path / "hbs.log", tls_cert=cert_path, tls_key=key_path
    )
    with hbs:
        url = f"https://127.0.0.1:{hbs.port}/selfupgrade/v1/heartbeat"
        b = Heartbeat(host="tls-host", version=parse_version("1.0"))
        pinned = HttpTransport(
            url, settings=HttpSettings(verify=str(ca_path), heartbeat_attempts=1)
        )
        assert pinned.heartbeat(b) is None
        for verify in (True, str(other)):
            t = HttpTransport(url, settings=HttpSettings(verify=verify, heartbeat_attempts=1))
            with pytest.raises(
                TransportError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"
            ):
                t.heartbeat(b)
        plain = HttpTransport(
            url.replace("https", "http"), settings=HttpSettings(heartbeat_attempts=1)
        )
        with pytest.raises(TransportError):
            plain.heartbeat(b)
        assert httpx.get(
            f"https://127.0.0.1:{hbs.port}/agentversions",
            verify=ssl.create_default_context(cafile=str(ca_path)),
        ).json()["data"] == {"tls-host": "1.0"}
