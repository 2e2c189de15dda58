"""Onboarding: the ordered stages that turn a stock Azure confidential GPU VM into the appliance.

``confinfer onboard run`` (``confinfer-onboard.service``, at every boot) walks the stages in
order, after Azure's onboarding kit (az-cgpu-onboarding, steps 0 to 3 with their reboots):

=====  ===================  ==========================================================  ======
index  stage                what it leaves in place                                     reboot
=====  ===================  ==========================================================  ======
1      kernel               packages upgraded, a kernel the driver supports, kernel     yes
                            and driver held back from unattended upgrades
2      driver               NVIDIA's open server driver (pinned branch), its signed     yes
                            kernel modules, persistence mode (never the ready state)
3      cc-mode              a check only: ``CC status: ON``, ``CC Environment:          no
                            PRODUCTION``; the guest cannot change either
4      gpu-tools            nvattest, the pinned ``.deb`` checked against its SHA-256   no
5      container-toolkit    NVIDIA's container toolkit (signing key pinned), docker's   no
                            nvidia runtime
6      appliance            ``confinfer.target`` enabled and started (``--no-block``)   no
=====  ===================  ==========================================================  ======

What a stage does to the machine is a :class:`Machine`'s business: ``AzureMachine``
(confinfer/onboard_azure.py) on the VM, :class:`TestbedMachine` (the strict stand-ins of
testbed/onboard.py) when ``onboard_hardware = "testbed"``, the one switch between the two. The
appliance stage is the same on both: systemctl.

Each stage is ``pending``, ``applying``, ``rebooting``, ``done`` or ``failed`` in the state file
(confinfer/onboard_state.py, written atomically before and after every step). The rules that make
it safe to stop at any point (a crash, a power loss, the reboots it asks for):

- a stage marked ``done`` is never applied again;
- before a stage is applied, its *check* looks at the machine: what is already in place is
  marked ``done`` without applying, and an apply cut short is finished by the next run;
- ``applying`` is recorded (with the attempt number) before the apply starts, ``rebooting``
  (with the boot id) before the reboot is asked for; a stage that asked for a reboot is marked
  ``done`` only in a later boot (``/proc/sys/kernel/random/boot_id`` changed) and once its check
  finds it in effect;
- at most :data:`MAX_ATTEMPTS` applies per stage, counting retries of transient failures in
  one run and applies cut short by a crash; then the stage is ``failed``. A failed stage stays
  failed at every boot (one line with its reason; the unit fails; no reboot loop) until
  ``confinfer onboard run --retry``.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from confinfer import sdnotify
from confinfer.errors import ConfinferError, Interrupted, Kind, Reason, printable
from confinfer.onboard_commands import Runner, checked
from confinfer.onboard_state import (
    INDEX,
    MAX_ATTEMPTS,
    STAGES,
    Record,
    Stage,
    State,
    StateFile,
    Status,
)

log = logging.getLogger(__name__)

CHECK_TRIES = 3  # a check that cannot run (nvidia-smi not answering yet) is asked again
BACKOFF_S = (10.0, 30.0)  # between tries of a transient failure
REBOOT_WAIT_S = 300.0  # after `systemctl reboot`, how long the machine may take to go down
RETRY_HINT = "mend the cause, then run `confinfer onboard run --retry` (or restart the unit)"
# Transient kinds: a command or a download that may work when tried again. Refusals (CC mode
# off), integrity failures (a digest or a key that differs from its pin) and configuration
# errors are final.
RETRYABLE = frozenset({Kind.UNAVAILABLE, Kind.SYSTEM})


class Effect(enum.StrEnum):
    """What a stage's check finds on the machine."""

    ABSENT = "absent"  # not (completely) applied
    PENDING_REBOOT = "pending-reboot"  # applied, takes effect after a reboot
    IN_PLACE = "in-place"


class Outcome(enum.Enum):
    DONE = "done"  # every stage done; READY=1 sent
    REBOOTED = "rebooted"  # a reboot was asked for and the shutdown has begun


Check = tuple[Effect, str]  # what the check found, and a line that says why


# --- the machines ----------------------------------------------------------------------------


class Machine(Protocol):
    """What the stages do to a machine. ``check`` looks and changes nothing; ``apply`` makes
    the stage's effect (it may find part of it in place); ``before_reboot`` runs once the state
    records the reboot, right before it is asked for."""

    def check(self, stage: Stage) -> Check: ...

    def apply(self, stage: Stage) -> None: ...

    def before_reboot(self) -> None: ...


CC_STATUS_ON = "CC status: ON"
CC_PRODUCTION = "CC Environment: PRODUCTION"


def cc_mode_check(run: Runner, nvidia_smi: Sequence[str]) -> Check:
    """``nvidia-smi conf-compute -f`` and ``-e`` must print ``CC status: ON`` and
    ``CC Environment: PRODUCTION``. Read only: the ready state (``-srs``) is never touched here;
    attestd sets it after attestation."""
    said: list[str] = []
    for flag, want, reason in (
        ("-f", CC_STATUS_ON, Reason.GPU_CC_OFF),
        ("-e", CC_PRODUCTION, Reason.GPU_NOT_PRODUCTION),
    ):
        done = checked(run, [*nvidia_smi, "conf-compute", flag], capture=True, timeout=120.0)
        lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
        if want not in lines:
            shown = printable(" / ".join(lines) or "nothing", 200)
            raise ConfinferError(
                f"nvidia-smi conf-compute {flag} printed {shown!s}, not {want!r}",
                reason=reason,
                hint="confidential computing is set on the host: redeploy on a confidential "
                "GPU size (NCC H100 v5); the guest cannot turn it on",
            )
        said.append(want)
    return Effect.IN_PLACE, ", ".join(said)


class TestbedMachine:
    """The stand-ins of ``testbed/onboard.py``, run as ``python -m testbed onboard``: each stage
    simulated with markers, every invocation logged, strict about order and repetition."""

    def __init__(
        self,
        run: Runner,
        directory: Path,
        *,
        boot_id_file: Path,
        state_file: Path,
        python: str = sys.executable,
    ) -> None:
        self.run = run
        self.state_file = state_file
        self.prefix = [
            python, "-m", "testbed", "onboard", "--dir", str(directory),
            "--boot-id-file", str(boot_id_file),
        ]  # fmt: skip

    def check(self, stage: Stage) -> Check:
        if stage.name == "cc-mode":
            return cc_mode_check(self.run, [*self.prefix, "nvidia-smi"])
        done = checked(self.run, [*self.prefix, "check", stage.name], capture=True)
        word, _, why = done.stdout.strip().partition(":")
        try:
            return Effect(word), why.strip()
        except ValueError:
            raise ConfinferError(
                f"the testbed's check of {stage.name} printed {printable(done.stdout, 100)!r}",
                reason=Reason.ONBOARD_COMMAND_FAILED,
            ) from None

    def apply(self, stage: Stage) -> None:
        if stage.name != "cc-mode":  # a check only: nothing to apply
            checked(self.run, [*self.prefix, "apply", stage.name])

    def before_reboot(self) -> None:
        # The stand-in refuses unless the state file already records this boot's reboot.
        checked(self.run, [*self.prefix, "reboot", "--state-file", str(self.state_file)])


TARGET = "confinfer.target"
DIGEST_PINNED = re.compile(r"@sha256:[0-9a-f]{64}$")
IMAGE_PULL_TIMEOUT_S = 3600.0  # vLLM's image is ~10 GB


class Appliance:
    """The last stage, the same on every machine: the serving image on the machine, then
    ``confinfer.target`` enabled (multi-user wants it from now on) and started without waiting
    (its jobs wait for onboarding's READY=1, since the onboarding unit is ordered before it).

    The image (``serving_image``): there already (loaded by whoever built the machine), or
    pulled once, and only when the reference pins a digest (``...@sha256:<hex>``, as
    images/serving.toml does): dockerd then refuses content that does not match it, so what
    is pulled is what was pinned. A reference without a digest is never pulled: vLLM itself is
    never allowed to pull either (serving/), so the image could only come from a tag's
    current owner."""

    def __init__(self, run: Runner, image: str | None = None) -> None:
        self.run = run
        self.image = image

    def ensure_image(self) -> None:
        image = self.image
        if image is None:
            return
        # The engine's dockerd (vllm.service requires it anyway): the image is looked up there.
        checked(self.run, ["systemctl", "start", "docker.service"], timeout=300.0)
        have = self.run(["docker", "image", "inspect", "--format", "{{.Id}}", image], capture=True)
        if have.returncode == 0:
            log.info("serving image %s is on this machine (%s)", image, have.stdout.strip()[:19])
            return
        if not DIGEST_PINNED.search(image):
            raise ConfinferError(
                f"the serving image {printable(image, 200)} is not on this machine, and a "
                "reference without a digest is never pulled",
                reason=Reason.SERVING_IMAGE_MISSING,
                hint="pin serving_image by digest (images/serving.toml), or docker load it",
            )
        log.info("pulling the serving image %s (pinned by digest)", image)
        checked(self.run, ["docker", "pull", "--quiet", image], timeout=IMAGE_PULL_TIMEOUT_S)

    def check(self, stage: Stage) -> Check:
        done = self.run(["systemctl", "is-enabled", TARGET], capture=True, timeout=60.0)
        said = done.stdout.strip()
        if said == "enabled":
            return Effect.IN_PLACE, f"{TARGET} is enabled"
        return Effect.ABSENT, f"{TARGET} is {printable(said or 'not known', 40)}"

    def apply(self, stage: Stage) -> None:
        self.ensure_image()
        checked(self.run, ["systemctl", "enable", "--now", "--no-block", TARGET], timeout=120.0)

    def before_reboot(self) -> None:  # pragma: no cover - the appliance stage never reboots
        raise AssertionError("the appliance stage does not reboot")


def wait_for_shutdown(timeout_s: float) -> bool:
    """After ``systemctl reboot``: True once the shutdown's SIGTERM arrives (the CLI turns it
    into :class:`Interrupted`), False if the machine is still up after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    try:
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 1.0))
    except Interrupted:
        return True
    return False


# --- the stage machine -----------------------------------------------------------------------


class _Reboot(Exception):
    """Internal: the stage asks for a reboot (the state file already says so)."""


@dataclass
class Onboarding:
    """One run over the stages. Every effect on the world is injected, so tests can stop it at
    any point and start it again, in the same boot or a new one."""

    store: StateFile
    machine: Machine
    appliance: Machine
    hardware: str
    boot_id: Callable[[], str]
    reboot: Callable[[], None]
    wait_for_shutdown: Callable[[float], bool] = wait_for_shutdown
    status: Callable[[str], object] = sdnotify.status
    ready: Callable[[str], object] = sdnotify.ready
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.time
    _state: State | None = dataclasses.field(default=None, init=False, repr=False)

    @property
    def state(self) -> State:
        """The state as last written."""
        if self._state is None:
            raise AssertionError("run() has not loaded the state")  # a bug
        return self._state

    def run(self, *, retry: bool = False) -> Outcome:
        boot = self.boot_id()
        loaded = self.store.load()
        if loaded is None:
            self._save(State.new(self.hardware))
        elif loaded.hardware != self.hardware:
            raise ConfinferError(
                f"{self.store.path} was written with onboard_hardware = {loaded.hardware!r}; "
                f"this run has {self.hardware!r}",
                reason=Reason.ONBOARD_STATE_INVALID,
                hint="onboard_hardware must not change once onboarding has begun",
            )
        else:
            self._state = loaded
            if retry and loaded.retried() != loaded:
                self._save(loaded.retried())
        for stage in STAGES:
            if self.state.record(stage.name).status is Status.DONE:
                continue
            try:
                self._advance(stage, boot)
            except _Reboot:
                self._reboot(stage)
                return Outcome.REBOOTED
        line = self.state.progress().line + "; the appliance starts (confinfer.target)"
        log.info("%s", line)
        self.ready(line)
        return Outcome.DONE

    def _machine(self, stage: Stage) -> Machine:
        return self.appliance if stage.name == "appliance" else self.machine

    # A stage, from wherever the state file left it.

    def _advance(self, stage: Stage, boot: str) -> None:
        record = self.state.record(stage.name)
        if record.status is Status.FAILED:
            self._say()
            raise ConfinferError(
                f"stage {INDEX[stage.name]}/{len(STAGES)} {stage.name} failed: "
                f"{printable(record.error or '', 1000)}",
                reason=record.reason or Reason.ONBOARD_EFFECT_MISSING,
                hint=RETRY_HINT,
            )
        try:
            self._steps(stage, boot)
        except Interrupted:
            raise  # a shutdown (or ^C) mid-step: like a crash, the next run resumes the stage
        except ConfinferError as exc:
            failed = dataclasses.replace(
                self._stamped(self.state.record(stage.name), boot),
                status=Status.FAILED,
                reason=exc.reason,
                error=printable(exc.message, 1000),
            )
            self._save(self.state.replace(failed))
            self._say()
            if exc.hint is None:
                exc.hint = RETRY_HINT
            raise

    def _steps(self, stage: Stage, boot: str) -> None:
        machine = self._machine(stage)
        record = self.state.record(stage.name)
        if record.status is Status.REBOOTING:
            if record.boot_id == boot:
                # Recorded and asked for, not happened (a crash after the request or before it).
                raise _Reboot
            label = f"onboarding {INDEX[stage.name]}/{len(STAGES)} {stage.name}"
            self.status(f"{label}: checking after the reboot")
            effect, why = self._check(machine, stage)
            if effect is Effect.IN_PLACE:
                return self._done(stage, boot, why)
            raise ConfinferError(
                f"{stage.title}: not in effect after the reboot ({effect}: {why})",
                reason=Reason.ONBOARD_EFFECT_MISSING,
            )
        effect, why = self._check(machine, stage)
        if effect is Effect.IN_PLACE:
            return self._done(stage, boot, why)
        if effect is Effect.PENDING_REBOOT and stage.reboots and record.status is Status.APPLYING:
            # Applied by a run that stopped before it could record the reboot.
            return self._rebooting(stage, boot)
        self._apply(machine, stage, boot)
        effect, why = self._check(machine, stage)
        if effect is Effect.PENDING_REBOOT and stage.reboots:
            return self._rebooting(stage, boot)
        if effect is Effect.IN_PLACE:
            return self._done(stage, boot, why)
        raise ConfinferError(
            f"{stage.title}: applied, but not in effect ({effect}: {why})",
            reason=Reason.ONBOARD_EFFECT_MISSING,
        )

    def _apply(self, machine: Machine, stage: Stage, boot: str) -> None:
        while True:
            record = self.state.record(stage.name)
            if record.attempts >= MAX_ATTEMPTS:
                raise ConfinferError(
                    f"{stage.title}: started {record.attempts} times without finishing",
                    reason=Reason.ONBOARD_ATTEMPTS_EXHAUSTED,
                )
            applying = dataclasses.replace(
                self._stamped(record, boot),
                status=Status.APPLYING,
                attempts=record.attempts + 1,
                reason=None,
                error=None,
            )
            self._save(self.state.replace(applying))
            self._say()
            try:
                machine.apply(stage)
                return
            except ConfinferError as exc:
                if exc.reason.kind not in RETRYABLE or applying.attempts >= MAX_ATTEMPTS:
                    raise
                wait = BACKOFF_S[min(applying.attempts, len(BACKOFF_S)) - 1]
                log.warning(
                    "%s: attempt %d of %d failed: %s; again in %g s",
                    stage.name, applying.attempts, MAX_ATTEMPTS, exc.one_line(), wait,
                )  # fmt: skip
                self.sleep(wait)

    def _check(self, machine: Machine, stage: Stage) -> Check:
        for attempt in range(1, CHECK_TRIES + 1):
            try:
                return machine.check(stage)
            except ConfinferError as exc:
                if exc.reason.kind not in RETRYABLE or attempt == CHECK_TRIES:
                    raise
                wait = BACKOFF_S[min(attempt, len(BACKOFF_S)) - 1]
                log.warning("%s: check failed: %s; again in %g s", stage.name, exc.one_line(), wait)
                self.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def _rebooting(self, stage: Stage, boot: str) -> None:
        record = self._stamped(self.state.record(stage.name), boot)
        self._save(self.state.replace(dataclasses.replace(record, status=Status.REBOOTING)))
        raise _Reboot

    def _reboot(self, stage: Stage) -> None:
        """Ask for the reboot the state file records, and wait for the shutdown. A failure here
        leaves the stage ``rebooting``: the next run asks again, or verifies it after a boot."""
        self._say()
        self._machine(stage).before_reboot()
        try:
            self.reboot()
        except Interrupted:
            return  # the shutdown's SIGTERM came before systemctl returned: as it should
        if not self.wait_for_shutdown(REBOOT_WAIT_S):
            raise ConfinferError(
                f"asked for a reboot ({stage.name}), and the machine is still up after "
                f"{REBOOT_WAIT_S:g} s",
                reason=Reason.ONBOARD_REBOOT_TIMEOUT,
                hint="reboot it (`systemctl reboot`); onboarding goes on at the next boot",
            )

    def _done(self, stage: Stage, boot: str, why: str) -> None:
        record = dataclasses.replace(
            self._stamped(self.state.record(stage.name), boot),
            status=Status.DONE,
            reason=None,
            error=None,
        )
        self._save(self.state.replace(record))
        index = INDEX[stage.name]
        log.info("onboarding %d/%d %s: done (%s)", index, len(STAGES), stage.name,
                 printable(why, 300))  # fmt: skip

    def _stamped(self, record: Record, boot: str) -> Record:
        return dataclasses.replace(record, boot_id=boot, since=self.clock())

    def _save(self, state: State) -> None:
        self.store.save(state)
        self._state = state

    def _say(self) -> None:
        line = self.state.progress().line
        log.info("%s", line)
        self.status(line)


__all__ = [
    "TARGET",
    "Appliance",
    "Check",
    "Effect",
    "Machine",
    "Onboarding",
    "Outcome",
    "TestbedMachine",
    "cc_mode_check",
    "wait_for_shutdown",
]
