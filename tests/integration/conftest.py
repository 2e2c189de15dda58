"""Integration fixtures: a running testbed (``python -m testbed up``) per test module.

- ``testbed`` (module scope) yields a :class:`RunningTestbed`: ``dir``, ``env`` (the parsed
  ``testbed.env``), ``environ()`` (os.environ plus env) and ``cli(command, *args)``. It runs
  ``down`` afterwards, whatever the tests did.
- ``testbed_factory`` starts more testbeds in directories a test picks; ``testbed_cli`` runs
  ``python -m testbed`` with any arguments.

Startup times are printed in pytest's terminal summary ("testbed startup").
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testbed.env import ENV_FILE, read_env_file

CLI_TIMEOUT_S = 120
_STARTUP_TIMES: list[tuple[str, float]] = []


@dataclass(frozen=True)
class RunningTestbed:
    dir: Path
    env: dict[str, str]
    startup_s: float
    _extra: dict[str, str] = field(default_factory=dict, repr=False)

    def environ(self, **extra: str) -> dict[str, str]:
        """This process's environment plus the testbed's variables (and ``extra``)."""
        return {**os.environ, **self.env, **extra}

    def cli(self, command: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``python -m testbed COMMAND --dir DIR ARGS...``."""
        return run_cli(command, "--dir", str(self.dir), *args, check=check)


def run_cli(
    *argv: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "testbed", *argv],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
        env=env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"python -m testbed {' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}"
        )
    return proc


def start_testbed(directory: Path, *, env: dict[str, str] | None = None) -> RunningTestbed:
    """``up`` in ``directory``; records the startup time for the terminal summary."""
    proc = run_cli("up", "--dir", str(directory), check=False, env=env)
    if proc.returncode != 0:
        run_cli("down", "--dir", str(directory), check=False)
        raise AssertionError(f"testbed up failed ({proc.returncode}): {proc.stderr.strip()}")
    match = re.search(r"testbed up in ([0-9.]+) s", proc.stdout)
    assert match, proc.stdout
    startup = float(match.group(1))
    _STARTUP_TIMES.append((str(directory), startup))
    print(f"testbed up in {startup:.2f} s ({directory})")
    return RunningTestbed(directory, read_env_file(directory / ENV_FILE), startup)


@pytest.fixture(scope="module")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningTestbed]:
    """A running testbed shared by the tests of one module; tests that change its state (GPU,
    faults) put it back."""
    directory = tmp_path_factory.mktemp("testbed")
    try:
        yield start_testbed(directory)
    finally:
        run_cli("down", "--dir", str(directory))


TestbedFactory = Callable[..., RunningTestbed]


@pytest.fixture
def testbed_factory() -> Iterator[TestbedFactory]:
    """``factory(directory, env=None)`` runs ``up`` there; every one is brought down after the
    test, whatever it did."""
    started: list[Path] = []

    def factory(directory: Path, env: dict[str, str] | None = None) -> RunningTestbed:
        started.append(directory)
        return start_testbed(directory, env=env)

    try:
        yield factory
    finally:
        for directory in started:
            run_cli("down", "--dir", str(directory), check=False)


@pytest.fixture
def testbed_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``testbed_cli(*argv, check=True, env=None)`` runs ``python -m testbed ARGV...``."""
    return run_cli


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _STARTUP_TIMES:
        return
    terminalreporter.section("testbed startup")
    for directory, seconds in _STARTUP_TIMES:
        terminalreporter.write_line(f"testbed up in {seconds:.2f} s  ({directory})")
