"""The operator documentation names every configuration key and every failure reason."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from confinfer.config import ENV_PREFIX, Config
from confinfer.errors import Kind, Reason

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
GUIDE = (ROOT / "docs" / "operator-guide.md").read_text(encoding="utf-8")
MAN = (ROOT / "docs" / "confinfer.1.md").read_text(encoding="utf-8")
KEYS = [f.name for f in dataclasses.fields(Config) if f.name != "sources"]


@pytest.mark.parametrize("key", KEYS)
def test_every_config_key_is_documented(key: str) -> None:
    assert f"`{key}`" in GUIDE
    assert f"`{ENV_PREFIX}{key.upper()}`" in GUIDE
    assert f"`{ENV_PREFIX}{key.upper()}`" in MAN


ROW = re.compile(r"^\| `([a-z0-9-]+)` \(\*\*(\d+)\*\*\) \|", re.MULTILINE)
GUIDE_ROWS = {slug: int(code) for slug, code in ROW.findall(GUIDE)}


def test_the_troubleshooting_tables_are_found_at_all() -> None:
    assert {"header-integrity", "release-refused", "tpm-pcr-policy"} <= set(GUIDE_ROWS)


@pytest.mark.parametrize("reason", list(Reason))
def test_every_reason_has_a_row_with_its_exit_code(reason: Reason) -> None:
    assert GUIDE_ROWS.get(reason.value) == reason.exit_code


def test_every_row_names_a_registered_reason() -> None:
    assert set(GUIDE_ROWS) <= {r.value for r in Reason}


@pytest.mark.parametrize("kind", list(Kind))
def test_every_exit_code_is_in_both_exit_status_tables(kind: Kind) -> None:
    row = re.compile(rf"^\| {kind.exit_code} \|", re.MULTILINE)
    assert row.search(GUIDE)
    assert row.search(MAN)


def test_no_reason_is_spelled_outside_the_registry() -> None:
    """Product code names reasons only as Reason members, so mypy sees every one."""
    for package in ("confinfer", "loader", "attestd"):
        for path in (ROOT / package).glob("*.py"):
            text = path.read_text("utf-8")
            assert not re.search(r'reason\s*=\s*f?"', text), path
