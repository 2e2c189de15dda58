"""``confinfer install-units`` (confinfer/units.py): the units, drop-ins and Caddy's files are
installed from the package's data (or the checkout) exactly as they are in systemd/ and
images/caddy/, and the wheel's data-files settings cover every one of them."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest

from confinfer import cli, units
from confinfer.errors import ConfinferError, Reason

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def expected(root: Path) -> dict[Path, Path]:
    """Every file of systemd/ and images/caddy/ and where it belongs under ``root``."""
    out: dict[Path, Path] = {}
    for path in sorted((ROOT / "systemd").rglob("*")):
        if path.is_file():
            out[path] = root / "etc/systemd/system" / path.relative_to(ROOT / "systemd")
    out[ROOT / "images/caddy/Caddyfile"] = root / "opt/confinfer/caddy/Caddyfile"
    out[ROOT / "images/caddy/caddy-run"] = root / "opt/confinfer/bin/caddy-run"
    return out


def test_the_checkout_installs_every_unit_and_caddy_file_unchanged(tmp_path: Path) -> None:
    written = units.install(units.find_sources(prefix=tmp_path / "no-venv"), tmp_path)
    want = expected(tmp_path)
    assert sorted(written) == sorted(want.values())
    for source, dest in want.items():
        assert dest.read_bytes() == source.read_bytes(), dest
        mode = dest.stat().st_mode & 0o777
        assert mode == (0o755 if dest.name == "caddy-run" else 0o644), dest
    # Again: the same files, replaced in place, nothing left behind.
    units.install(units.find_sources(prefix=tmp_path / "no-venv"), tmp_path)
    leftovers = [p for p in tmp_path.rglob(".*") if p.is_file()]
    assert leftovers == []


def test_the_packages_data_is_preferred_to_the_checkout(tmp_path: Path) -> None:
    data = tmp_path / "venv/share/confinfer"
    shutil.copytree(ROOT / "systemd", data / "systemd")
    shutil.copytree(ROOT / "images/caddy", data / "caddy")
    sources = units.find_sources(prefix=tmp_path / "venv")
    assert sources == units.Sources(data / "systemd", data / "caddy")


def test_nothing_to_install_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfinferError) as info:
        units.find_sources(tmp_path)
    assert info.value.reason is Reason.INSTALL_SOURCE_MISSING
    (tmp_path / "systemd").mkdir()
    for name in units.REQUIRED_UNITS:
        (tmp_path / "systemd" / name).write_text("[Unit]\n")
    with pytest.raises(ConfinferError) as info:
        units.plan(units.find_sources(tmp_path))
    assert info.value.reason is Reason.INSTALL_SOURCE_MISSING
    assert "Caddyfile is missing" in info.value.message


def test_the_wheel_carries_every_file_it_installs() -> None:
    """pyproject's [tool.setuptools.data-files] globs cover systemd/ and images/caddy/."""
    data_files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "data-files"
    ]
    covered: dict[str, str] = {}
    for dest, patterns in data_files.items():
        for pattern in patterns:
            for path in ROOT.glob(pattern):
                covered[path.relative_to(ROOT).as_posix()] = f"{dest}/{path.name}"
    for source in expected(Path("/")):
        rel = source.relative_to(ROOT).as_posix()
        assert rel in covered, f"{rel} is not in pyproject's data-files"
        # ... and lands where units.find_sources looks for it.
        if rel.startswith("images/caddy/"):
            assert covered[rel] == f"share/confinfer/caddy/{source.name}"
        else:
            assert covered[rel] == f"share/confinfer/{rel}"


def test_install_units_is_registered(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(["install-units", "--root", str(tmp_path)])
    assert args.root == tmp_path and args.source is None
