"""The system-test harness itself: a machine boots real systemd from the cached rootfs, runs the
project's venv unchanged, shares the host's network, keeps the cache pristine, and leaves
nothing behind whether it stops cleanly or is killed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.system.conftest import MachineFactory
from tests.system.machine import Machine, MachineError, project_binds, wait_for

pytestmark = [pytest.mark.system, pytest.mark.timeout(300)]

SMOKE_UNIT = """\
[Unit]
Description=harness smoke unit

[Service]
Type=notify
NotifyAccess=all
ExecStart=/bin/sh -c 'echo smoke-started; \\
    systemd-notify --ready --status="smoke: up"; exec sleep infinity'
"""


@pytest.fixture(scope="module")
def machine(machine_factory: MachineFactory, repo: Path) -> Machine:
    return machine_factory(
        "smoke", binds=project_binds(repo), files={"/etc/confinfer-smoke": "seeded\n"}
    )


def test_boots_systemd_as_pid_1(machine: Machine) -> None:
    assert machine.system_state in ("running", "degraded"), machine.failed_units
    assert machine.failed_units == [], machine.journal(lines=80)
    assert machine.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    assert machine.run(["hostname"]).stdout.strip() == machine.name
    # its own cgroup in every hierarchy, so two machines never share a scope
    cgroup = Path(f"/proc/{machine.leader}/cgroup").read_text()
    assert all(f"/t-{machine.name}/" in line for line in cgroup.splitlines() if "::" in line)
    for directory in machine.cgroups:
        assert directory.is_dir()


def test_units_can_be_installed_and_observed(machine: Machine) -> None:
    unit = machine.install_unit(SMOKE_UNIT, "smoke.service")
    machine.systemctl("start", unit)
    props = machine.unit_properties(unit, "ActiveState", "StatusText", "Type")
    assert props == {"ActiveState": "active", "StatusText": "smoke: up", "Type": "notify"}
    machine.wait_for(lambda: "smoke-started" in machine.journal(unit), 10, what="the journal")
    machine.install_drop_in(unit, "[Service]\nEnvironment=SMOKE=1\n")
    assert machine.unit_property(unit, "Environment") == "SMOKE=1"
    machine.systemctl("stop", unit)
    assert machine.wait_for_property(unit, "ActiveState", "inactive", 10) == "inactive"


def test_commands_get_a_clean_environment(machine: Machine) -> None:
    os.environ["CONFINFER_HARNESS_PROBE"] = "leak"
    try:
        env = machine.run(["env"]).stdout
    finally:
        del os.environ["CONFINFER_HARNESS_PROBE"]
    assert "CONFINFER_HARNESS_PROBE" not in env
    with pytest.raises(MachineError, match="exited 3"):
        machine.run(["sh", "-c", "echo nope >&2; exit 3"])
    assert machine.run(["sh", "-c", "exit 3"], check=False).returncode == 3


def test_project_venv_runs_inside(machine: Machine, repo: Path) -> None:
    code = (
        "import ctypes, sys, cryptography, aiohttp, tpm2_pytss, confinfer, attestd, testbed;"
        "ctypes.CDLL('libtss2-tcti-swtpm.so.0'); ctypes.CDLL('libtss2-tcti-device.so.0');"
        "print(sys.prefix)"
    )
    out = machine.run([str(repo / ".venv/bin/python"), "-c", code]).stdout
    assert out.strip() == str(repo / ".venv")
    # the checkout is bound read-only
    probe = machine.run(["touch", str(repo / ".machine-probe")], check=False)
    assert probe.returncode != 0 and "Read-only file system" in probe.stderr
    assert not (repo / ".machine-probe").exists()


def test_shares_the_host_network(machine: Machine) -> None:
    assert os.readlink(f"/proc/{machine.leader}/ns/net") == os.readlink("/proc/self/ns/net")
    assert os.readlink(f"/proc/{machine.leader}/ns/pid") != os.readlink("/proc/self/ns/pid")
    # nothing in the rootfs configures the host's interfaces
    assert machine.unit_property("systemd-networkd.service", "LoadState") == "masked"


def test_overlay_keeps_the_cache_pristine(machine: Machine, rootfs: Path) -> None:
    assert machine.run(["cat", "/etc/confinfer-smoke"]).stdout == "seeded\n"
    machine.write_file("/etc/confinfer-written", "inside\n")
    assert machine.path("/etc/confinfer-written").read_text() == "inside\n"
    assert (machine.upper / "etc/confinfer-written").is_file()
    assert not (rootfs / "etc/confinfer-written").exists()
    assert not (rootfs / "etc/confinfer-smoke").exists()
    ids = machine.run(["cat", "/etc/machine-id"]).stdout.strip()
    assert len(ids) == 32 and (rootfs / "etc/machine-id").read_text() == ""


def test_a_second_machine_runs_alongside_and_a_kill_leaves_nothing(
    machine: Machine, rootfs: Path, tmp_path: Path
) -> None:
    other = Machine.boot("second", rootfs, tmp_path=tmp_path, files={"/etc/hidden": None})
    try:
        assert machine.running and other.running
        assert other.name != machine.name
        assert (
            other.run(["cat", "/etc/machine-id"]).stdout
            != machine.run(["cat", "/etc/machine-id"]).stdout
        )
        other.run(["systemd-run", "--unit=sleeper", "sleep", "600"])
        assert other.unit_property("sleeper.service", "ActiveState") == "active"
    finally:
        # no time to stop cleanly: the machine's cgroup is killed as a whole
        other.shutdown(timeout=0)
    assert not other.running
    assert other.leftovers() == []
    assert machine.running and machine.run(["true"]).returncode == 0


def test_a_reboot_inside_comes_back_with_its_files_and_a_new_boot(
    rootfs: Path, tmp_path: Path
) -> None:
    with Machine.boot("reboot", rootfs, tmp_path=tmp_path) as machine:
        first = machine.run(["cat", "/proc/sys/kernel/random/boot_id"]).stdout
        machine.write_file("/var/lib/kept", "written before the reboot\n")
        machine.run(["systemctl", "reboot", "--no-block"])
        machine.await_reboot(60)
        assert machine.reboots == 1
        assert machine.run(["cat", "/proc/sys/kernel/random/boot_id"]).stdout != first
        assert machine.run(["cat", "/var/lib/kept"]).stdout == "written before the reboot\n"
        assert "reboot" not in machine.failed_units
    assert machine.leftovers() == []


def test_wait_for_is_bounded() -> None:
    calls: list[int] = []
    with pytest.raises(MachineError, match=r"timed out after 0\.3 s waiting for nothing"):
        wait_for(lambda: calls.append(1), 0.3, what="nothing", interval=0.05)
    assert 3 <= len(calls) <= 10
