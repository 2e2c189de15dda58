"""attestd under real systemd: systemd/attestd.service, as shipped, in a booted machine.

The testbed runs on the host (its services on loopback, swtpm too); the machine shares the
host's network and has the checkout and the testbed directory bound at their own paths. A
drop-in points the unit at the checkout's venv and the testbed and shortens the watchdog; it
relaxes only what the test layout needs (each line says why). Then:

- the unit passes ``systemd-analyze verify`` inside the rootfs, and its
  ``systemd-analyze security`` exposure stays at or under :data:`MAX_EXPOSURE`;
- ``Type=notify``: the unit stays ``activating`` while the first full pass is slowed (the
  stand-in nvattest waits on its RIM service), and becomes ``active`` once it passes;
- ``StatusText`` is the daemon's STATUS= line and agrees with ``GET /v1/health``;
- a hung NVML (the fake GPU's ``stall_ms``) stops the watchdog pings: systemd kills and
  restarts attestd; with the GPU answering again it comes back healthy;
- ``systemctl stop`` ends it cleanly (exit 0) and removes the socket.

Measured (systemd 252, bookworm): ``systemd-analyze security attestd.service`` rates the
production unit 2.3 OK (docs/operator-guide.md §6).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.env import read_env_file
from tests.integration.conftest import RunningTestbed, run_cli, start_testbed
from tests.system.conftest import MachineFactory
from tests.system.machine import Bind, Machine, project_binds

pytestmark = [pytest.mark.system, pytest.mark.timeout(300)]

UNIT = "attestd.service"
UNIT_FILE = Path(__file__).resolve().parents[2] / "systemd" / UNIT
SOCKET = "/run/attestd/attestd.sock"
ENV_FILE = "/etc/confinfer/testbed.env"
WATCHDOG_S = 3
FAST_CHECK_S = 0.5
RIM_LATENCY_S = 6
MAX_EXPOSURE = 3.0
START_TIMEOUT_S = 150.0


def environment_file(values: dict[str, str]) -> str:
    """``KEY="value"`` lines as systemd's EnvironmentFile= reads them (testbed.env itself is
    shell: ``export K='v'``)."""
    lines = []
    for key, value in values.items():
        if "\n" in value or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"cannot write {key}={value!r} as an environment file line")
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'{key}="{escaped}"')
    return "\n".join(lines) + "\n"


def drop_in(repo: Path, testbed_dir: Path, binds: list[Bind]) -> str:
    lines = [
        "[Service]",
        "# The checkout's venv stands in for the appliance's /opt/confinfer.",
        "ExecStart=",
        f"ExecStart={repo / '.venv/bin/attestd'}",
        "# The testbed's URLs, TCTI, fake NVML and stand-in nvattest (from testbed.env).",
        f"EnvironmentFile={ENV_FILE}",
        f"Environment=CONFINFER_GPU_FAST_CHECK_S={FAST_CHECK_S:g}",
        f"WatchdogSec={WATCHDOG_S}",
        "# The testbed lives under the host's /tmp, bound in: a private /tmp would hide it.",
        "PrivateTmp=no",
        "# The fake GPU keeps its ready state in a file there (a real one: in the driver), and",
        "# the stand-in nvattest logs there.",
        f"ReadWritePaths={testbed_dir}",
        "# A watchdog kill is SIGABRT; the host's core_pattern is not the machine's own.",
        "LimitCORE=0",
    ]
    homes = [b.source for b in binds if b.source.parts[1:2] in (("root",), ("home",))]
    if homes:
        lines += [
            f"# The venv's interpreter lives under {homes[0].parent}: readable, not writable.",
            "ProtectHome=read-only",
        ]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningTestbed]:
    directory = tmp_path_factory.mktemp("testbed")
    try:
        yield start_testbed(directory)
    finally:
        run_cli("down", "--dir", str(directory))


@pytest.fixture(scope="module")
def machine(machine_factory: MachineFactory, repo: Path, testbed: RunningTestbed) -> Machine:
    binds = [*project_binds(repo), Bind(testbed.dir, read_only=False)]
    machine = machine_factory("attestd", binds=binds)
    machine.install_unit(UNIT_FILE)
    # the appliance venv's console script, where the production unit expects it
    machine.run(["mkdir", "-p", "/opt/confinfer/bin"])
    machine.run(["ln", "-sf", str(repo / ".venv/bin/attestd"), "/opt/confinfer/bin/attestd"])
    return machine


@pytest.fixture(scope="module")
def attestd(machine: Machine, repo: Path, testbed: RunningTestbed) -> Iterator[Machine]:
    """The machine with the test drop-in installed; attestd is stopped afterwards."""
    machine.write_file(ENV_FILE, environment_file(read_env_file(testbed.dir / "testbed.env")))
    binds = project_binds(repo)
    machine.install_drop_in(UNIT, drop_in(repo, testbed.dir, binds))
    try:
        yield machine
    finally:
        machine.systemctl("stop", UNIT, check=False)
        testbed.cli("fault", "--clear", check=False)
        testbed.cli("gpu", "set", "stall_ms=0", check=False)


def health(machine: Machine) -> dict[str, Any]:
    out = machine.run(
        ["curl", "-sS", "--max-time", "5", "--unix-socket", SOCKET, "http://attestd/v1/health"]
    ).stdout
    data: dict[str, Any] = json.loads(out)
    return data


def journal_shows(machine: Machine, what: str, test: Callable[[str], bool]) -> str:
    """The unit's journal once ``test`` accepts it (journald writes a moment after the fact)."""
    seen = [""]

    def check() -> bool:
        seen[0] = machine.journal(UNIT)
        return test(seen[0])

    try:
        machine.wait_for(check, 10, what=what)
    except Exception as exc:
        raise AssertionError(f"{exc}\n{seen[0][-3000:]}") from None
    return seen[0]


def diagnose(machine: Machine) -> str:
    status = machine.systemctl("status", "--no-pager", "-l", UNIT, check=False).stdout
    return f"{status}\n--- journal ---\n{machine.journal(UNIT, lines=60)}"


def wait_healthy(machine: Machine, timeout: float = START_TIMEOUT_S) -> None:
    """Start attestd unless it runs (each test may run alone) and wait for ``healthy``."""
    machine.systemctl("start", "--no-block", UNIT)
    try:
        machine.wait_for_property(UNIT, "ActiveState", "active", timeout)
        machine.wait_for_property(
            UNIT, "StatusText", lambda s: s.startswith("healthy (attestd-healthy)"), 30
        )
    except Exception as exc:
        raise AssertionError(f"{exc}\n{diagnose(machine)}") from None


def test_unit_verifies_inside_the_rootfs(machine: Machine) -> None:
    proc = machine.run(["systemd-analyze", "verify", UNIT], check=False)
    assert proc.returncode == 0, proc.stderr
    assert UNIT not in proc.stderr, proc.stderr  # no warning about the unit either


def test_unit_exposure_stays_low(machine: Machine) -> None:
    proc = machine.run(["systemd-analyze", "security", "--no-pager", UNIT], check=False)
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    print(f"systemd-analyze security {UNIT}: {match.group(1)} {match.group(2)}")
    assert float(match.group(1)) <= MAX_EXPOSURE, proc.stdout


def test_activating_until_the_first_full_pass(attestd: Machine, testbed: RunningTestbed) -> None:
    attestd.systemctl("stop", UNIT)
    started = attestd.journal(UNIT).count(f"Started {UNIT}")
    testbed.cli("fault", "nvattest-rim", "--latency", str(RIM_LATENCY_S), "--count", "1")
    attestd.systemctl("start", "--no-block", UNIT)
    try:
        status = attestd.wait_for_property(
            UNIT, "StatusText", lambda s: s.startswith("starting ("), 60
        )
    except Exception as exc:
        raise AssertionError(f"{exc}\n{diagnose(attestd)}") from None
    # the stand-in nvattest is still waiting on its RIM service: no READY=1 yet
    props = attestd.unit_properties(UNIT, "ActiveState", "SubState", "StatusText")
    assert (props["ActiveState"], props["SubState"]) == ("activating", "start"), props
    assert status.startswith("starting (attestd-starting)"), status
    assert attestd.journal(UNIT).count(f"Started {UNIT}") == started  # systemd got no READY=1
    assert health(attestd)["state"] == "starting"
    wait_healthy(attestd)
    assert attestd.unit_property(UNIT, "Result") == "success"


def test_status_text_is_the_health_state(attestd: Machine) -> None:
    wait_healthy(attestd)
    text = attestd.unit_property(UNIT, "StatusText")
    answer = health(attestd)
    assert answer["state"] == "healthy"
    assert text == f"{answer['state']} ({answer['reason']}): {answer['line']}"
    assert text == "healthy (attestd-healthy): attested: GPU evidence and vTPM attestation passed"
    status = attestd.systemctl("status", "--no-pager", UNIT).stdout
    assert f'Status: "{text}"' in status
    mode = attestd.run(["stat", "-c", "%a %U:%G %F", SOCKET, "/run/attestd"]).stdout.split("\n")
    assert mode[0] == "660 root:root socket"
    assert mode[1] == "750 root:root directory"


def test_hung_nvml_is_killed_by_the_watchdog(attestd: Machine, testbed: RunningTestbed) -> None:
    wait_healthy(attestd)
    restarts = int(attestd.unit_property(UNIT, "NRestarts"))
    pid = attestd.unit_property(UNIT, "MainPID")
    testbed.cli("gpu", "set", "stall_ms=10000")
    try:
        attestd.wait_for(
            lambda: int(attestd.unit_property(UNIT, "NRestarts")) > restarts,
            WATCHDOG_S + 30,
            what="systemd to restart attestd",
        )
    finally:
        testbed.cli("gpu", "set", "stall_ms=0")
    journal_shows(attestd, "systemd's watchdog message", lambda j: "Watchdog timeout" in j)
    wait_healthy(attestd)
    assert attestd.unit_property(UNIT, "MainPID") != pid


def test_stop_is_clean_and_removes_the_socket(attestd: Machine) -> None:
    wait_healthy(attestd)
    assert attestd.run(["test", "-S", SOCKET], check=False).returncode == 0
    journal = attestd.journal(UNIT)
    stops = journal.count("stopping on SIGTERM"), journal.count(f"{UNIT}: Deactivated successfully")
    attestd.systemctl("stop", UNIT)
    props = attestd.unit_properties(UNIT, "ActiveState", "Result", "ExecMainStatus")
    expected = {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    assert props == expected, f"{props}\n{diagnose(attestd)}"
    # systemd says "Deactivated successfully" only for an exit with status 0
    journal_shows(
        attestd,
        "attestd's stop line and systemd's clean deactivation",
        lambda j: (
            j.count("stopping on SIGTERM") > stops[0]
            and j.count(f"{UNIT}: Deactivated successfully") > stops[1]
        ),
    )
    assert attestd.run(["test", "-e", SOCKET], check=False).returncode != 0
    assert attestd.run(["test", "-e", "/run/attestd"], check=False).returncode != 0
