"""System-test fixtures: real systemd machines (tests/system/machine.py) booted from the cached
root file system (tests/system/rootfs.py).

- ``rootfs`` (session) builds or reuses the root file system; it skips, with the reason, only
  where systemd-nspawn cannot run here at all (not root, no cgroup hierarchy to write, the
  tools or the Debian mirror missing).
- ``machine_factory`` (module) boots machines for one test module: ``factory(name, binds=...,
  files=...)``. Every machine it booted is shut down after the module, and the finalizer fails
  the module if one left anything on the host (a process, a cgroup, a mount).
- ``repo`` is the checkout's root; ``project_binds(repo)`` binds it and its interpreter.

Build, boot and stop times are printed in pytest's terminal summary ("system machines").
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.system import rootfs as rootfs_builder
from tests.system.machine import Bind, Machine, cgroup_dirs

REPO = Path(__file__).resolve().parents[2]
_TIMES: list[str] = []

MachineFactory = Callable[..., Machine]


def _why_not() -> str | None:
    """Why systemd-nspawn machines cannot run on this host, or None."""
    if os.geteuid() != 0:
        return "system tests boot systemd-nspawn machines and need root"
    for tool in ("systemd-nspawn", "nsenter", "debootstrap", "zstd", "tar"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup-env installs it)"
    parent = cgroup_dirs("probe")[0].parent
    if not os.access(parent, os.W_OK):
        return f"cannot create cgroups under {parent}"
    return None


def _mirror_unreachable() -> str | None:
    url = rootfs_builder.mirror().rstrip("/") + f"/dists/{rootfs_builder.SUITE}/Release"
    try:
        with urllib.request.urlopen(url, timeout=15):  # noqa: S310 (the host's own apt mirror)
            return None
    except (urllib.error.URLError, OSError) as exc:
        return f"the Debian mirror is not reachable to build the rootfs ({url}: {exc})"


@pytest.fixture(scope="session")
def rootfs() -> Path:
    """The unpacked root file system every machine boots from (read-only lower layer)."""
    why = _why_not()
    if why:
        pytest.skip(why)
    cached = rootfs_builder.cache_dir() / f"rootfs-{rootfs_builder.key()}"
    if not cached.is_dir() and not cached.with_name(cached.name + ".tar.zst").is_file():
        why = _mirror_unreachable()
        if why:
            pytest.skip(why)
    result = rootfs_builder.ensure()
    if result.built_s is not None:
        _TIMES.append(f"rootfs built in {result.built_s:.1f} s ({result.tarball})")
    if result.unpacked_s is not None:
        _TIMES.append(f"rootfs unpacked in {result.unpacked_s:.1f} s ({result.tree})")
    if result.built_s is None and result.unpacked_s is None:
        _TIMES.append(f"rootfs reused ({result.tree})")
    return result.tree


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="module")
def machine_factory(
    rootfs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MachineFactory]:
    """``factory(name, binds=(), files=None)`` boots a machine; all are stopped after the
    module and must leave nothing behind."""
    booted: list[Machine] = []

    def factory(
        name: str,
        *,
        binds: Iterable[Bind] = (),
        files: Mapping[str, str | bytes | None] | None = None,
        settle: bool = True,
    ) -> Machine:
        machine = Machine.boot(
            name,
            rootfs,
            tmp_path=tmp_path_factory.mktemp(name),
            binds=binds,
            files=files,
            settle=settle,
        )
        booted.append(machine)
        _TIMES.append(
            f"{machine.name} booted in {machine.boot_s:.2f} s ({machine.system_state}"
            + (f", failed: {' '.join(machine.failed_units)})" if machine.failed_units else ")")
        )
        return machine

    try:
        yield factory
    finally:
        left: list[str] = []
        for machine in booted:
            try:
                machine.shutdown()
            except Exception as exc:  # the others are still stopped; this one is reported
                left.append(f"{machine.name}: {exc}")
            else:
                _TIMES.append(f"{machine.name} stopped in {machine.stop_s or 0:.2f} s")
            left += machine.leftovers()
        assert not left, f"machines left things on the host: {left}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _TIMES:
        return
    terminalreporter.section("system machines")
    for line in _TIMES:
        terminalreporter.write_line(line)
