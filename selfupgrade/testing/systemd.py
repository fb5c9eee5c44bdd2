"""A real systemd for tests: PID 1 of its own pid, mount, uts and cgroup namespaces.

:class:`Systemd` boots the machine's own ``/lib/systemd/systemd`` (0.1-0.2 s) and drives it with
``nsenter ... systemctl``: install a unit, start, stop, restart it, read ``MainPID``,
``NRestarts``, ``ActiveState``, ``Result`` and its journal. The rules it keeps, which protect
every other process of the machine:

* it runs in a cgroup2 sub-cgroup of its own, entered before ``unshare --cgroup``, so systemd
  sees that directory as the whole cgroup tree (started in the root cgroup, a system manager
  moves the machine's other processes into its ``init.scope``);
* only a curated unit path is visible (a few stock targets and journald), so no boot-time unit
  (tmpfiles, sysctl, udev) runs against the machine's shared file systems;
* ``/sys`` and ``/proc/sys`` are read-only inside; ``/run``, ``/dev``, ``/etc/systemd/system``
  and the journal are private tmpfs;
* never ``systemd-nspawn``.

It stops with ``systemctl exit 0``; if that does not end it, ``unshare`` is SIGKILLed (its
``--kill-child`` takes the whole pid namespace with it), by PID; then the empty cgroups are
removed, deepest first. If the test process dies, ``PR_SET_PDEATHSIG`` tears it down too.
Everything else (the root file system, the network) is the machine's: units see the same files
and 127.0.0.1, except ``/tmp`` under ``PrivateTmp=`` and ``/run``.

Needs root, ``unshare``/``nsenter`` (util-linux), systemd and a writable cgroup2 mount;
:func:`unavailable` says which is missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from ._base import Managed

__all__ = ["Systemd", "unavailable"]

SYSTEMD = Path("/lib/systemd/systemd")
STOCK_UNITS = Path("/lib/systemd/system")
_CURATED = (
    "basic.target",
    "sysinit.target",
    "sockets.target",
    "timers.target",
    "paths.target",
    "slices.target",
    "local-fs.target",
    "local-fs-pre.target",
    "network.target",
    "network-pre.target",
    "network-online.target",
    "multi-user.target",
    "shutdown.target",
    "umount.target",
    "final.target",
    "exit.target",
    "systemd-exit.service",
    "systemd-journald.service",
    "systemd-journald.socket",
)

# PID 1 of the new namespaces until it execs systemd: private mounts, read-only /sys.
_INNER = r"""#!/bin/sh
set -e
W="$1"
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -o remount,bind,ro /sys
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
mount -t tmpfs -o mode=755 tmpfs /etc/systemd/system
if [ -d /var/log/journal ]; then mount -t tmpfs -o mode=755 tmpfs /var/log/journal; fi
mount -t tmpfs -o mode=755,nosuid tmpfs /dev
for spec in "null 1 3" "zero 1 5" "full 1 7" "random 1 8" "urandom 1 9" "tty 5 0"; do
  set -- $spec; mknod -m 666 "/dev/$1" c "$2" "$3"
done
mkdir /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts /dev/pts
ln -s pts/ptmx /dev/ptmx
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
ln -s /proc/self/fd /dev/fd
touch /dev/console
mount --bind "$W/console" /dev/console
exec env -i container=selfupgrade-test PATH=/usr/sbin:/usr/bin:/sbin:/bin \
  SYSTEMD_UNIT_PATH="/etc/systemd/system:$W/units" \
  SYSTEMD_GENERATOR_PATH="$W/empty" SYSTEMD_ENVIRONMENT_GENERATOR_PATH="$W/empty" \
  /lib/systemd/systemd --unit=multi-user.target --log-level=info --show-status=no
"""

_CGROUP_PREFIX = "selfupgrade-sd-"


def _cgroup2_mount() -> Path | None:
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return Path(fields[1])
    return None


def unavailable() -> str:
    """Why a real systemd cannot run here (``""``: it can)."""
    if os.geteuid() != 0:
        return "needs root (namespaces and mounts)"
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install util-linux)"
    if not SYSTEMD.exists() or shutil.which("systemctl") is None:
        return "needs systemd (apt-get install systemd)"
    cgroup2 = _cgroup2_mount()
    if cgroup2 is None or not os.access(cgroup2, os.W_OK):
        return "needs a writable cgroup2 mount"
    return ""


class Systemd(Managed):
    """A real systemd in namespaces; see the module docstring.

    Attributes:
        pid: systemd's PID on the host (``None`` until started).
        workdir: its units, console log and helper files.
    """

    def __init__(self, boot_timeout_s: float = 30.0) -> None:
        self._boot_timeout_s = boot_timeout_s
        self.pid: int | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix="selfupgrade-systemd-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._cgroup: Path | None = None
        self._console_fd: int | None = None

    # ---- life ---------------------------------------------------------------------------

    def start(self) -> Systemd:
        """Boot systemd and wait until it is running.

        Raises:
            RuntimeError: it cannot run here (see :func:`unavailable`) or did not boot.
        """
        why = unavailable()
        if why:
            raise RuntimeError(f"a real systemd cannot run here: {why}")
        cgroup2 = _cgroup2_mount()
        assert cgroup2 is not None
        _remove_stale_cgroups(cgroup2)
        w = self.workdir
        os.chmod(w, 0o755)  # noqa: S103 - systemd's units and helpers are read from here
        for d in ("units/sysinit.target.wants", "units/sockets.target.wants", "empty"):
            (w / d).mkdir(parents=True)
        for name in _CURATED:
            shutil.copy(STOCK_UNITS / name, w / "units" / name)
        for wants, name in (
            ("sysinit.target.wants", "systemd-journald.service"),
            ("sockets.target.wants", "systemd-journald.socket"),
        ):
            (w / "units" / wants / name).symlink_to(f"../{name}")
        (w / "inner.sh").write_text(_INNER)
        os.mkfifo(w / "console")
        # PID 1 opens /dev/console for writing and blocks until the FIFO has a reader
        self._console_fd = os.open(w / "console", os.O_RDWR)
        threading.Thread(target=self._drain_console, daemon=True).start()
        self._cgroup = cgroup2 / f"{_CGROUP_PREFIX}{os.getpid()}-{id(self):x}"
        self._cgroup.mkdir()
        procs = str(self._cgroup / "cgroup.procs")

        def enter() -> None:  # in the child, before unshare: our cgroup, die with the test
            with open(procs, "w") as f:
                f.write("0")
            ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL

        with open(w / "outer.log", "wb") as log:
            self._proc = subprocess.Popen(
                [
                    _tool("unshare"),
                    "--pid",
                    "--fork",
                    "--kill-child",
                    "--mount",
                    "--uts",
                    "--cgroup",
                    "--mount-proc",
                    "--propagation",
                    "private",
                    "/bin/sh",
                    str(w / "inner.sh"),
                    str(w),
                ],
                preexec_fn=enter,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            self._wait_until_running()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_running(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self._boot_timeout_s
        while self.pid is None:
            if self._proc.poll() is not None:
                raise RuntimeError(f"unshare exited: {(self.workdir / 'outer.log').read_text()}")
            children = Path(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children")
            with_pid = children.read_text().split() if children.exists() else []
            if with_pid and Path(f"/proc/{with_pid[0]}/comm").read_text().strip() == "systemd":
                self.pid = int(with_pid[0])
            elif time.monotonic() > deadline:
                raise RuntimeError("systemd was never exec'd in the namespaces")
            else:
                time.sleep(0.005)
        while self.systemctl("is-system-running").stdout.strip() not in ("running", "degraded"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"systemd did not reach running; see {self.workdir}")
            time.sleep(0.01)

    def _drain_console(self) -> None:
        fd = self._console_fd
        with open(self.workdir / "console.log", "ab", buffering=0) as out:
            while fd is not None:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    return
                if not data:
                    return
                out.write(data)

    def stop(self) -> None:
        """``systemctl exit 0``; SIGKILL ``unshare`` by PID if systemd does not end; remove
        the cgroups and the work directory."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            if self.pid is not None:
                self.systemctl("exit", "0", timeout_s=10)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()  # --kill-child: systemd, and the whole pid namespace, die with it
                proc.wait(10)
        self._proc = None
        if self._cgroup is not None and self._cgroup.exists():
            _remove_tree(self._cgroup)
        if self._console_fd is not None:
            os.close(self._console_fd)
            self._console_fd = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- driving it ----------------------------------------------------------------------

    def systemctl(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        """``systemctl ARGS`` inside (in both its mount and pid namespaces)."""
        return self.run_inside(["systemctl", *args], timeout_s=timeout_s)

    def run_inside(
        self, argv: list[str], *, timeout_s: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in systemd's mount and pid namespaces; its completed process."""
        assert self.pid is not None, "not started"
        return subprocess.run(
            [_tool("nsenter"), "-t", str(self.pid), "-m", "-p", *argv],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def install_unit(self, name: str, text: str, *, dropins: Mapping[str, str] = {}) -> None:
        """Write unit ``name`` (and drop-ins ``{file: text}``) into the private
        ``/etc/systemd/system`` and reload."""
        etc = Path(f"/proc/{self.pid}/root/etc/systemd/system")
        (etc / name).write_text(text)
        if dropins:
            (etc / f"{name}.d").mkdir(exist_ok=True)
            for file, body in dropins.items():
                (etc / f"{name}.d" / file).write_text(body)
        done = self.systemctl("daemon-reload")
        if done.returncode != 0:
            raise RuntimeError(f"daemon-reload failed: {done.stderr}")

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show -p PROPS UNIT`` as a dict."""
        out = self.systemctl("show", "-p", ",".join(props), unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def state(self, unit: str) -> dict[str, str]:
        """``MainPID``, ``NRestarts``, ``ActiveState``, ``SubState``, ``Result``, ``StatusText``."""
        return self.show(
            unit, "MainPID", "NRestarts", "ActiveState", "SubState", "Result", "StatusText"
        )

    def wait_for(
        self,
        unit: str,
        predicate: Callable[[dict[str, str]], bool],
        timeout_s: float = 60,
        what: str = "",
    ) -> dict[str, str]:
        """Poll :meth:`state` until ``predicate(state)``; return it.

        Raises:
            TimeoutError: with the last state and the unit's journal.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.state(unit)
            if predicate(state):
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{unit}: {what or 'condition'} not met in {timeout_s} s; last {state}\n"
                    f"{self.journal(unit)[-3000:]}"
                )
            time.sleep(0.05)

    def journal(self, unit: str) -> str:
        """The unit's journal, as text."""
        return self.run_inside(["journalctl", "-u", unit, "-o", "cat", "--no-pager"]).stdout

    def watch_notifications(self) -> None:
        """Have systemd log every ``sd_notify`` message it gets (its debug log level), for
        :meth:`notifications`."""
        done = self.run_inside(["systemd-analyze", "set-log-level", "debug"])
        if done.returncode != 0:
            raise RuntimeError(f"systemd-analyze set-log-level debug failed: {done.stderr}")

    def notifications(self, unit: str) -> list[tuple[int, str]]:
        """``(pid, message)`` of each notification systemd got for ``unit`` since
        :meth:`watch_notifications`, as it logged them (``"STOPPING=1, STATUS=..."``: the
        message's lines joined by commas); PIDs are the namespace's."""
        found = []
        for line in self.journal(unit).splitlines():
            match = re.search(r"Got notification message from PID (\d+) \((.*)\)$", line)
            if match:
                found.append((int(match.group(1)), match.group(2)))
        return found

    def host_pid(self, pid_inside: str | int) -> int | None:
        """The host PID of the process systemd calls ``pid_inside`` (its ``MainPID``)."""
        namespace = os.readlink(f"/proc/{self.pid}/ns/pid")
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(entry / "ns" / "pid") != namespace:
                    continue
                for line in (entry / "status").read_text().splitlines():
                    if line.startswith("NSpid:") and line.split()[-1] == str(pid_inside):
                        return int(entry.name)
            except OSError:
                continue
        return None


def _tool(name: str) -> str:
    """The full path of a util-linux tool (:func:`unavailable` checked it is there)."""
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed (apt-get install util-linux)")
    return path


def _remove_tree(cgroup: Path) -> None:
    """Remove an (empty) cgroup tree, deepest first."""
    for directory, _, _ in sorted(os.walk(cgroup), key=lambda entry: -len(entry[0])):
        try:
            os.rmdir(directory)
        except OSError:
            time.sleep(0.1)
            os.rmdir(directory)


def _remove_stale_cgroups(cgroup2: Path) -> None:
    """Remove the empty cgroups of harnesses whose test process died."""
    for entry in cgroup2.iterdir():
        if entry.name.startswith(_CGROUP_PREFIX):
            owner = entry.name[len(_CGROUP_PREFIX) :].split("-", 1)[0]
            if owner.isdigit() and not Path(f"/proc/{owner}").exists():
                with contextlib.suppress(OSError):
                    _remove_tree(entry)
