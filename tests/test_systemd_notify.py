"""The sd_notify helpers deliver real datagrams to $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from selfupgrade.restart import notify_ready, notify_status, notify_watchdog, watchdog_interval_s


def test_helpers_send_datagrams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    try:
        notify_ready("up")
        notify_watchdog()
        notify_status("busy")
        got = [sock.recv(4096).decode() for _ in range(3)]
    finally:
        sock.close()
    assert got == ["READY=1\nSTATUS=up", "WATCHDOG=1", "STATUS=busy"]


def test_helpers_are_silent_without_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notify_ready()
    notify_watchdog()


def test_watchdog_interval_is_half_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval_s() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert watchdog_interval_s() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval_s() is None
