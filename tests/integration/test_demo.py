"""scripts/demo runs end to end: the README's first command must never rot."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(os.geteuid() != 0, reason="the demo mounts a tmpfs")
def test_demo_runs_end_to_end() -> None:
    result = subprocess.run(
        [str(ROOT / "scripts" / "demo")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "unsealed model is bit-identical to the original" in out
    assert "attestation type   sevsnpvm / azure-compliant-cvm" in out
    # The refusals it shows are the real ones, with their reasons.
    assert "confinfer: chunk-integrity: " in result.stderr
    assert "confinfer: keyvault-forbidden: " in result.stderr
    assert "confinfer: key-mismatch: the package names the key https://attacker.example/" in (
        result.stderr
    )
    # It stops what it started: `testbed status` exits 1 when nothing of it runs.
    status = subprocess.run(
        [
            str(ROOT / ".venv" / "bin" / "python"),
            "-m",
            "testbed",
            "status",
            "--dir",
            str(ROOT / ".demo" / "testbed"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert status.returncode == 1, status.stdout
