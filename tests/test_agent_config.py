"""The example agent's configuration: a partial cfg.json is completed from the defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from examples.falcon_agent.agent import load_config

SHIPPED = Path(__file__).resolve().parent.parent / "examples" / "falcon_agent" / "cfg.json"


def _keys(d: dict[str, object], prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict) and k != "labels":
            out |= _keys(v, prefix + k + ".")
    return out


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HOSTNAME", "HBS", "TOKEN", "STATE_DIR", "RESTARTER", "PROGRAM", "LABELS", "HTTP"):
        monkeypatch.delenv(f"FALCON_AGENT_{name}", raising=False)


def test_an_empty_cfg_gets_every_key_of_the_shipped_one(tmp_path: Path) -> None:
    (tmp_path / "cfg.json").write_text("{}")
    cfg = load_config(tmp_path / "cfg.json")
    assert _keys(json.loads(SHIPPED.read_text())) <= _keys(cfg)


def test_a_partial_section_keeps_the_defaults_of_its_other_keys(tmp_path: Path) -> None:
    (tmp_path / "cfg.json").write_text('{"heartbeat": {"interval": 5}, "http": {"enabled": false}}')
    cfg = load_config(tmp_path / "cfg.json")
    assert cfg["heartbeat"]["interval"] == 5
    assert cfg["heartbeat"]["token"] == "" and cfg["heartbeat"]["transport"] == "http"
    assert cfg["trust"]["keys"] == [] and cfg["http"]["listen"] == "127.0.0.1:1988"
