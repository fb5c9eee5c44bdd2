"""One daemon upgrades itself from 1.0 to 1.1 against servers on 127.0.0.1, step by step.

    python -m examples.single_daemon

It starts an artifact server and a control server on free ports, installs toy 1.0 in a
temporary directory, runs it under a systemd-like restart harness (through the guard), publishes
1.1, and prints what the daemon reports until 1.1 has confirmed its health. Then it stops
everything it started and exits 0 (1 if the upgrade did not happen in time).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from selfupgrade import Role, TripleInstaller
from selfupgrade.guard import guard_command
from selfupgrade.testing import ArtifactServer, ControlServer, ServiceHarness, toy_release


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def main(timeout_s: float = 60.0) -> int:
    old = toy_release("1.0", config={"interval_s": 0.5})
    new = toy_release("1.1", config={"interval_s": 0.5})
    with (
        tempfile.TemporaryDirectory(prefix="selfupgrade-demo-") as tmp,
        ArtifactServer() as arts,
        ControlServer() as hbs,
    ):
        root = Path(tmp)
        install, state = root / "opt" / "toyd", root / "state"
        old.install(install)
        say(f"installed toyd 1.0 in {install}")
        for role in Role:
            arts.add(new.artifact_name(role), new.files[role])
        say(f"artifact server {arts.base_url} serves bin_1.1, cfg_1.1, service_1.1")
        say(f"control server {hbs.url}")
        cmd = guard_command(state, [str(install / "toyd")])
        env = {"TOY_HOST": "demo-host", "TOY_HBS": hbs.url, "TOY_STATE_DIR": str(state)}
        with ServiceHarness(cmd, env=env, log_path=root / "toyd.log") as svc:
            svc.wait_for_notification("READY=1", timeout_s=timeout_s)
            say(f"toyd started under the restart harness, pid {svc.pid}, said READY=1")
            hbs.wait_for_version("demo-host", "1.0", timeout_s=timeout_s)
            say("heartbeat: demo-host runs 1.0")
            order = new.order(arts.base_url, algorithm="md5", task_id="demo")
            hbs.publish(order)
            say("published: upgrade to 1.1 (md5 digests, as the falcon protocol sends them)")
            seen: set[tuple[str, str]] = set()
            deadline = time.monotonic() + timeout_s
            done = False
            while time.monotonic() < deadline and not done:
                beat = hbs.latest("demo-host")
                if beat is not None and (str(beat.version), beat.state.value) not in seen:
                    seen.add((str(beat.version), beat.state.value))
                    extra = f" ({beat.error})" if beat.error else ""
                    say(
                        f"heartbeat: {beat.version} {beat.state.value}"
                        f"{'' if beat.confirmed else ' (on trial)'}{extra}"
                    )
                done = beat is not None and str(beat.version) == "1.1" and beat.confirmed
                time.sleep(0.05)
            for n in svc.notifications:
                say(f"sd_notify from pid {n.pid}: {n.message.replace(chr(10), ' ')}")
            status = TripleInstaller(state).status()
            say(
                f"installer: current {status.current_version}, previous "
                f"{status.previous_version}, last result "
                f"{status.last_result.outcome if status.last_result else '-'}"
            )
            say(f"stopping toyd (pid {svc.pid}) and the servers")
        if not done:
            print((root / "toyd.log").read_text(), file=sys.stderr)
            say("FAILED: 1.1 did not confirm in time")
            return 1
        say("done: toyd upgraded itself from 1.0 to 1.1")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
