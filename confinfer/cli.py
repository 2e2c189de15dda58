"""The ``confinfer`` command.

Subcommands are contributed through the ``confinfer.commands`` entry-point group: each entry
point names a ``register(subparsers)`` function that adds one subparser and sets
``func=callable(args) -> int`` on it. That keeps this core package free of imports of
``loader`` and ``attestd``.

Every expected failure (:class:`~confinfer.errors.ConfinferError`) ends as one line on stderr
and a non-zero exit; a traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from types import FrameType
from typing import NoReturn

from confinfer import __version__, log
from confinfer.errors import ConfinferError, Interrupted, Kind, printable

LOG = logging.getLogger("confinfer")

Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"stopped by {signal.Signals(signum).name}")


class _Parser(argparse.ArgumentParser):
    """argparse whose syntax errors exit 64 (EX_USAGE) like every other usage failure."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(Kind.USAGE.exit_code, f"{self.prog}: error: {printable(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="confinfer",
        description="Confidential LLM inference: seal models, attest, release keys, serve.",
    )
    parser.add_argument("--version", action="version", version=f"confinfer {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="verbose logs and tracebacks on failure"
    )
    sub: argparse._SubParsersAction[argparse.ArgumentParser] = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )
    for ep in sorted(entry_points(group="confinfer.commands"), key=lambda e: e.name):
        register: Register = ep.load()
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log.setup(debug=args.debug)
    # SIGTERM and SIGINT unwind through the normal error path so that every command's
    # cleanup (wiping partial plaintext, zeroing keys) runs.
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)
    try:
        code: int = args.func(args)
    except ConfinferError as exc:
        if args.debug:
            LOG.exception("failed")
        # Under journald the failure line carries the error priority like every log line.
        prefix = "<3>" if "JOURNAL_STREAM" in os.environ else ""
        print(f"{prefix}confinfer: {exc.one_line()}", file=sys.stderr)
        if exc.hint:
            print(f"{prefix}hint: {printable(exc.hint)}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        return Kind.SYSTEM.exit_code
    except Exception:
        # Not an expected failure: a bug. Its traceback is always shown.
        LOG.exception("internal error")
        return Kind.SOFTWARE.exit_code
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
