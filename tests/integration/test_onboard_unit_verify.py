"""``systemd-analyze verify`` of confinfer-onboard.service with the appliance's units, in a root
made of this host's systemd units, stand-in programs at the paths the units name, and a
cloud-final.service ordered as Debian's and Ubuntu's (after multi-user.target): clean, no
ordering cycle, while the same unit with default dependencies has one."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HOST_UNITS = Path("/usr/lib/systemd/system")
ANALYZE = shutil.which("systemd-analyze")
PROGRAMS = ("confinfer", "attestd", "model-loader", "vllm-supervisor", "caddy-run")
CLOUD_FINAL = """\
[Unit]
Description=stand-in for cloud-init's final stage, ordered as on Debian and Ubuntu
After=network-online.target multi-user.target
Wants=network-online.target

[Service]
Type=oneshot
ExecStart=/usr/bin/true
RemainAfterExit=yes

[Install]
WantedBy=cloud-init.target
"""

if ANALYZE is None or not HOST_UNITS.is_dir():
    pytest.skip("systemd-analyze and the host's units are needed", allow_module_level=True)


def make_root(tmp_path: Path, onboard_unit: str) -> Path:
    root = tmp_path / "root"
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree(HOST_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/lib/systemd/system/cloud-final.service").write_text(CLOUD_FINAL)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    true = root / "usr/bin/true"
    true.write_text("#!/bin/sh\n")
    true.chmod(0o755)
    etc = root / "etc/systemd/system"
    shutil.copytree(ROOT / "systemd", etc)
    (etc / "confinfer-onboard.service").write_text(onboard_unit)
    # Enabled as the bootstrap and onboarding's last stage leave them.
    wants = etc / "multi-user.target.wants"
    wants.mkdir()
    for unit in ("confinfer-onboard.service", "confinfer.target"):
        (wants / unit).symlink_to(f"/etc/systemd/system/{unit}")
    bin_dir = root / "opt/confinfer/bin"
    bin_dir.mkdir(parents=True)
    for name in PROGRAMS:
        program = bin_dir / name
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
    return root


def verify(root: Path, *units: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, "verify", f"--root={root}", *units],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


UNITS = ("confinfer-onboard.service", "confinfer.target", "multi-user.target")


def test_the_onboarding_unit_verifies_clean_with_the_appliance(tmp_path: Path) -> None:
    unit = (ROOT / "systemd/confinfer-onboard.service").read_text()
    root = make_root(tmp_path, unit)
    done = verify(root, *UNITS, "cloud-final.service")
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_with_default_dependencies_it_would_be_an_ordering_cycle(tmp_path: Path) -> None:
    """Why the unit says DefaultDependencies=no: the check above would see a cycle."""
    unit = (ROOT / "systemd/confinfer-onboard.service").read_text()
    assert "\nDefaultDependencies=no\n" in unit
    root = make_root(tmp_path, unit.replace("\nDefaultDependencies=no\n", "\n"))
    done = verify(root, *UNITS, "cloud-final.service")
    assert done.returncode != 0
    assert "ordering cycle" in done.stdout + done.stderr
