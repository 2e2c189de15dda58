"""``confinfer install-units``: the appliance's systemd units, their drop-ins, the Caddyfile and
caddy-run, copied from where the package keeps them into the system.

The sources of truth stay in the repository, ``systemd/`` and ``images/caddy/``. The wheel
carries them as data files (``[tool.setuptools.data-files]`` in pyproject.toml) under
``<prefix>/share/confinfer/``: in the appliance's virtualenv, ``/opt/confinfer/share/confinfer/``.
A checkout (an editable install, the tests) reads the repository's own folders.

=========================================================  =========================================
from                                                       to (under ``--root``, default ``/``)
=========================================================  =========================================
``share/confinfer/systemd/*.service``, ``*.target`` ...    ``etc/systemd/system/``
``share/confinfer/systemd/<unit>.d/*.conf``                ``etc/systemd/system/<unit>.d/``
``share/confinfer/caddy/Caddyfile``                        ``opt/confinfer/caddy/Caddyfile``
``share/confinfer/caddy/caddy-run``                        ``opt/confinfer/bin/caddy-run`` (0755)
=========================================================  =========================================

Every file is replaced atomically (a temporary file, then a rename). Nothing is enabled or
started and systemd is not reloaded: that is the caller's next step (``systemctl daemon-reload``).
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from confinfer.errors import ConfinferError, Reason

UNIT_SUFFIXES = (".service", ".target", ".mount", ".socket", ".timer", ".path")
REQUIRED_UNITS = ("confinfer.target", "confinfer-onboard.service")
DATA_DIR = PurePosixPath("share/confinfer")
CHECKOUT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sources:
    """Where the unit files (``systemd``) and Caddy's files (``caddy``) are read from."""

    systemd: Path
    caddy: Path


@dataclass(frozen=True)
class Item:
    source: Path
    dest: PurePosixPath  # relative to the root
    mode: int


def find_sources(explicit: Path | None = None, prefix: Path | None = None) -> Sources:
    """``explicit`` (a folder with ``systemd/`` and ``caddy/``), else the installed package's
    data (``<sys.prefix>/share/confinfer``), else the checkout this module runs from."""
    if explicit is not None:
        candidates = [Sources(explicit / "systemd", explicit / "caddy")]
    else:
        data = Path(prefix or sys.prefix) / DATA_DIR
        candidates = [
            Sources(data / "systemd", data / "caddy"),
            Sources(CHECKOUT / "systemd", CHECKOUT / "images" / "caddy"),
        ]
    for sources in candidates:
        if all((sources.systemd / unit).is_file() for unit in REQUIRED_UNITS):
            return sources
    where = ", ".join(str(c.systemd) for c in candidates)
    raise ConfinferError(
        f"no unit files to install (looked for {', '.join(REQUIRED_UNITS)} in {where})",
        reason=Reason.INSTALL_SOURCE_MISSING,
        hint="install the appliance's wheel (its data files), or give --source",
    )


def plan(sources: Sources) -> list[Item]:
    """What goes where, in a stable order."""
    items: list[Item] = []
    etc = PurePosixPath("etc/systemd/system")
    for path in sorted(sources.systemd.iterdir()):
        if path.is_file() and path.suffix in UNIT_SUFFIXES:
            items.append(Item(path, etc / path.name, 0o644))
        elif path.is_dir() and path.name.endswith(".d") and path.name[:-2].endswith(UNIT_SUFFIXES):
            for conf in sorted(path.glob("*.conf")):
                items.append(Item(conf, etc / path.name / conf.name, 0o644))
    for name, dest, mode in (
        ("Caddyfile", "opt/confinfer/caddy/Caddyfile", 0o644),
        ("caddy-run", "opt/confinfer/bin/caddy-run", 0o755),
    ):
        source = sources.caddy / name
        if not source.is_file():
            raise ConfinferError(
                f"{source} is missing", reason=Reason.INSTALL_SOURCE_MISSING, hint="give --source"
            )
        items.append(Item(source, PurePosixPath(dest), mode))
    return items


def install(sources: Sources, root: Path = Path("/")) -> list[Path]:
    """Copy every :func:`plan` item under ``root``; returns the paths written."""
    written = []
    for item in plan(sources):
        dest = root / item.dest
        try:
            _copy(item.source, dest, item.mode)
        except OSError as exc:
            raise ConfinferError(
                f"cannot install {dest}: {exc.strerror or exc}", reason=Reason.INSTALL_WRITE_FAILED
            ) from None
        written.append(dest)
    return written


def _copy(source: Path, dest: Path, mode: int) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    data = source.read_bytes()
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["Item", "Sources", "find_sources", "install", "plan"]
