"""The operator documentation names every configuration key and every failure reason."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from confinfer.config import ENV_PREFIX, Config

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


def product_reasons() -> set[str]:
    found: set[str] = set()
    for package in ("confinfer", "loader"):
        for path in (ROOT / package).glob("*.py"):
            found |= set(re.findall(r'reason\s*=\s*"([a-z0-9-]+)"', path.read_text("utf-8")))
    return found


def test_reasons_are_found_at_all() -> None:
    assert {"header-integrity", "release-refused", "tpm-pcr-policy"} <= product_reasons()


@pytest.mark.parametrize("reason", sorted(product_reasons()))
def test_every_failure_reason_is_in_the_troubleshooting_table(reason: str) -> None:
    assert f"`{reason}`" in GUIDE
