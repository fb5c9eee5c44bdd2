"""Web pages against hbs's admin routes (issue 11, point 1): a real Chromium, a real hbs.

A page on another origin, opened in headless Chromium on the hbs host, tries to publish an
upgrade the ways a page can without asking the server first (``fetch`` in ``no-cors`` mode
with ``text/plain`` or the form content type, a form with ``enctype="text/plain"``), and
again from a name that the browser resolves to 127.0.0.1 (what DNS rebinding achieves). The
artifact is real and its md5 right (the page picks both), so only the admin routes' browser
checks stand between the page and the fleet.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

import httpx

from selfupgrade.testing import ArtifactServer

from .fleet import Hbs
from .test_e2e_rollouts import browse

EVIL = "6.6.6"


def attack_page(target: str, body: dict[str, str]) -> str:
    text = json.dumps(body)
    # a text/plain form sends "name=value" unencoded: name and value are chosen so that the
    # whole body is the JSON text
    name, value = text[:-2] + '"', text[-2:]
    return f"""<!doctype html><html><body>
<form id="f" method="POST" action="{target}" enctype="text/plain" target="sink">
  <input name='{name}' value='{value}'></form>
<iframe name="sink"></iframe>
<script>
const body = {json.dumps(text)};
fetch("{target}", {{method: "POST", mode: "no-cors",
  headers: {{"Content-Type": "text/plain"}}, body}});
fetch("{target}", {{method: "POST", mode: "no-cors",
  headers: {{"Content-Type": "application/x-www-form-urlencoded"}}, body}});
document.getElementById("f").submit();
</script></body></html>"""


class _Page(http.server.BaseHTTPRequestHandler):
    html = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(self.html)))
        self.end_headers()
        self.wfile.write(self.html)

    def log_message(self, *args: object) -> None:
        pass


def test_a_web_page_cannot_publish_an_upgrade(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    evil_bytes = b"#!/bin/sh\necho owned\n"
    artifact_server.add(f"evil/bin_{EVIL}", evil_bytes)
    body = {
        "wgeturl": artifact_server.url("evil"),
        "version": EVIL,
        "binfile_md5": hashlib.md5(evil_bytes).hexdigest(),
    }
    with Hbs(f"sqlite:{tmp_path / 'hbs.db'}", tmp_path / "hbs.log") as hbs:
        page = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
        port = page.server_address[1]
        served = threading.Thread(target=page.serve_forever, daemon=True)
        served.start()
        try:
            # another origin (another port), then a name the browser maps to 127.0.0.1
            _Page.html = attack_page(f"{hbs.url}/agent/upgrade", body).encode()
            browse(f"http://127.0.0.1:{port}/", tmp_path)
            rebound = hbs.url.replace("127.0.0.1", "evil.example")
            _Page.html = attack_page(f"{rebound}/agent/upgrade", body).encode()
            browse(
                f"http://evil.example:{port}/",
                tmp_path,
                flags=("--host-resolver-rules=MAP evil.example 127.0.0.1",),
            )
        finally:
            page.shutdown()
            page.server_close()
            served.join(10)
        refusals = hbs.log().count("refused POST /agent/upgrade")
        status = hbs.status()
        print(f"page attempts refused by hbs: {refusals}; task after the pages: {status['task']}")
        assert status["task"] is None, status["task"]
        assert refusals >= 4  # three from the other origin, at least one after "rebinding"
        assert "Origin 'http://127.0.0.1:" in hbs.log()
        assert "Host 'evil.example:" in hbs.log()

        # the same bytes from curl's side of things: accepted, as the article's commands are
        direct = httpx.post(f"{hbs.url}/agent/upgrade", content=json.dumps(body), timeout=30)
        assert direct.status_code == 200, direct.text


def test_admin_routes_refuse_what_a_page_sends_and_take_what_curl_sends(tmp_path: Path) -> None:
    with Hbs(f"sqlite:{tmp_path / 'hbs.db'}", tmp_path / "hbs.log", no_artifact_check=True) as hbs:
        seed = json.dumps(
            {"wgeturl": "http://127.0.0.1:9/f", "version": "1.1", "binfile_md5": "0" * 32}
        )
        cases = {
            "Host evil.example": ({"Host": "evil.example"}, 403),
            "Origin of another port": ({"Origin": "http://127.0.0.1:1"}, 403),
            "Origin null": ({"Origin": "null"}, 403),
            "Sec-Fetch-Site cross-site": ({"Sec-Fetch-Site": "cross-site"}, 403),
            "text/plain": ({"Content-Type": "text/plain"}, 415),
            "multipart": ({"Content-Type": "multipart/form-data; boundary=x"}, 415),
            "curl -d (form type)": ({"Content-Type": "application/x-www-form-urlencoded"}, 200),
            "JSON from its own origin": (
                {"Content-Type": "application/json", "Origin": hbs.url},
                200,
            ),
            "Host localhost": ({"Host": f"localhost:{hbs.port}"}, 200),
        }
        for what, (headers, expected) in cases.items():
            reply = httpx.post(f"{hbs.url}/agent/upgrade", content=seed, headers=headers)
            print(f"{what}: {reply.status_code} {reply.json().get('error', '')}")
            assert reply.status_code == expected, (what, reply.text)
        assert (
            httpx.get(f"{hbs.url}/agentversions", headers={"Origin": "http://x"}).status_code == 200
        )
