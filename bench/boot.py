"""Boot to serving and revocation, timed from one boot of the appliance under real systemd.

  .venv/bin/python -m bench.boot [--json PATH] [--target-s 1.0]

It runs the system test ``tests/system/test_boot_to_serving.py`` (its first three tests: the
boot to a chat completion, an attestd restart, and the GPU's CC mode turned off), which boots
the units of ``systemd/`` in an nspawn machine with the Docker engine, the real vLLM CPU engine,
Caddy and the testbed, and writes the machine's journal (``journalctl -o json``) and the
moments it acted on (start, first token, CC off) to a directory. This module reads them:

- per stage of the boot: attestd ready (``Starting`` to ``Started attestd.service``, the first
  full attestation pass), the key release (SKR, the loader's own measure), the unseal, the
  engine ready (``Starting`` to ``Started vllm.service``), the first token (a streamed chat
  completion through Caddy, from the engine ready to the first content chunk) and the whole
  boot (``confinfer.target`` started to that first token);
- revocation: from attestd's ``state=revoked`` line to the tmpfs unmounted (model-loader's
  wipe) and to the container gone (vllm-supervisor's kill), the larger of the two against
  ``--target-s`` (1 s), and when systemd had stopped vllm.service. The time from CC off to
  attestd's event (its fast-check interval, 0.5 s in the test) is shown apart.

Every timestamp is CLOCK_MONOTONIC: the journal's inside the machine and the test's on the host
are the same clock (one kernel). The exit status is 0 when the revocation meets the target.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ENV_DIR = "CONFINFER_BENCH_BOOT_DIR"  # where the system test writes what this module reads
JOURNAL_FILE = "journal.json"
MARKS_FILE = "marks.json"
TESTS = "serves_a_chat_completion or attestd_restart or cc_off"


@dataclass(frozen=True)
class Record:
    """One journal entry: when (CLOCK_MONOTONIC, seconds), whose, what."""

    at: float
    unit: str  # the unit it is about (systemd's own lines) or from (the service's lines)
    pid1: bool  # systemd's own line about the unit
    message: str


def parse_journal(lines: Iterable[str]) -> list[Record]:
    """The records of ``journalctl -o json`` output; lines that are not entries are skipped."""
    out = []
    for line in lines:
        try:
            entry = json.loads(line)
            at = int(entry["__MONOTONIC_TIMESTAMP"]) / 1e6
        except (ValueError, KeyError, TypeError):
            continue
        message = entry.get("MESSAGE")
        if not isinstance(message, str):
            continue
        pid1 = entry.get("_PID") == "1" and isinstance(entry.get("UNIT"), str)
        unit = entry["UNIT"] if pid1 else entry.get("_SYSTEMD_UNIT", "")
        out.append(Record(at, unit if isinstance(unit, str) else "", pid1, message))
    return sorted(out, key=lambda r: r.at)


class Journal:
    def __init__(self, records: Sequence[Record]) -> None:
        self.records = records

    def first(self, unit: str, prefix: str, *, pid1: bool, after: float = 0.0) -> Record:
        for r in self.records:
            if r.at >= after and r.unit == unit and r.pid1 == pid1 and prefix in r.message:
                return r
        raise LookupError(f"no {'systemd' if pid1 else unit} line with {prefix!r} for {unit}")

    def last(self, unit: str, prefix: str, *, pid1: bool, before: float) -> Record:
        found = [
            r
            for r in self.records
            if r.at <= before and r.unit == unit and r.pid1 == pid1 and prefix in r.message
        ]
        if not found:
            raise LookupError(f"no {unit} line with {prefix!r} before {before:.3f}")
        return found[-1]


def _seconds_in(message: str, marker: str) -> float:
    """The number after ``marker`` in ``message`` (``... in 1.23 s``)."""
    rest = message.split(marker, 1)[1].strip()
    return float(rest.split()[0].rstrip(",;"))


def boot_stages(records: Sequence[Record], marks: dict[str, float]) -> dict[str, float]:
    """Seconds per stage of the boot that began at ``marks['start']``."""
    j = Journal(records)
    start = marks["start"]
    a0 = j.first("attestd.service", "Starting", pid1=True, after=start)
    a1 = j.first("attestd.service", "Started", pid1=True, after=a0.at)
    released = j.first("model-loader.service", "the key was released in", pid1=False, after=a1.at)
    ready = j.first("model-loader.service", "model ready: ", pid1=False, after=released.at)
    v0 = j.first("vllm.service", "Starting", pid1=True, after=ready.at)
    v1 = j.first("vllm.service", "Started", pid1=True, after=v0.at)
    return {
        "attestd_ready_s": a1.at - a0.at,
        "key_release_s": _seconds_in(released.message, "released in"),
        "unseal_s": _seconds_in(ready.message.replace("=", " "), "unseal_s"),
        "model_ready_after_attestd_s": ready.at - a1.at,
        "engine_ready_s": v1.at - v0.at,
        "first_token_s": marks["first_token"] - v1.at,
        "boot_to_first_token_s": marks["first_token"] - start,
    }


def revocation(records: Sequence[Record], marks: dict[str, float]) -> dict[str, float]:
    """Seconds from CC off (``marks['cc_off']``) and from attestd's revoked line."""
    j = Journal(records)
    off = marks["cc_off"]
    event = j.first("attestd.service", "state=revoked", pid1=False, after=off)
    wiped = j.first("model-loader.service", "model wiped and", pid1=False, after=event.at)
    killed = j.first("vllm.service", "serving container killed", pid1=False, after=event.at)
    stopped = j.first("vllm.service", "Stopped", pid1=True, after=event.at)
    return {
        "detect_s": event.at - off,
        "tmpfs_gone_s": wiped.at - event.at,
        "container_gone_s": killed.at - event.at,
        "revocation_s": max(wiped.at, killed.at) - event.at,
        "vllm_unit_stopped_s": stopped.at - event.at,
    }


def read(directory: Path) -> tuple[list[Record], dict[str, float]]:
    journal = (directory / JOURNAL_FILE).read_text(encoding="utf-8").splitlines()
    marks = json.loads((directory / MARKS_FILE).read_text(encoding="utf-8"))
    return parse_journal(journal), {k: float(v) for k, v in marks.items()}


def table(stages: dict[str, float], revoke: dict[str, float], target_s: float) -> str:
    rows = [
        ("attestd ready (first full attestation)", stages["attestd_ready_s"]),
        ("key release (SKR)", stages["key_release_s"]),
        ("unseal into the tmpfs", stages["unseal_s"]),
        ("  model ready, from attestd ready", stages["model_ready_after_attestd_s"]),
        ("engine ready (vLLM /health)", stages["engine_ready_s"]),
        ("first token, from engine ready", stages["first_token_s"]),
        ("boot: confinfer.target to first token", stages["boot_to_first_token_s"]),
        ("CC off to attestd's revoked event", revoke["detect_s"]),
        ("revoked event to tmpfs unmounted", revoke["tmpfs_gone_s"]),
        ("revoked event to container gone", revoke["container_gone_s"]),
        ("revoked event to vllm.service stopped", revoke["vllm_unit_stopped_s"]),
    ]
    lines = [f"{name:<42} {value:8.3f} s" for name, value in rows]
    took = revoke["revocation_s"]
    verdict = "PASS" if took <= target_s else "FAIL"
    lines.append(
        f"{'revocation (event to tmpfs and container gone)':<42} {took:8.3f} s  "
        f"= {took / target_s:.2f} x the {target_s:g} s target: {verdict}"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.boot", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--target-s", type=float, default=1.0, help="revocation target")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-boot.") as tmp:
        env = dict(os.environ, **{ENV_DIR: tmp})
        pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-s"]
        test = "tests/system/test_boot_to_serving.py"
        done = subprocess.run([*pytest, test, "-k", TESTS], cwd=ROOT, env=env, check=False)
        if done.returncode != 0:
            print(f"bench.boot: the system test failed (exit {done.returncode})", file=sys.stderr)
            return 1
        records, marks = read(Path(tmp))
    stages, revoke = boot_stages(records, marks), revocation(records, marks)
    print(table(stages, revoke, args.target_s))
    if args.json:
        doc: dict[str, Any] = {"boot": stages, "revocation": revoke, "target_s": args.target_s}
        args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 0 if revoke["revocation_s"] <= args.target_s else 1


if __name__ == "__main__":
    sys.exit(main())
