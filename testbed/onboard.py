"""Stand-ins for the hardware side of onboarding: what each of ``confinfer onboard``'s stages does
to an Azure NCC H100 v5 VM, simulated in a directory, and strictly.

With ``onboard_hardware = "testbed"`` onboarding calls these instead of apt, dpkg and
nvidia-smi, as ``python -m testbed onboard --dir D [--boot-id-file F] WORDS...``:

  check STAGE             print ``absent|pending-reboot|in-place: <why>`` for the stage
  apply STAGE             simulate the stage's effect (recorded in D/machine.json)
  reboot --state-file S   the gate before onboarding's ``systemctl reboot`` (below)
  nvidia-smi ARGS...      ``conf-compute -f``, ``-e`` and ``-grs`` answered as nvidia-smi does
  set KEY=VALUE...        cc=on|off, environment=production|simulation, fail=STAGE:N (the next
                          N applies of STAGE fail), lose=STAGE (its effect is gone after the
                          next reboot), clear=STAGE (forget that STAGE was applied)
  log                     print the invocation log

The stages are ``kernel`` and ``driver`` (each takes effect only after a reboot: a new boot id),
``cc-mode`` (nothing to apply; nvidia-smi answers from ``cc`` and ``environment``),
``gpu-tools`` and ``container-toolkit``. The appliance stage is real systemd, not simulated.

Strict, like the machine it stands for and stricter: every invocation goes to D/log.jsonl (one
JSON object a line: ``seq``, ``op``, ``stage``, ``boot_id``, ``result`` and, for a refusal,
``reason`` and ``violation``), so a test can assert that nothing ran twice. These are refused,
logged as violations, with exit status 1 and ``testbed: <reason>: <message>``:

- applying a stage that was applied already (``onboard-applied-twice``), whatever boot it was;
- applying a stage before the stages it needs are in effect, or while a stage waits for its
  reboot (``onboard-out-of-order``, ``onboard-reboot-pending``); nvidia-smi without a loaded
  driver fails as the real one does (exit 9);
- a reboot that onboarding's state file does not record first: the file (S) must hold exactly
  one stage ``rebooting`` with this boot's id, and that stage must be one applied in this boot
  (``onboard-reboot-unrecorded``);
- ``nvidia-smi conf-compute -srs`` in any form (``onboard-ready-state-forbidden``): onboarding
  never sets the GPU ready state; attestd does, after attestation.

The testbed imports nothing of confinfer: the stage names and the state file's fields
(``stages[].name``, ``status``, ``boot_id``) are read as the wire format they are.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
MACHINE = "machine.json"
LOG = "log.jsonl"
REBOOT_STAGES = ("kernel", "driver")
STAGES = ("kernel", "driver", "cc-mode", "gpu-tools", "container-toolkit")
# What each stage needs in effect before it is applied.
NEEDS = {
    "kernel": (),
    "driver": ("kernel",),
    "cc-mode": ("driver",),
    "gpu-tools": ("driver",),
    "container-toolkit": ("driver",),
}
NO_DRIVER = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure "
    "that the latest NVIDIA driver is installed and running."
)
EXIT_NO_DRIVER = 9


class StandInError(Exception):
    """A refusal or an injected failure; ``reason`` is the slug printed with it."""

    def __init__(self, message: str, *, reason: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.reason = reason
        self.exit_code = exit_code


class Bed:
    """The simulated machine in ``directory``: its state and its invocation log."""

    def __init__(self, directory: Path, boot_id_file: Path) -> None:
        self.dir = directory
        self.boot_id_file = boot_id_file
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def boot_id(self) -> str:
        text = self.boot_id_file.read_text(encoding="ascii").strip()
        if not re.fullmatch(r"[0-9a-f-]{32,36}", text):
            raise StandInError(f"{self.boot_id_file}: not a boot id", reason="onboard-boot-id")
        return text

    def state(self) -> dict[str, Any]:
        try:
            loaded: dict[str, Any] = json.loads((self.dir / MACHINE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            loaded = {}
        loaded.setdefault("applied", {})
        loaded.setdefault("cc", "on")
        loaded.setdefault("environment", "production")
        loaded.setdefault("fail", {})
        loaded.setdefault("lose", [])
        return loaded

    def save(self, state: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".machine.", dir=self.dir)
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            json.dump(state, stream, indent=1, sort_keys=True)
        os.replace(tmp, self.dir / MACHINE)

    def entries(self) -> list[dict[str, Any]]:
        return entries(self.dir)

    def record(self, op: str, stage: str | None, result: str, **more: Any) -> None:
        entry = {
            "seq": len(self.entries()) + 1,
            "op": op,
            "stage": stage,
            "boot_id": self.boot_id,
            "result": result,
            "at": time.time(),
            **more,
        }
        with (self.dir / LOG).open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(entry, sort_keys=True) + "\n")

    def refuse(self, op: str, stage: str | None, reason: str, message: str) -> StandInError:
        self.record(op, stage, "refused", reason=reason, violation=True, why=message)
        return StandInError(message, reason=reason)

    # What the machine looks like.

    def effect(self, state: dict[str, Any], stage: str) -> tuple[str, str]:
        applied = state["applied"].get(stage)
        if applied is None:
            return "absent", "not applied"
        if stage not in REBOOT_STAGES:
            return "in-place", f"applied in boot {applied['boot_id']}"
        if applied["boot_id"] == self.boot_id:
            return "pending-reboot", "applied in this boot; takes effect after a reboot"
        if stage in state["lose"]:
            return "absent", "applied, but gone after the reboot"
        return "in-place", f"applied in boot {applied['boot_id']}, running since a reboot"

    def in_effect(self, state: dict[str, Any], stage: str) -> bool:
        return self.effect(state, stage)[0] == "in-place"


def check(bed: Bed, stage: str) -> int:
    if stage == "cc-mode":
        raise bed.refuse(
            "check", stage, "onboard-unknown-command", "cc-mode is read through nvidia-smi"
        )
    word, why = bed.effect(bed.state(), stage)
    bed.record("check", stage, "ok", effect=word)
    print(f"{word}: {why}")
    return 0


def apply(bed: Bed, stage: str) -> int:
    state = bed.state()
    if stage == "cc-mode":
        raise bed.refuse("apply", stage, "onboard-unknown-command", "cc-mode has nothing to apply")
    if stage in state["applied"]:
        raise bed.refuse("apply", stage, "onboard-applied-twice", f"{stage} was applied already")
    pending = [s for s in REBOOT_STAGES if bed.effect(state, s)[0] == "pending-reboot"]
    if pending:
        raise bed.refuse(
            "apply", stage, "onboard-reboot-pending", f"{pending[0]} waits for its reboot"
        )
    missing = [s for s in NEEDS[stage] if not bed.in_effect(state, s)]
    if missing:
        raise bed.refuse(
            "apply", stage, "onboard-out-of-order", f"{stage} needs {missing[0]} in effect first"
        )
    left = int(state["fail"].get(stage, 0))
    if left > 0:
        state["fail"][stage] = left - 1
        bed.save(state)
        bed.record("apply", stage, "failed", reason="onboard-injected-failure")
        raise StandInError(f"{stage}: injected failure", reason="onboard-injected-failure")
    state["applied"][stage] = {"boot_id": bed.boot_id, "at": time.time()}
    bed.save(state)
    bed.record("apply", stage, "ok")
    return 0


def reboot(bed: Bed, state_file: Path) -> int:
    try:
        recorded = json.loads(state_file.read_text(encoding="utf-8"))
        stages = recorded["stages"]
        rebooting = [
            s["name"]
            for s in stages
            if s.get("status") == "rebooting" and s.get("boot_id") == bed.boot_id
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise bed.refuse(
            "reboot", None, "onboard-reboot-unrecorded", f"{state_file}: unreadable ({exc})"
        ) from None
    if len(rebooting) != 1:
        raise bed.refuse(
            "reboot",
            None,
            "onboard-reboot-unrecorded",
            f"{state_file} records {len(rebooting)} stages rebooting in this boot, not one",
        )
    stage = rebooting[0]
    if bed.effect(bed.state(), stage)[0] != "pending-reboot":
        raise bed.refuse(
            "reboot", stage, "onboard-reboot-unrecorded", f"{stage} was not applied in this boot"
        )
    bed.record("reboot", stage, "ok")
    return 0


def nvidia_smi(bed: Bed, args: list[str]) -> int:
    state = bed.state()
    if any(a.startswith("-srs") or a == "--set-ready-state" for a in args):
        raise bed.refuse(
            "nvidia-smi",
            None,
            "onboard-ready-state-forbidden",
            "the GPU ready state is attestd's to set, after attestation",
        )
    if not bed.in_effect(state, "driver"):
        bed.record("nvidia-smi", None, "failed", args=args)
        print(NO_DRIVER)
        return EXIT_NO_DRIVER
    answers = {
        ("conf-compute", "-f"): f"CC status: {state['cc'].upper()}",
        ("conf-compute", "-e"): f"CC Environment: {state['environment'].upper()}",
        ("conf-compute", "-grs"): "Confidential Compute GPUs Ready state: not-ready",
    }
    answer = answers.get((args[0], args[1])) if len(args) == 2 else None
    if answer is None:
        raise bed.refuse(
            "nvidia-smi", None, "onboard-unknown-command", f"not simulated: {' '.join(args)}"
        )
    bed.record("nvidia-smi", None, "ok", args=args)
    print(answer)
    return 0


def set_values(bed: Bed, assignments: list[str]) -> int:
    state = bed.state()
    for item in assignments:
        key, _, value = item.partition("=")
        if key == "cc" and value in ("on", "off"):
            state["cc"] = value
        elif key == "environment" and value in ("production", "simulation"):
            state["environment"] = value
        elif (
            key == "fail"
            and value.partition(":")[0] in STAGES
            and value.partition(":")[2].isdigit()
        ):
            stage, _, count = value.partition(":")
            state["fail"][stage] = int(count)
        elif key == "lose" and value in REBOOT_STAGES:
            state["lose"] = sorted({*state["lose"], value})
        elif key == "clear" and value in STAGES:
            state["applied"].pop(value, None)
        else:
            raise StandInError(f"cannot set {item!r}", reason="onboard-bad-setting")
    bed.save(state)
    bed.record("set", None, "ok", assignments=assignments)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m testbed onboard --dir D [--boot-id-file F]")
    sub = top.add_subparsers(dest="op", required=True)
    for name in ("check", "apply"):
        sub.add_parser(name).add_argument("stage", choices=STAGES)
    sub.add_parser("reboot").add_argument("--state-file", type=Path, required=True)
    sub.add_parser("nvidia-smi").add_argument("args", nargs=argparse.REMAINDER)
    sub.add_parser("set").add_argument("assignments", nargs="+", metavar="KEY=VALUE")
    sub.add_parser("log")
    return top


def main(directory: Path, words: list[str], boot_id_file: Path = BOOT_ID) -> int:
    """``python -m testbed onboard --dir DIRECTORY WORDS...``; refusals raise StandInError."""
    if words[:1] == ["nvidia-smi"]:  # its arguments are nvidia-smi's, options included
        return nvidia_smi(Bed(directory, boot_id_file), words[1:])
    args = parser().parse_args(words)
    bed = Bed(directory, boot_id_file)
    match args.op:
        case "check":
            return check(bed, args.stage)
        case "apply":
            return apply(bed, args.stage)
        case "reboot":
            return reboot(bed, args.state_file)
        case "nvidia-smi":
            return nvidia_smi(bed, list(args.args))
        case "set":
            return set_values(bed, args.assignments)
        case _:
            for entry in bed.entries():
                print(json.dumps(entry, sort_keys=True))
            return 0


def entries(directory: Path) -> list[dict[str, Any]]:
    """The invocation log of the stand-ins in ``directory`` (for tests)."""
    try:
        text = (directory / LOG).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
