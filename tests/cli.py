"""The ``confinfer`` command as tests run it: a real process, and checks of how it ended.

- :func:`run_confinfer` runs ``python -m confinfer ARGS...`` to completion, output captured.
- :func:`assert_refused` checks an expected failure: its exit code, its stable reason and that it
  said so in one line (``hint:`` lines aside), with no traceback.
- :func:`interrupt_midway` starts a command, waits until it has visibly begun its work, sends
  SIGTERM and returns how it ended.
- :func:`small_tmpfs` mounts a small tmpfs for the duration of a ``with`` block (a full disk);
  the test is skipped where the mount is not permitted.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from confinfer.errors import Reason

CLI_TIMEOUT_S = 120
_POLL_S = 0.001


def confinfer_command(*args: str | Path) -> list[str]:
    """The argv that runs ``confinfer ARGS...`` with this interpreter."""
    return [sys.executable, "-m", "confinfer", *map(str, args)]


def run_confinfer(
    *args: str | Path, env: dict[str, str] | None = None, timeout: float = CLI_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Run ``confinfer ARGS...`` to completion (``env`` replaces the environment when given)."""
    return subprocess.run(
        confinfer_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def assert_refused(result: subprocess.CompletedProcess[str], reason: str) -> None:
    """The command failed with the exit code the registry gives ``reason``, one line
    ``confinfer: <reason>: ...`` (hint lines aside) and no traceback."""
    assert result.returncode == Reason(reason).exit_code != 0, result.stderr
    assert result.stderr.startswith(f"confinfer: {reason}: "), result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("hint: ")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr


def _has_started(started: Callable[[], bool]) -> bool:
    try:
        return started()
    except FileNotFoundError:
        return False


def interrupt_midway(
    argv: Sequence[str | Path], started: Callable[[], bool], timeout: float = 60
) -> tuple[int, str]:
    """Run ``confinfer ARGV...``, wait until ``started()`` is true (a ``FileNotFoundError`` from
    it counts as not yet), send SIGTERM and return the exit status and stderr.

    Fails the test if the command never started within ``timeout`` seconds, or finished before
    it could be interrupted. The process is killed on the way out whatever happened.
    """
    proc = subprocess.Popen(
        confinfer_command(*argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and not _has_started(started):
            assert time.monotonic() < deadline, "the command never started its work"
            time.sleep(_POLL_S)
        assert proc.poll() is None, "the command finished before it could be interrupted"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stderr


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """Create ``where`` and mount a tmpfs of ``size`` (``mount -o size=``) on it; skips the test
    when the mount fails. Unmounted on the way out."""
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)
