"""Onboarding's stages and its durable state (confinfer/onboard.py runs them).

**The state file** (``/var/lib/confinfer/onboard.json``, :class:`StateFile`) is written atomically
(a temporary file, fsync, rename, fsync of the directory) before and after every step::

    {"version": 1, "hardware": "azure",
     "stages": [{"name": "kernel", "status": "done", "attempts": 1,
                 "boot_id": "<boot of the last change>", "since": <unix time of it>,
                 "reason": null, "error": null}, ...]}

One entry per stage, in order; ``status`` is ``pending``, ``applying``, ``rebooting``, ``done``
or ``failed`` (with ``reason``, a slug of confinfer.errors.Reason, and ``error``, its line).
It is read strictly: anything else is ``onboard-state-invalid``. ``confinfer status`` and
``confinfer onboard status`` read it too, without root.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confinfer.config import ONBOARD_HARDWARE
from confinfer.errors import ConfinferError, Reason, printable

STATE_DIR = Path("/var/lib/confinfer")
STATE_NAME = "onboard.json"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
FORMAT_VERSION = 1
MAX_ATTEMPTS = 3  # applies per stage, across retries and crashes, until `run --retry`
MAX_STATE_BYTES = 1 << 20

_BOOT_ID_RE = re.compile(r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}")


class Status(enum.StrEnum):
    PENDING = "pending"
    APPLYING = "applying"
    REBOOTING = "rebooting"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    reboots: bool
    applying: str  # "installing" in "driver: installing (attempt 1 of 3)"
    applied: str  # "installed" in "driver: installed, rebooting"


STAGES: tuple[Stage, ...] = (
    Stage("kernel", "kernel preparation", True, "upgrading", "upgraded"),
    Stage("driver", "NVIDIA driver in CC mode", True, "installing", "installed"),
    Stage("cc-mode", "confidential-computing mode check", False, "checking", "checked"),
    Stage("gpu-tools", "GPU tools (nvattest)", False, "installing", "installed"),
    Stage("container-toolkit", "NVIDIA container toolkit", False, "installing", "installed"),
    Stage("appliance", "the appliance (confinfer.target)", False, "starting", "started"),
)
BY_NAME: Mapping[str, Stage] = {s.name: s for s in STAGES}
INDEX: Mapping[str, int] = {s.name: i for i, s in enumerate(STAGES, 1)}


# --- the state file ------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One stage's entry in the state file."""

    name: str
    status: Status = Status.PENDING
    attempts: int = 0
    boot_id: str | None = None
    since: float | None = None
    reason: Reason | None = None
    error: str | None = None

    def to_obj(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status.value,
            "attempts": self.attempts,
            "boot_id": self.boot_id,
            "since": self.since,
            "reason": None if self.reason is None else self.reason.value,
            "error": self.error,
        }


@dataclass(frozen=True)
class Progress:
    """Where onboarding stands, for ``STATUS=``, ``confinfer onboard status`` and ``status``."""

    state: str  # "done", "failed" or "in-progress"
    index: int  # the stage it is at (1-based); len(STAGES) when done
    line: str


@dataclass(frozen=True)
class State:
    hardware: str
    records: tuple[Record, ...]

    @classmethod
    def new(cls, hardware: str) -> State:
        return cls(hardware, tuple(Record(s.name) for s in STAGES))

    def record(self, name: str) -> Record:
        return next(r for r in self.records if r.name == name)

    def replace(self, record: Record) -> State:
        return dataclasses.replace(
            self, records=tuple(record if r.name == record.name else r for r in self.records)
        )

    def retried(self) -> State:
        """Failed stages (and ones out of attempts) back to pending, their attempts reset."""
        out = self
        for r in self.records:
            if r.status is Status.FAILED or (
                r.status is Status.APPLYING and r.attempts >= MAX_ATTEMPTS
            ):
                out = out.replace(Record(r.name, since=r.since, boot_id=r.boot_id))
        return out

    def progress(self) -> Progress:
        total = len(STAGES)
        for index, record in enumerate(self.records, 1):
            if record.status is not Status.DONE:
                state = "failed" if record.status is Status.FAILED else "in-progress"
                return Progress(state, index, f"onboarding {index}/{total} {describe(record)}")
        return Progress("done", total, f"onboarding done: {total}/{total} stages")

    def to_obj(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "hardware": self.hardware,
            "stages": [r.to_obj() for r in self.records],
        }

    @classmethod
    def from_obj(cls, obj: object, origin: str) -> State:
        def bad(why: str) -> ConfinferError:
            return ConfinferError(
                f"{origin}: {why}",
                reason=Reason.ONBOARD_STATE_INVALID,
                hint="move the file aside: the next run checks every stage again and applies "
                "only what is not in place",
            )

        if not isinstance(obj, dict) or obj.get("version") != FORMAT_VERSION:
            raise bad(f"not an onboarding state of version {FORMAT_VERSION}")
        hardware = obj.get("hardware")
        if hardware not in ONBOARD_HARDWARE:
            raise bad(f"unknown hardware {printable(hardware, 40)!r}")
        stages = obj.get("stages")
        if not isinstance(stages, list):
            raise bad("'stages' is not a list")
        seen: dict[str, Record] = {}
        for item in stages:
            record = _record(item, bad)
            if record.name in seen:
                raise bad(f"stage {record.name} appears twice")
            seen[record.name] = record
        # Stages this version added since the file was written are pending.
        return cls(str(hardware), tuple(seen.get(s.name, Record(s.name)) for s in STAGES))


def _record(item: object, bad: Callable[[str], ConfinferError]) -> Record:
    if not isinstance(item, dict):
        raise bad("a stage is not an object")
    name = item.get("name")
    if not isinstance(name, str) or name not in BY_NAME:
        raise bad(f"unknown stage {printable(name, 40)!r}")
    try:
        status = Status(str(item.get("status")))
    except ValueError:
        raise bad(f"stage {name}: unknown status {printable(item.get('status'), 40)!r}") from None
    attempts = item.get("attempts", 0)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or not 0 <= attempts <= 1000:
        raise bad(f"stage {name}: attempts is not a count")
    boot_id = item.get("boot_id")
    if boot_id is not None and not (isinstance(boot_id, str) and _BOOT_ID_RE.fullmatch(boot_id)):
        raise bad(f"stage {name}: boot_id is not a boot id")
    since = item.get("since")
    if since is not None and (isinstance(since, bool) or not isinstance(since, int | float)):
        raise bad(f"stage {name}: since is not a time")
    reason_text = item.get("reason")
    try:
        reason = None if reason_text is None else Reason(reason_text)
    except ValueError:
        raise bad(f"stage {name}: unknown reason {printable(reason_text, 60)!r}") from None
    error = item.get("error")
    if error is not None and not isinstance(error, str):
        raise bad(f"stage {name}: error is not a string")
    if status is Status.FAILED and reason is None:
        raise bad(f"stage {name}: failed without a reason")
    return Record(
        name,
        status,
        attempts,
        boot_id,
        None if since is None else float(since),
        reason,
        None if error is None else error[:4000],
    )


def describe(record: Record) -> str:
    """``driver: installed, rebooting``: the record as the stage's part of a status line."""
    stage = BY_NAME[record.name]
    match record.status:
        case Status.PENDING:
            what = "pending"
        case Status.APPLYING:
            what = f"{stage.applying} (attempt {record.attempts} of {MAX_ATTEMPTS})"
        case Status.REBOOTING:
            what = f"{stage.applied}, rebooting"
        case Status.DONE:
            what = "done"
        case Status.FAILED:
            what = f"failed ({record.reason}): {printable(record.error or '', 300)}"
    return f"{stage.name}: {what}"


class StateFile:
    """The durable state: read strictly, written atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> State | None:
        """The state, or None when onboarding has not started (no file)."""
        try:
            with self.path.open("rb") as stream:
                data = stream.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfinferError(
                f"cannot read {self.path}: {exc.strerror}", reason=Reason.ONBOARD_STATE_INVALID
            ) from None
        if len(data) > MAX_STATE_BYTES:
            raise ConfinferError(
                f"{self.path}: larger than 1 MiB", reason=Reason.ONBOARD_STATE_INVALID
            )
        try:
            obj = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError):
            obj = None
        return State.from_obj(obj, str(self.path))

    def save(self, state: State) -> None:
        """Replace the file: the new state is whole on disk before the name points at it."""
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(state.to_obj(), indent=1) + "\n").encode("utf-8")
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=directory)
        try:
            with os.fdopen(fd, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
            os.chmod(tmp, 0o644)  # status is for everyone; nothing in it is secret
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power loss
        finally:
            os.close(dir_fd)


def read_boot_id(path: Path = BOOT_ID) -> str:
    """This boot's id (a new one at every boot, /proc/sys/kernel/random/boot_id)."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not ASCII"
        raise ConfinferError(
            f"cannot read the boot id from {path}: {why}", reason=Reason.ONBOARD_STATE_INVALID
        ) from None
    if not _BOOT_ID_RE.fullmatch(text):
        raise ConfinferError(
            f"{path} does not hold a boot id: {printable(text, 60)!r}",
            reason=Reason.ONBOARD_STATE_INVALID,
        )
    return text


def progress_obj(state: State) -> dict[str, Any]:
    """The state for ``--format json``: the file's content plus where it stands."""
    progress = state.progress()
    stages = []
    for index, (stage, record) in enumerate(zip(STAGES, state.records, strict=True), 1):
        stages.append({"index": index, "title": stage.title, **record.to_obj()})
    return {
        "state": progress.state,
        "line": progress.line,
        "hardware": state.hardware,
        "stages": stages,
    }


__all__ = [
    "BY_NAME",
    "INDEX",
    "MAX_ATTEMPTS",
    "STAGES",
    "STATE_DIR",
    "STATE_NAME",
    "Progress",
    "Record",
    "Stage",
    "State",
    "StateFile",
    "Status",
    "describe",
    "progress_obj",
    "read_boot_id",
]
