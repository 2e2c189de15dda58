"""``confinfer onboard run`` as confinfer-onboard.service runs it, a process per boot, with
``onboard_hardware = "testbed"``: the real stand-ins (``python -m testbed onboard``, their own
processes), a recording ``systemctl`` on PATH whose ``reboot`` sends the caller the shutdown's
SIGTERM, sd_notify on a real socket, and a boot-id file the test changes between boots."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed import onboard as standins

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
CONFINFER = ROOT / ".venv" / "bin" / "confinfer"

FAKE_SYSTEMCTL = r"""
import json, os, signal, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_SYSTEMCTL_LOG"], "a") as log:
    log.write(json.dumps(args) + "\n")
enabled = os.environ["FAKE_SYSTEMCTL_ENABLED"]
if args == ["is-enabled", "confinfer.target"]:
    print("enabled" if os.path.exists(enabled) else "disabled")
    sys.exit(0 if os.path.exists(enabled) else 1)
if args[:1] == ["enable"]:
    open(enabled, "w").close()
elif args == ["reboot"]:
    # systemd stops every service: SIGTERM to onboarding, before or after systemctl returns.
    if os.environ.get("FAKE_SYSTEMCTL_TERM") == "later":
        quiet = subprocess.DEVNULL  # so that the caller's wait for systemctl ends at once
        subprocess.Popen(["sh", "-c", f"sleep 0.5; kill -TERM {os.getppid()}"],
                         stdin=quiet, stdout=quiet, stderr=quiet)
    else:
        os.kill(os.getppid(), signal.SIGTERM)
"""


# dockerd's answer for the serving image: present (the image a machine builder loaded).
FAKE_DOCKER = r"""
import sys
image = ["confinfer/vllm-openai:serving"]
if sys.argv[1:4] == ["image", "inspect", "--format"] and sys.argv[5:] == image:
    print("sha256:" + "0" * 64)
    sys.exit(0)
sys.exit(f"fake docker: unexpected {sys.argv[1:]}")
"""


class Bed:
    def __init__(self, tmp: Path, short: Path) -> None:
        self.state_dir = tmp / "state"
        self.boot_file = tmp / "boot_id"
        self.boots: list[str] = []
        self.new_boot()
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        systemctl = bin_dir / "systemctl"
        systemctl.write_text(f"#!{sys.executable}\n{FAKE_SYSTEMCTL}")
        systemctl.chmod(0o755)
        docker = bin_dir / "docker"
        docker.write_text(f"#!{sys.executable}\n{FAKE_DOCKER}")
        docker.chmod(0o755)
        self.systemctl_log = tmp / "systemctl.log"
        self.notify_path = short / "notify"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.setblocking(False)
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "CONFINFER_ONBOARD_HARDWARE": "testbed",
            "NOTIFY_SOCKET": str(self.notify_path),
            "FAKE_SYSTEMCTL_LOG": str(self.systemctl_log),
            "FAKE_SYSTEMCTL_ENABLED": str(tmp / "enabled"),
        }

    def new_boot(self) -> None:
        self.boots.append(str(uuid.uuid4()))
        self.boot_file.write_text(self.boots[-1] + "\n")

    def confinfer(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(CONFINFER), *args],
            capture_output=True, text=True, timeout=120, check=False, env={**self.env, **env},
        )  # fmt: skip

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return self.confinfer(
            "onboard", "run", "--state-dir", str(self.state_dir),
            "--boot-id-file", str(self.boot_file), *args, **env,
        )  # fmt: skip

    def standin(self, *words: str) -> None:
        subprocess.run(
            [sys.executable, "-m", "testbed", "onboard", "--dir", str(self.state_dir / "testbed"),
             "--boot-id-file", str(self.boot_file), *words],
            check=True, timeout=60, capture_output=True,
        )  # fmt: skip

    def notified(self) -> list[str]:
        messages = []
        while True:
            try:
                messages.append(self.notify.recv(65536).decode())
            except BlockingIOError:
                return messages

    def systemctl(self) -> list[list[str]]:
        if not self.systemctl_log.exists():
            return []
        return [json.loads(line) for line in self.systemctl_log.read_text().splitlines()]

    def state(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads((self.state_dir / "onboard.json").read_text())
        return loaded

    def statuses(self) -> dict[str, str]:
        return {s["name"]: s["status"] for s in self.state()["stages"]}

    def log(self) -> list[dict[str, Any]]:
        return standins.entries(self.state_dir / "testbed")


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Bed]:
    with tempfile.TemporaryDirectory(prefix="ob-", dir="/tmp") as short:
        made = Bed(tmp_path, Path(short))
        yield made
        made.notify.close()


@pytest.mark.parametrize("term", ["at-once", "later"])
def test_three_boots_from_a_stock_machine_to_the_appliance(bed: Bed, term: str) -> None:
    done = bed.run(FAKE_SYSTEMCTL_TERM=term)
    assert done.returncode == 0, done.stderr
    assert bed.statuses()["kernel"] == "rebooting"
    assert bed.systemctl() == [["reboot"]]
    assert "STATUS=onboarding 1/6 kernel: upgraded, rebooting" in bed.notified()

    bed.new_boot()
    done = bed.run(FAKE_SYSTEMCTL_TERM=term)
    assert done.returncode == 0, done.stderr
    assert bed.statuses()["driver"] == "rebooting"
    assert "STATUS=onboarding 2/6 driver: installed, rebooting" in bed.notified()

    bed.new_boot()
    done = bed.run()
    assert done.returncode == 0, done.stderr
    assert set(bed.statuses().values()) == {"done"}
    assert bed.systemctl() == [
        ["reboot"],
        ["reboot"],
        ["is-enabled", "confinfer.target"],  # the check: not yet
        ["start", "docker.service"],  # the serving image is looked up in dockerd
        ["enable", "--now", "--no-block", "confinfer.target"],
        ["is-enabled", "confinfer.target"],  # the check: in effect
    ]
    assert bed.notified()[-1] == (
        "READY=1\nSTATUS=onboarding done: 6/6 stages; the appliance starts (confinfer.target)"
    )
    applies = Counter(e["stage"] for e in bed.log() if e["op"] == "apply")
    assert applies == dict.fromkeys(("kernel", "driver", "gpu-tools", "container-toolkit"), 1)
    assert [e for e in bed.log() if e.get("violation")] == []
    assert not [line for line in done.stderr.splitlines() if line.startswith("<3>")]

    shown = bed.confinfer("onboard", "status", "--state-dir", str(bed.state_dir))
    assert shown.returncode == 0
    assert shown.stdout.splitlines()[0] == "onboarding: done: 6/6 stages"
    # A later boot only says so, and runs nothing.
    bed.new_boot()
    calls, seen = len(bed.systemctl()), len(bed.log())
    assert bed.run().returncode == 0
    assert (len(bed.systemctl()), len(bed.log())) == (calls, seen)


def test_a_failed_stage_is_one_line_with_its_reason_and_exit_code(bed: Bed) -> None:
    bed.standin("set", "cc=off")
    assert bed.run().returncode == 0
    bed.new_boot()
    assert bed.run().returncode == 0
    bed.new_boot()
    done = bed.run()
    assert done.returncode == 77
    errors = [line for line in done.stderr.splitlines() if line.startswith("confinfer: ")]
    assert errors == [
        "confinfer: gpu-cc-off: nvidia-smi conf-compute -f printed CC status: OFF, not "
        "'CC status: ON'"
    ]
    assert bed.notified()[-1].startswith("STATUS=onboarding 3/6 cc-mode: failed (gpu-cc-off): ")
    assert bed.statuses()["cc-mode"] == "failed"

    shown = bed.confinfer("onboard", "status", "--state-dir", str(bed.state_dir))
    assert shown.returncode == 1
    assert "  3 cc-mode           failed    " in shown.stdout
    status = bed.confinfer(
        "status", "--socket", str(bed.state_dir / "absent.sock"), "--format", "json",
        "--onboard-state", str(bed.state_dir / "onboard.json"),
    )  # fmt: skip
    assert status.returncode == 1
    assert json.loads(status.stdout)["onboarding"]["state"] == "failed"

    # The next boot: the same line, nothing asked of the machine, no reboot.
    bed.new_boot()
    seen = len(bed.log())
    again = bed.run()
    assert again.returncode == 77
    assert "hint: mend the cause, then run `confinfer onboard run --retry`" in again.stderr
    assert len(bed.log()) == seen
    assert bed.systemctl().count(["reboot"]) == 2
    # Mended (here: the stand-in's CC mode), --retry goes on to the end.
    bed.standin("set", "cc=on")
    done = bed.run("--retry")
    assert done.returncode == 0, done.stderr
    assert set(bed.statuses().values()) == {"done"}


def test_onboarding_in_progress_is_what_status_shows_while_attestd_is_not_up(bed: Bed) -> None:
    bed.run()
    status = bed.confinfer(
        "status", "--socket", str(bed.state_dir / "absent.sock"),
        "--onboard-state", str(bed.state_dir / "onboard.json"),
    )  # fmt: skip
    assert status.returncode == 2
    assert status.stdout.splitlines()[0] == "onboarding: 1/6 kernel: upgraded, rebooting"
    assert status.stderr == ""
