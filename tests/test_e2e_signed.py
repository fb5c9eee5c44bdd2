"""End to end: real falcon agents that trust a release key, upgraded through a real hbs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from examples.falcon_agent.build import build
from selfupgrade.testing import ArtifactServer
from selfupgrade.verify.signature import (
    generate_key,
    load_private_key,
    manifest_for_directory,
    sign_manifest,
)

from .fleet import AGENT_CFG, NEW, OLD, Fleet, Hbs, serve_release, wait_until

pytestmark = pytest.mark.real
PLAN = {"waves": [{"name": "all", "percent": 100, "max_in_flight": 2}]}


def test_agents_that_trust_a_key_install_only_signed_releases(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    private, public = generate_key()
    (tmp_path / "release.pub").write_bytes(public)
    trust = {
        "keys": [str(tmp_path / "release.pub")],
        "threshold": 1,
        "product": "falcon-agent",
        "platform": "linux-x86_64",
    }
    config = {**AGENT_CFG, "trust": trust, "failure_backoff_s": 2}
    new = build(NEW, config=config)
    wgeturl = serve_release(artifact_server, new)
    new.write(tmp_path / "files")
    signed = manifest_for_directory(
        tmp_path / "files",
        version=NEW,
        product="falcon-agent",
        platform="linux-x86_64",
        expires=time.time() + 3600,
    )
    manifest = json.loads(sign_manifest(signed, [load_private_key(private)]))
    body = {
        "wgeturl": wgeturl,
        "version": NEW,
        "binfile_md5": new.bin_md5,
        "cfgfile_md5": new.cfg_md5,
        "type": 2,
        "plan": PLAN,
    }

    with (
        Hbs(f"sqlite:{tmp_path / 'hbs.db'}", tmp_path / "hbs.log", max_attempts=1) as hbs,
        Fleet(tmp_path, 3, [hbs.url], old=build(OLD, config=config)) as fleet,
    ):
        wait_until("3 agents on 6.0.0", lambda: list(hbs.versions().values()).count(OLD) == 3)
        unsigned = hbs.start_rollout(body)["task"]["id"]
        wait_until(
            "the unsigned rollout to halt",
            lambda: hbs.rollout(unsigned)["status"] == "halted",
            60,
            hbs.log,
        )
        detail = hbs.rollout(unsigned)
        assert "no signed manifest" in detail["halt_reason"]
        assert all(fleet.program(n) == fleet.old.program for n in fleet.names)

        signed_id = hbs.start_rollout({**body, "manifest": manifest})["task"]["id"]
        wait_until(
            "the signed rollout",
            lambda: hbs.rollout(signed_id)["status"] == "complete",
            90,
            hbs.log,
        )
        assert all(fleet.program(n) == new.program for n in fleet.names)
        assert list(hbs.versions().values()).count(NEW) == 3
