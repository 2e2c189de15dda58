"""A rig for onboarding's stage machine (confinfer/onboard.py) in one process.

The machine is the real :class:`~confinfer.onboard.TestbedMachine`; the commands it runs
(``python -m testbed onboard ...``) are handed to the testbed's own ``main`` in this process
instead of a subprocess, so the strict stand-ins of testbed/onboard.py answer and log every call.
``systemctl`` is a recorder. Boots are boot-id files the test changes; the reboot is a recorder
too; a crash is :class:`Crash`, raised from wrappers around the state file and the machine.
"""

from __future__ import annotations

import contextlib
import io
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from confinfer.onboard import (
    TARGET,
    Appliance,
    Check,
    Machine,
    Onboarding,
    Outcome,
    TestbedMachine,
)
from confinfer.onboard_commands import COMMAND_TIMEOUT_S, Completed
from confinfer.onboard_state import Stage, State, StateFile, read_boot_id
from testbed import onboard as standins
from testbed.__main__ import main as testbed_main

NOW = 1_764_000_000.0


class Crash(BaseException):
    """The process dies here (not an Exception: nothing in the product catches it)."""


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.state_dir = tmp / "state"
        self.standins = self.state_dir / "testbed"
        self.boot_file = tmp / "boot_id"
        self.boots: list[str] = []
        self.new_boot()
        self.store = StateFile(self.state_dir / "onboard.json")
        self.systemctl: list[list[str]] = []
        self.enabled = False
        self.statuses: list[str] = []
        self.ready: list[str] = []
        self.sleeps: list[float] = []
        self.reboots: list[str] = []  # the boot each reboot was asked for in
        self.crash_on_reboot = False
        self.shutdown_comes = True

    @property
    def boot(self) -> str:
        return self.boots[-1]

    def new_boot(self) -> None:
        self.boots.append(str(uuid.uuid4()))
        self.boot_file.write_text(self.boots[-1] + "\n", encoding="ascii")

    def testbed(self, *words: str) -> Completed:
        """``python -m testbed onboard --dir <stand-ins> WORDS`` in this process."""
        return self.run_command(
            [sys.executable, "-m", "testbed", "onboard", "--dir", str(self.standins),
             "--boot-id-file", str(self.boot_file), *words]
        )  # fmt: skip

    def run_command(
        self,
        argv: Sequence[str],
        *,
        capture: bool = False,
        env: Mapping[str, str] | None = None,
        timeout: float = COMMAND_TIMEOUT_S,
    ) -> Completed:
        argv = list(argv)
        if argv[:3] == [sys.executable, "-m", "testbed"]:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = testbed_main(argv[3:])
            return Completed(code, out.getvalue(), err.getvalue())
        if argv[0] == "systemctl":
            self.systemctl.append(argv[1:])
            if argv[1:] == ["is-enabled", TARGET]:
                said = "enabled\n" if self.enabled else "disabled\n"
                return Completed(0 if self.enabled else 1, said, "")
            if argv[1:] == ["enable", "--now", "--no-block", TARGET]:
                self.enabled = True
                return Completed(0, "", "")
        raise AssertionError(f"unexpected command: {argv}")

    def machine(self) -> TestbedMachine:
        return TestbedMachine(
            self.run_command,
            self.standins,
            boot_id_file=self.boot_file,
            state_file=self.store.path,
        )

    def onboarding(
        self, *, store: StateFile | None = None, machine: Machine | None = None
    ) -> Onboarding:
        return Onboarding(
            store=store or self.store,
            machine=machine or self.machine(),
            appliance=Appliance(self.run_command),
            hardware="testbed",
            boot_id=lambda: read_boot_id(self.boot_file),
            reboot=self._reboot,
            wait_for_shutdown=lambda timeout_s: self.shutdown_comes,
            status=self.statuses.append,
            ready=self.ready.append,
            sleep=self.sleeps.append,
            clock=lambda: NOW,
        )

    def _reboot(self) -> None:
        self.reboots.append(self.boot)
        if self.crash_on_reboot:
            self.crash_on_reboot = False
            raise Crash("after the reboot request, before the reboot")

    def run(self, **kwargs: Any) -> Outcome:
        return self.onboarding(**kwargs).run()

    def drive(self, *, runs: int = 12, **kwargs: Any) -> int:
        """Run, reboot when asked, until done; returns the number of runs."""
        for count in range(1, runs + 1):
            if self.onboarding(**kwargs).run() is Outcome.DONE:
                return count
            self.new_boot()
        raise AssertionError(f"not done after {runs} runs")

    def state(self) -> State:
        state = self.store.load()
        assert state is not None
        return state

    def log(self) -> list[dict[str, Any]]:
        return standins.entries(self.standins)

    def applies(self) -> Counter[str]:
        return Counter(e["stage"] for e in self.log() if e["op"] == "apply" and e["result"] == "ok")

    def violations(self) -> list[dict[str, Any]]:
        return [e for e in self.log() if e.get("violation")]


class CrashingStore(StateFile):
    """The state file, dying once before or after the first write that ``when`` matches."""

    def __init__(self, path: Path, when: Callable[[State], bool], *, after: bool) -> None:
        super().__init__(path)
        self.when = when
        self.after = after
        self.armed = True

    def save(self, state: State) -> None:
        hit = self.armed and self.when(state)
        if hit and not self.after:
            self.armed = False
            raise Crash("before the state write")
        super().save(state)
        if hit and self.after:
            self.armed = False
            raise Crash("after the state write")


class CrashingMachine:
    """The machine, dying once before or after applying ``stage``."""

    def __init__(self, inner: Machine, stage: str, *, after: bool, times: int = 1) -> None:
        self.inner = inner
        self.stage = stage
        self.after = after
        self.times = times

    def check(self, stage: Stage) -> Check:
        return self.inner.check(stage)

    def apply(self, stage: Stage) -> None:
        hit = stage.name == self.stage and self.times > 0
        if hit:
            self.times -= 1
        if hit and not self.after:
            raise Crash("before the apply")
        self.inner.apply(stage)
        if hit and self.after:
            raise Crash("after the apply")

    def before_reboot(self) -> None:
        self.inner.before_reboot()


__all__ = ["NOW", "Crash", "CrashingMachine", "CrashingStore", "Rig"]
