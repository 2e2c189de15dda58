"""Onboarding's stage machine against the testbed's strict stand-ins (tests/onboard_rig.py):
each reboot point, each crash point (before and after each state write, before and after each
apply, after the reboot request, after the reboot), in the same boot and after a power loss,
resumes at the right stage and applies nothing twice (the stand-ins' own log says so); failed
stages, bounded retries and the status lines."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from confinfer.errors import ConfinferError, Reason
from confinfer.onboard import Appliance, Outcome
from confinfer.onboard_commands import Completed
from confinfer.onboard_state import MAX_ATTEMPTS, STAGES, Stage, State, StateFile, Status
from tests.onboard_rig import NOW, Crash, CrashingMachine, CrashingStore, Rig

pytestmark = pytest.mark.unit

MACHINE_STAGES = ("kernel", "driver", "gpu-tools", "container-toolkit")
ONCE = dict.fromkeys(MACHINE_STAGES, 1)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def statuses(state: State) -> dict[str, str]:
    return {r.name: r.status.value for r in state.records}


def assert_finished_cleanly(rig: Rig) -> None:
    state = rig.state()
    assert set(statuses(state).values()) == {"done"}
    assert rig.applies() == ONCE
    assert rig.violations() == []
    assert rig.enabled
    assert rig.systemctl.count(["enable", "--now", "--no-block", "confinfer.target"]) == 1
    assert rig.ready == ["onboarding done: 6/6 stages; the appliance starts (confinfer.target)"]


# --- the reboot points ----------------------------------------------------------------------


def test_a_fresh_machine_reboots_twice_and_each_boot_resumes_at_the_next_stage(rig: Rig) -> None:
    assert rig.run() is Outcome.REBOOTED
    state = rig.state()
    assert statuses(state)["kernel"] == "rebooting"
    assert state.record("kernel").boot_id == rig.boot
    assert state.record("kernel").attempts == 1
    assert [(e["op"], e["stage"]) for e in rig.log()] == [
        ("check", "kernel"),
        ("apply", "kernel"),
        ("check", "kernel"),
        ("reboot", "kernel"),
    ]
    assert rig.reboots == [rig.boot]
    assert rig.statuses[-1] == "onboarding 1/6 kernel: upgraded, rebooting"

    rig.new_boot()
    seen = len(rig.log())
    assert rig.run() is Outcome.REBOOTED
    assert statuses(rig.state()) == {
        "kernel": "done", "driver": "rebooting", "cc-mode": "pending", "gpu-tools": "pending",
        "container-toolkit": "pending", "appliance": "pending",
    }  # fmt: skip
    assert [(e["op"], e["stage"]) for e in rig.log()[seen:]] == [
        ("check", "kernel"),  # the kernel is in effect now
        ("check", "driver"),
        ("apply", "driver"),
        ("check", "driver"),
        ("reboot", "driver"),
    ]
    assert rig.statuses[-1] == "onboarding 2/6 driver: installed, rebooting"

    rig.new_boot()
    assert rig.run() is Outcome.DONE
    assert_finished_cleanly(rig)
    assert len(rig.reboots) == 2
    assert "onboarding 4/6 gpu-tools: installing (attempt 1 of 3)" in rig.statuses
    # The CC check read nvidia-smi's two answers and asked nothing else of it.
    smi = [e["args"] for e in rig.log() if e["op"] == "nvidia-smi"]
    assert smi == [["conf-compute", "-f"], ["conf-compute", "-e"]]


def test_once_done_every_later_boot_only_says_so(rig: Rig) -> None:
    rig.drive()
    seen, calls = len(rig.log()), len(rig.systemctl)
    rig.new_boot()
    assert rig.run() is Outcome.DONE
    assert len(rig.log()) == seen  # not even a check
    assert len(rig.systemctl) == calls
    assert rig.ready[-1].startswith("onboarding done: 6/6")


@pytest.mark.parametrize("stage", ["kernel", "driver"])
def test_the_same_boot_after_a_reboot_request_asks_again_and_applies_nothing(
    rig: Rig, stage: str
) -> None:
    """The reboot was asked for and did not happen (the unit restarted first)."""
    if stage == "driver":
        rig.run()
        rig.new_boot()
    rig.shutdown_comes = False
    with pytest.raises(ConfinferError) as info:
        rig.run()
    assert info.value.reason is Reason.ONBOARD_REBOOT_TIMEOUT
    assert statuses(rig.state())[stage] == "rebooting"  # not failed: the reboot may still come
    rig.shutdown_comes = True
    assert rig.run() is Outcome.REBOOTED
    assert rig.reboots[-2:] == [rig.boot, rig.boot]
    assert rig.applies()[stage] == 1
    rig.new_boot()
    rig.drive()
    assert_finished_cleanly(rig)


# --- the crash points -----------------------------------------------------------------------


def _status_of(stage: str, status: Status) -> Callable[[State], bool]:
    return lambda state: state.record(stage).status is status


def _crash_points(stage: str, reboots: bool) -> list[str]:
    points = [
        "before-write-applying",
        "after-write-applying",
        "before-apply",
        "after-apply",
    ]
    if reboots:
        points += ["before-write-rebooting", "after-write-rebooting", "after-reboot-request"]
        points += ["before-write-done-after-reboot", "after-write-done-after-reboot"]
    else:
        points += ["before-write-done", "after-write-done"]
    return points


CASES = [
    (stage.name, point)
    for stage in STAGES
    if stage.name != "cc-mode"
    for point in _crash_points(stage.name, stage.reboots)
]


def _arm(rig: Rig, stage: str, point: str) -> dict[str, object]:
    """What to pass to the run that crashes at ``point`` of ``stage``."""
    if point.endswith("-apply") and stage != "appliance":
        return {"machine": CrashingMachine(rig.machine(), stage, after=point.startswith("after"))}
    if point == "after-reboot-request":
        rig.crash_on_reboot = True
        return {}
    if point.endswith("-apply"):  # the appliance: just before or after its systemctl call
        before = point.startswith("before")
        status = Status.APPLYING if before else Status.DONE
        when = _status_of(stage, status)
        return {"store": CrashingStore(rig.store.path, when, after=before)}
    written = point.removeprefix("before-write-").removeprefix("after-write-")
    status = Status(written.removesuffix("-after-reboot"))
    return {
        "store": CrashingStore(
            rig.store.path, _status_of(stage, status), after=point.startswith("after-write")
        )
    }


@pytest.mark.parametrize("then", ["restart", "power-loss"])
@pytest.mark.parametrize(("stage", "point"), CASES)
def test_a_crash_at_any_point_resumes_and_applies_nothing_twice(
    rig: Rig, stage: str, point: str, then: str
) -> None:
    # Get to the stage's boot: each reboot stage before it costs one boot.
    for earlier in ("kernel", "driver"):
        if earlier == stage:
            break
        assert rig.run() is Outcome.REBOOTED
        rig.new_boot()
    if point.endswith("-after-reboot"):
        assert rig.run() is Outcome.REBOOTED  # the stage asks for its reboot ...
        rig.new_boot()  # ... and gets it; the crash comes while it is checked afterwards
    kwargs = _arm(rig, stage, point)
    with pytest.raises(Crash):
        rig.run(**kwargs)
    if then == "power-loss":
        rig.new_boot()
    rig.drive()
    assert_finished_cleanly(rig)
    assert rig.state().record(stage).attempts <= 2


def test_an_apply_cut_short_by_a_power_loss_counts_and_is_bounded(rig: Rig) -> None:
    """A stage that dies while it applies, boot after boot, is not applied forever."""
    for _ in range(MAX_ATTEMPTS):
        with pytest.raises(Crash):
            rig.run(machine=CrashingMachine(rig.machine(), "kernel", after=False))
        rig.new_boot()
    with pytest.raises(ConfinferError) as info:
        rig.run()
    assert info.value.reason is Reason.ONBOARD_ATTEMPTS_EXHAUSTED
    assert info.value.exit_code == 74
    assert rig.state().record("kernel").status is Status.FAILED
    assert rig.applies() == {}
    # An operator's --retry starts the count again.
    assert rig.onboarding().run(retry=True) is Outcome.REBOOTED
    rig.new_boot()
    rig.drive()
    assert_finished_cleanly(rig)


# --- failures -------------------------------------------------------------------------------


def test_cc_mode_off_fails_the_stage_once_with_its_reason_and_no_retry(rig: Rig) -> None:
    rig.testbed("set", "cc=off")
    rig.run()
    rig.new_boot()
    rig.run()
    rig.new_boot()
    with pytest.raises(ConfinferError) as info:
        rig.run()
    assert info.value.reason is Reason.GPU_CC_OFF
    assert info.value.exit_code == 77
    assert info.value.one_line() == (
        "gpu-cc-off: nvidia-smi conf-compute -f printed CC status: OFF, not 'CC status: ON'"
    )
    record = rig.state().record("cc-mode")
    assert (record.status, record.reason) == (Status.FAILED, Reason.GPU_CC_OFF)
    assert rig.statuses[-1].startswith("onboarding 3/6 cc-mode: failed (gpu-cc-off): ")
    assert [e["args"] for e in rig.log() if e["op"] == "nvidia-smi"] == [["conf-compute", "-f"]]
    assert rig.sleeps == []  # a refusal is not retried
    # The next boot fails the same way without asking the machine again: no reboot loop.
    rig.new_boot()
    seen = len(rig.log())
    with pytest.raises(ConfinferError) as again:
        rig.run()
    assert again.value.reason is Reason.GPU_CC_OFF
    assert again.value.hint is not None and "--retry" in again.value.hint
    assert len(rig.log()) == seen
    assert rig.reboots == [rig.boots[0], rig.boots[1]]
    assert not rig.enabled


def test_not_production_is_refused(rig: Rig) -> None:
    rig.testbed("set", "environment=simulation")
    rig.run()
    rig.new_boot()
    rig.run()
    rig.new_boot()
    with pytest.raises(ConfinferError) as info:
        rig.run()
    assert info.value.reason is Reason.GPU_NOT_PRODUCTION


def test_a_transient_failure_is_retried_once_and_goes_on(rig: Rig) -> None:
    rig.testbed("set", "fail=gpu-tools:1")
    rig.drive()
    assert_finished_cleanly(rig)
    assert rig.state().record("gpu-tools").attempts == 2
    assert len(rig.sleeps) == 1
    failed = [e for e in rig.log() if e["op"] == "apply" and e["result"] == "failed"]
    assert [e["stage"] for e in failed] == ["gpu-tools"]


def test_retries_are_bounded_then_the_stage_stays_failed_until_retry(rig: Rig) -> None:
    rig.testbed("set", f"fail=container-toolkit:{MAX_ATTEMPTS}")
    rig.run()
    rig.new_boot()
    rig.run()
    rig.new_boot()
    with pytest.raises(ConfinferError) as info:
        rig.run()
    assert info.value.reason is Reason.ONBOARD_COMMAND_FAILED
    assert "onboard-injected-failure" in info.value.message
    assert len(rig.sleeps) == MAX_ATTEMPTS - 1
    record = rig.state().record("container-toolkit")
    assert (record.status, record.attempts) == (Status.FAILED, MAX_ATTEMPTS)
    tries = [e for e in rig.log() if e["op"] == "apply" and e["stage"] == "container-toolkit"]
    assert len(tries) == MAX_ATTEMPTS
    rig.new_boot()
    with pytest.raises(ConfinferError):
        rig.run()
    assert len([e for e in rig.log() if e["op"] == "apply"]) == len(tries) + 3  # no more
    assert rig.onboarding().run(retry=True) is Outcome.DONE
    assert_finished_cleanly(rig)


def test_an_effect_gone_after_its_reboot_fails_without_a_reboot_loop(rig: Rig) -> None:
    rig.testbed("set", "lose=driver")
    rig.run()
    rig.new_boot()
    rig.run()
    rig.new_boot()
    with pytest.raises(ConfinferError) as info:
        rig.run()
    assert info.value.reason is Reason.ONBOARD_EFFECT_MISSING
    assert "not in effect after the reboot (absent" in info.value.message
    rig.new_boot()
    with pytest.raises(ConfinferError):
        rig.run()
    assert len(rig.reboots) == 2
    assert rig.applies()["driver"] == 1


def test_the_hardware_may_not_change_once_begun(rig: Rig) -> None:
    rig.run()
    onboarding = rig.onboarding()
    onboarding.hardware = "azure"
    with pytest.raises(ConfinferError) as info:
        onboarding.run()
    assert info.value.reason is Reason.ONBOARD_STATE_INVALID


def test_the_reboot_gate_refuses_a_reboot_the_state_does_not_record(rig: Rig) -> None:
    rig.testbed("apply", "kernel")
    done = rig.testbed("reboot", "--state-file", str(rig.store.path))
    assert done.returncode == 1
    assert "onboard-reboot-unrecorded" in done.stderr
    assert [e["reason"] for e in rig.violations()] == ["onboard-reboot-unrecorded"]


# --- the state file -------------------------------------------------------------------------


def test_the_state_file_is_whole_json_and_leaves_no_temporary_files(rig: Rig) -> None:
    rig.drive()
    files = sorted(p.name for p in rig.state_dir.iterdir())
    assert files == ["onboard.json", "testbed"]
    data = json.loads(rig.store.path.read_text())
    assert data["version"] == 1 and data["hardware"] == "testbed"
    assert [s["name"] for s in data["stages"]] == [s.name for s in STAGES]
    assert data["stages"][0] == {
        "name": "kernel", "status": "done", "attempts": 1, "boot_id": rig.boots[1],
        "since": NOW, "reason": None, "error": None,
    }  # fmt: skip
    assert rig.store.path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{", "not an onboarding state"),
        ('{"version": 2}', "not an onboarding state of version 1"),
        ('{"version": 1, "hardware": "gcp", "stages": []}', "unknown hardware 'gcp'"),
        ('{"version": 1, "hardware": "azure", "stages": [{"name": "bios"}]}', "unknown stage"),
        (
            '{"version": 1, "hardware": "azure", "stages": [{"name": "kernel", '
            '"status": "failed"}]}',
            "failed without a reason",
        ),
        (
            '{"version": 1, "hardware": "azure", "stages": [{"name": "kernel", '
            '"status": "done", "boot_id": "x\\n<0>"}]}',
            "boot_id is not a boot id",
        ),
    ],
)
def test_a_damaged_state_file_is_one_clear_error(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "onboard.json"
    path.write_text(text)
    with pytest.raises(ConfinferError) as info:
        StateFile(path).load()
    assert info.value.reason is Reason.ONBOARD_STATE_INVALID
    assert needle in info.value.message
    assert info.value.hint is not None


def test_stages_a_newer_version_adds_are_pending(tmp_path: Path) -> None:
    path = tmp_path / "onboard.json"
    path.write_text(
        '{"version": 1, "hardware": "azure", "stages": [{"name": "kernel", "status": "done"}]}'
    )
    state = StateFile(path).load()
    assert state is not None
    assert statuses(state)["kernel"] == "done"
    assert statuses(state)["appliance"] == "pending"


# --- the appliance stage's serving image ------------------------------------------------------

PINNED = "docker.io/vllm/vllm-openai:v0.30.0@sha256:" + "8a" * 32


class DockerRecorder:
    """``docker image inspect`` answers from ``present``; ``docker pull`` adds to it;
    ``systemctl`` is recorded."""

    def __init__(self, present: set[str]) -> None:
        self.present = present
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], **kwargs: object) -> Completed:
        argv = list(argv)
        self.calls.append(argv)
        if argv[:3] == ["docker", "image", "inspect"]:
            found = argv[-1] in self.present
            return Completed(0 if found else 1, "sha256:abc\n" if found else "", "")
        if argv[:3] == ["docker", "pull", "--quiet"]:
            self.present.add(argv[-1])
            return Completed(0, argv[-1] + "\n", "")
        if argv[0] == "systemctl":
            return Completed(0, "", "")
        raise AssertionError(f"unexpected command: {argv}")


def _stage() -> Stage:
    return next(s for s in STAGES if s.name == "appliance")


def test_an_image_already_loaded_is_not_pulled() -> None:
    run = DockerRecorder({"confinfer-vllm-cpu:1"})
    Appliance(run, "confinfer-vllm-cpu:1").apply(_stage())
    assert [c[:2] for c in run.calls] == [
        ["systemctl", "start"],  # dockerd first: the image is looked up there
        ["docker", "image"],
        ["systemctl", "enable"],
    ]


def test_a_digest_pinned_image_is_pulled_once_before_the_target_starts() -> None:
    run = DockerRecorder(set())
    Appliance(run, PINNED).apply(_stage())
    assert run.calls[2] == ["docker", "pull", "--quiet", PINNED]
    assert run.calls[3][:2] == ["systemctl", "enable"]


@pytest.mark.parametrize(
    "image", ["vllm/vllm-openai:latest", "vllm/vllm-openai@sha256:abc", PINNED + "0"]
)
def test_an_absent_image_without_a_full_digest_is_never_pulled(image: str) -> None:
    run = DockerRecorder(set())
    with pytest.raises(ConfinferError) as err:
        Appliance(run, image).apply(_stage())
    assert err.value.reason is Reason.SERVING_IMAGE_MISSING
    assert "never pulled" in err.value.message
    assert not any(c[:2] in (["docker", "pull"], ["systemctl", "enable"]) for c in run.calls)
