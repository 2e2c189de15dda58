"""What the appliance's daemons (attestd, model-loader, vllm-supervisor) share on their command
line: the common flags, and the one-line failure they print and report to systemd."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from confinfer import __version__, sdnotify
from confinfer.errors import ConfinferError, printable


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """``--version``, ``--config FILE`` (repeatable) and ``--debug``."""
    made = argparse.ArgumentParser(prog=prog, description=description)
    made.add_argument("--version", action="version", version=f"{prog} {__version__}")
    made.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        action="append",
        help="configuration file (TOML) instead of /etc/confinfer/*.toml; may repeat",
    )
    made.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    return made


def config_files(args: argparse.Namespace) -> tuple[Path, ...] | None:
    """The ``--config`` files, or None for the configuration directory."""
    return tuple(args.config) if args.config else None


def fail(prog: str, exc: ConfinferError) -> int:
    """Print ``prog: <reason>: <message>`` (and its hint) on stderr, at error priority under
    journald, say ``STATUS=failed: ...`` to systemd, and return the reason's exit code."""
    prefix = "<3>" if "JOURNAL_STREAM" in os.environ else ""
    print(f"{prefix}{prog}: {exc.one_line()}", file=sys.stderr)
    if exc.hint:
        print(f"{prefix}hint: {printable(exc.hint)}", file=sys.stderr)
    sdnotify.status(f"failed: {exc.one_line()}")
    return exc.exit_code
