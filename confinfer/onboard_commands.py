"""Commands onboarding runs: argv lists (never a shell), a total deadline each, failures as one
line with the command, its exit status and its last stderr line (``onboard-command-failed``).
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from confinfer.errors import ConfinferError, Reason, printable

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 3600.0  # one apt run (a kernel upgrade, the driver) takes minutes


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str


class Runner(Protocol):
    def __call__(
        self,
        argv: Sequence[str],
        *,
        capture: bool = False,
        env: Mapping[str, str] | None = None,
        timeout: float = COMMAND_TIMEOUT_S,
    ) -> Completed: ...


def subprocess_runner(
    argv: Sequence[str],
    *,
    capture: bool = False,
    env: Mapping[str, str] | None = None,
    timeout: float = COMMAND_TIMEOUT_S,
) -> Completed:
    """Run ``argv`` (no shell). stdout goes to the journal unless ``capture``; stderr is kept
    for the failure line and then logged, escaped."""
    log.info("running %s", printable(shlex.join(argv), 1000))
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env=None if env is None else {**os.environ, **env},
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        return Completed(127, "", f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired:
        raise ConfinferError(
            f"`{printable(shlex.join(argv), 200)}` did not finish in {timeout:g} s",
            reason=Reason.ONBOARD_COMMAND_FAILED,
        ) from None
    for line in (done.stderr or "").splitlines()[-20:]:
        if line.strip():
            log.info("%s: %s", printable(Path(argv[0]).name, 40), printable(line, 500))
    return Completed(done.returncode, done.stdout or "", done.stderr or "")


def checked(
    run: Runner,
    argv: Sequence[str],
    *,
    capture: bool = False,
    env: Mapping[str, str] | None = None,
    timeout: float = COMMAND_TIMEOUT_S,
    reason: Reason = Reason.ONBOARD_COMMAND_FAILED,
) -> Completed:
    """``run`` that fails with ``reason`` (command, exit status, its last stderr line) unless the
    command exits 0."""
    done = run(argv, capture=capture, env=env, timeout=timeout)
    if done.returncode != 0:
        # nvidia-smi, among others, says why on stdout.
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()] or [
            line.strip() for line in done.stdout.splitlines() if line.strip()
        ]
        said = lines[-1] if lines else "no message"
        raise ConfinferError(
            f"`{printable(shlex.join(argv), 200)}` failed (exit {done.returncode}): "
            f"{printable(said, 300)}",
            reason=reason,
        )
    return done


__all__ = ["COMMAND_TIMEOUT_S", "Completed", "Runner", "checked", "subprocess_runner"]
