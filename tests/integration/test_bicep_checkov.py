"""checkov's Bicep scan of bicep-wrapper/: no failed check, and every skipped one carries a
written reason. checkov lives in its own venv (scripts/setup-env: it pins an older
`packaging` than pytest needs); it runs offline (--skip-download)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHECKOV = ROOT / ".cache" / "checkov" / "bin" / "checkov"


def scan(directory: Path) -> dict[str, Any]:
    if not CHECKOV.exists():
        pytest.fail(f"{CHECKOV} is missing: run scripts/setup-env")
    done = subprocess.run(
        [str(CHECKOV), "-d", str(directory), "--framework", "bicep", "-o", "json",
         "--skip-download"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr[-2000:]
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def test_the_templates_pass_checkov_with_reasons_for_every_skip() -> None:
    report = scan(ROOT / "bicep-wrapper")
    results = report["results"]
    failed = [(c["check_id"], c["resource"]) for c in results["failed_checks"]]
    assert failed == []
    assert report["summary"]["passed"] >= 25
    assert report["summary"]["parsing_errors"] == 0
    assert len(results["skipped_checks"]) == report["summary"]["skipped"] > 0
    for check in results["skipped_checks"]:
        reason = check.get("check_result", {}).get("suppress_comment", "")
        assert len(reason.split()) >= 6, (check["check_id"], reason)


def test_the_scan_can_fail(tmp_path: Path) -> None:
    """The same scan on a vault without purge protection or RBAC names the checks."""
    shutil.copy(ROOT / "bicep-wrapper" / "modules" / "keyvault.bicep", tmp_path / "kv.bicep")
    text = (tmp_path / "kv.bicep").read_text()
    text = text.replace("enablePurgeProtection: true", "enablePurgeProtection: false")
    (tmp_path / "kv.bicep").write_text(text)
    failed = {c["check_id"] for c in scan(tmp_path)["results"]["failed_checks"]}
    assert "CKV_AZURE_110" in failed  # Key Vault purge protection
