"""The onboarding stand-ins (testbed/onboard.py) are strict: what the real machine would not do,
or what onboarding must never do, is refused, logged as a violation and exits 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.onboard_rig import Rig

pytestmark = pytest.mark.unit


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def refused(rig: Rig, *words: str) -> str:
    done = rig.testbed(*words)
    assert done.returncode == 1, done
    reason = done.stderr.split(":")[1].strip()
    assert rig.violations()[-1]["reason"] == reason
    return reason


def test_a_reboot_stage_takes_effect_only_in_a_later_boot(rig: Rig) -> None:
    assert rig.testbed("check", "kernel").stdout == "absent: not applied\n"
    assert rig.testbed("apply", "kernel").returncode == 0
    assert rig.testbed("check", "kernel").stdout.startswith("pending-reboot: ")
    rig.new_boot()
    assert rig.testbed("check", "kernel").stdout.startswith("in-place: ")


def test_nothing_is_applied_twice_even_across_boots(rig: Rig) -> None:
    rig.testbed("apply", "kernel")
    assert refused(rig, "apply", "kernel") == "onboard-applied-twice"
    rig.new_boot()
    assert refused(rig, "apply", "kernel") == "onboard-applied-twice"


def test_stages_are_applied_in_order_and_never_past_a_pending_reboot(rig: Rig) -> None:
    assert refused(rig, "apply", "driver") == "onboard-out-of-order"
    assert refused(rig, "apply", "gpu-tools") == "onboard-out-of-order"
    rig.testbed("apply", "kernel")
    assert refused(rig, "apply", "driver") == "onboard-reboot-pending"
    rig.new_boot()
    assert rig.testbed("apply", "driver").returncode == 0
    assert refused(rig, "apply", "container-toolkit") == "onboard-reboot-pending"
    assert refused(rig, "apply", "cc-mode") == "onboard-unknown-command"


def test_nvidia_smi_needs_the_driver_and_never_sets_the_ready_state(rig: Rig) -> None:
    done = rig.testbed("nvidia-smi", "conf-compute", "-f")
    assert done.returncode == 9 and "couldn't communicate with the NVIDIA driver" in done.stdout
    rig.testbed("apply", "kernel")
    rig.new_boot()
    rig.testbed("apply", "driver")
    rig.new_boot()
    assert rig.testbed("nvidia-smi", "conf-compute", "-f").stdout == "CC status: ON\n"
    assert rig.testbed("nvidia-smi", "conf-compute", "-e").stdout == (
        "CC Environment: PRODUCTION\n"
    )
    for srs in (["conf-compute", "-srs", "1"], ["conf-compute", "-srs", "0"]):
        assert refused(rig, "nvidia-smi", *srs) == "onboard-ready-state-forbidden"
    assert refused(rig, "nvidia-smi", "-q") == "onboard-unknown-command"


def test_the_reboot_gate_wants_the_state_recorded_first(rig: Rig) -> None:
    state_file = rig.tmp / "onboard.json"
    assert refused(rig, "reboot", "--state-file", str(state_file)) == "onboard-reboot-unrecorded"
    rig.testbed("apply", "kernel")
    stages = [{"name": "kernel", "status": "applying", "boot_id": rig.boot}]
    state_file.write_text(json.dumps({"version": 1, "stages": stages}))
    assert refused(rig, "reboot", "--state-file", str(state_file)) == "onboard-reboot-unrecorded"
    stages[0]["status"] = "rebooting"
    stages[0]["boot_id"] = rig.boots[0].replace(rig.boots[0][0], "0")  # another boot's
    state_file.write_text(json.dumps({"version": 1, "stages": stages}))
    assert refused(rig, "reboot", "--state-file", str(state_file)) == "onboard-reboot-unrecorded"
    stages[0]["boot_id"] = rig.boot
    state_file.write_text(json.dumps({"version": 1, "stages": stages}))
    assert rig.testbed("reboot", "--state-file", str(state_file)).returncode == 0
    assert rig.log()[-1]["op"] == "reboot" and rig.log()[-1]["stage"] == "kernel"


def test_every_invocation_is_logged_in_order(rig: Rig) -> None:
    rig.testbed("check", "kernel")
    rig.testbed("apply", "kernel")
    rig.testbed("set", "cc=off", "fail=driver:2")
    assert [(e["seq"], e["op"], e["result"]) for e in rig.log()] == [
        (1, "check", "ok"),
        (2, "apply", "ok"),
        (3, "set", "ok"),
    ]
    assert {e["boot_id"] for e in rig.log()} == {rig.boot}
    assert rig.testbed("set", "fail=bios:1").returncode == 1
