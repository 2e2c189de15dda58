"""The CLI core: subcommands from entry points, one-line errors, logging priorities."""

from __future__ import annotations

import argparse
import logging
import signal
from collections.abc import Iterator

import pytest

from confinfer import cli, log
from confinfer.errors import ConfinferError, IntegrityError, Reason

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _keep_signal_handlers() -> Iterator[None]:
    """cli.main installs SIGTERM/SIGINT handlers; give pytest its own back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_every_declared_subcommand_registers() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"seal", "unseal", "inspect", "attest"} <= set(sub.choices)


def test_expected_failure_is_one_line_and_exit_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom(args: argparse.Namespace) -> int:
        raise IntegrityError("package failed authentication", hint="re-copy the package")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser.set_defaults(func=boom)
    # Any subcommand will do; its func is replaced by the parser-level default above only when
    # the subparser sets none, so call through a parser whose subcommand is 'inspect'.
    ns = parser.parse_args(["inspect", "x"])
    ns.func = boom
    monkeypatch.setattr(parser, "parse_args", lambda argv=None: ns)
    code = cli.main([])
    err = capsys.readouterr().err.splitlines()
    assert code == 65  # EX_DATAERR: integrity failures
    assert err == [
        "confinfer: integrity: package failed authentication",
        "hint: re-copy the package",
    ]


def test_error_reason_override_and_details() -> None:
    exc = ConfinferError("x", reason=Reason.KEY_MISMATCH, details={"claim": "a.b"})
    assert exc.one_line() == "key-mismatch: x"
    assert exc.details == {"claim": "a.b"}


def test_priority_prefix_only_under_journald(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    monkeypatch.setenv("SYSTEMD_LOG_LEVEL", "warning")
    log.setup()
    logging.getLogger("t").warning("careful")
    logging.getLogger("t").info("hidden")
    assert capsys.readouterr().err == "<4>careful\n"
    monkeypatch.delenv("JOURNAL_STREAM")
    monkeypatch.setenv("SYSTEMD_LOG_LEVEL", "7")
    log.setup()
    logging.getLogger("t").debug("plain")
    assert capsys.readouterr().err == "plain\n"
    logging.getLogger().handlers.clear()


def test_failure_line_carries_error_priority_under_journald(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    code = cli.main(["inspect", "/nonexistent/package"])
    err = capsys.readouterr().err
    logging.getLogger().handlers.clear()
    assert code != 0
    assert err.startswith("<3>confinfer: "), err
