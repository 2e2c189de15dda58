"""What a running testbed leaves in its directory: ``testbed.env``, ports and process records.

- ``vm-id``: the VM's id (a GUID), made once per directory and kept across ``up``s.
- ``testbed.env``: shell-sourceable ``export K=V`` lines (values shell-quoted), read back by
  :func:`read_env_file` (tests) or ``source`` (scripts).
- ``run/services.json``: the services process's pid and ports, written by that process once
  every listener is up (its existence is the readiness signal).
- ``run/processes.json``: every process ``up`` started, with the kernel's start time so that
  ``down`` never signals an unrelated process that reused a pid.
"""

from __future__ import annotations

import json
import os
import shlex
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ENV_FILE = "testbed.env"
VM_ID_FILE = "vm-id"
RUN_DIR = "run"
SERVICES_FILE = "services.json"
PROCESSES_FILE = "processes.json"


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file and rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def vm_id(directory: Path) -> str:
    """This testbed directory's VM id: a lowercase GUID made once and kept in ``DIR/vm-id``
    across ``up``s (a VM keeps its id when it reboots). IMDS serves it as ``compute.vmId``; the
    vTPM's HCL runtime data carries it uppercase as ``vmUniqueId``."""
    path = directory / VM_ID_FILE
    try:
        return str(uuid.UUID(path.read_text(encoding="ascii").strip()))
    except (FileNotFoundError, ValueError):
        pass
    value = str(uuid.uuid4())
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(value + "\n", encoding="ascii")
    os.replace(tmp, path)
    return value


def write_env_file(path: Path, values: Mapping[str, str]) -> None:
    lines = ["# written by `python -m testbed up`; source it to point confinfer at the testbed"]
    for key, value in values.items():
        if not key.isidentifier():
            raise ValueError(f"not a variable name: {key!r}")
        lines.append(f"export {key}={shlex.quote(value)}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_env_file(path: Path) -> dict[str, str]:
    """Parse the ``export K=V`` lines of a testbed.env file."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        words = shlex.split(line)
        if len(words) != 2 or words[0] != "export" or "=" not in words[1]:
            raise ValueError(f"{path}:{number}: expected `export KEY=VALUE`")
        key, _, value = words[1].partition("=")
        values[key] = value
    return values


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[19])  # field 22 of stat(5); the first two fields precede this slice


def proc_state(pid: int) -> str | None:
    """The one-letter state of stat(5) ('R', 'S', 'Z', ...), or None if there is no such pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat[stat.rfind(")") + 2 :].split()[0]


@dataclass(frozen=True)
class ProcessRecord:
    name: str
    pid: int
    start: int | None  # from /proc/<pid>/stat when recorded

    @classmethod
    def of(cls, name: str, pid: int) -> ProcessRecord:
        return cls(name, pid, proc_start_time(pid))

    def alive(self) -> bool:
        """True while the recorded process (not a successor with the same pid) runs."""
        state = proc_state(self.pid)
        if state is None or state in ("Z", "X"):
            return False
        return self.start is None or proc_start_time(self.pid) == self.start


class RunRecords:
    """The ``run/`` folder of one testbed directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.run = directory / RUN_DIR

    @property
    def services_file(self) -> Path:
        return self.run / SERVICES_FILE

    @property
    def inputs_marker(self) -> Path:
        """Written by ``up`` once the trust and identities the services load are complete."""
        return self.run / "inputs.ready"

    @property
    def processes_file(self) -> Path:
        return self.run / PROCESSES_FILE

    def processes(self) -> list[ProcessRecord]:
        try:
            data = json.loads(self.processes_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        return [ProcessRecord(**item) for item in data]

    def add(self, *records: ProcessRecord) -> None:
        current = self.processes()
        write_json(self.processes_file, [asdict(r) for r in (*current, *records)])

    def remove(self, records: list[ProcessRecord]) -> None:
        gone = {(r.name, r.pid) for r in records}
        left = [r for r in self.processes() if (r.name, r.pid) not in gone]
        if left:
            write_json(self.processes_file, [asdict(r) for r in left])
        else:
            self.processes_file.unlink(missing_ok=True)

    def services(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self.services_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        return data
