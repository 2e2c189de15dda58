"""``confinfer status``: attestd's state, read from its socket, for a person or a script, and
onboarding's stages, read from its state file (/var/lib/confinfer/onboard.json) when there is one.

The exit status follows ``cloud-init status``: 0 healthy, 2 starting or degraded (it may still
come right), 1 revoked, or attestd unreachable or not answering as attestd does. In the last
case the failure is the usual one line on stderr with its reason (``attestd-unavailable``,
``attestd-bad-response``), only with exit status 1. While onboarding is not done, attestd is not
running yet: then the stages are shown, and the exit status is 2 (in progress) or 1 (a stage
failed), whatever attestd answers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

from confinfer import onboard_state
from confinfer.attestd_api import Client, Health, State
from confinfer.errors import ConfinferError, ServiceError, printable

EXIT_HEALTHY = 0
EXIT_FAILED = 1  # revoked, or no answer from attestd
EXIT_TRANSIENT = 2  # starting or degraded

_EXIT = {
    State.HEALTHY: EXIT_HEALTHY,
    State.STARTING: EXIT_TRANSIENT,
    State.DEGRADED: EXIT_TRANSIENT,
    State.REVOKED: EXIT_FAILED,
}


class StatusUnavailable(ConfinferError):
    """attestd did not answer (or not as attestd): the reason is the client's, the exit status
    is ``confinfer status``'s 1."""

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED


def register_status(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show attestd's attestation state",
        description=(
            "Read attestd's health from its socket and show it: the state and its reason, "
            "when the last GPU and vTPM passes were, when the token and the AK certificate "
            "expire, and the GPUs. Exit status: 0 healthy, 2 starting or degraded, 1 revoked "
            "or attestd unreachable."
        ),
    )
    parser.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help="attestd's socket (default: attestd_socket from the configuration)",
    )
    parser.add_argument(
        "--format",
        choices=("table", "json"),
        default="table",
        help="table for people (default), or the health JSON as attestd serves it",
    )
    parser.add_argument(
        "--onboard-state",
        type=Path,
        metavar="FILE",
        default=onboard_state.STATE_DIR / onboard_state.STATE_NAME,
        help="onboarding's state file (default: %(default)s); shown when it exists",
    )
    parser.set_defaults(func=run)


_ONBOARDING_EXIT = {"done": EXIT_HEALTHY, "in-progress": EXIT_TRANSIENT, "failed": EXIT_FAILED}


def run(args: argparse.Namespace) -> int:
    socket_path: Path
    if args.socket is not None:
        socket_path = args.socket
    else:
        from confinfer import config

        socket_path = config.load().attestd_socket
    onboarding = onboard_state.StateFile(args.onboard_state).load()
    progress = None if onboarding is None else onboarding.progress()
    try:
        health = Client(socket_path).health()
    except ServiceError as exc:
        if onboarding is None or progress is None or progress.state == "done":
            raise StatusUnavailable(
                exc.message, reason=exc.reason, details=exc.details, hint=exc.hint
            ) from exc
        # Onboarding first: attestd does not run before it is done.
        if args.format == "json":
            obj: dict[str, Any] = {
                "onboarding": onboard_state.progress_obj(onboarding),
                "attestd": {"reason": exc.reason.value, "line": printable(exc.message, 1000)},
            }
            json.dump(obj, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            sys.stdout.write(onboarding_table(onboarding, time.time()))
            sys.stdout.write(f"attestd:    {exc.reason}: {printable(exc.message, 1000)}\n")
        return _ONBOARDING_EXIT[progress.state]
    if args.format == "json":
        obj = health.to_obj()
        if onboarding is not None:
            obj["onboarding"] = onboard_state.progress_obj(onboarding)
        json.dump(obj, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(table(health, time.time()))
        if onboarding is not None:
            sys.stdout.write(onboarding_table(onboarding, time.time()))
    if progress is not None and progress.state != "done":
        return _ONBOARDING_EXIT[progress.state]
    return _EXIT[health.state]


# --- the table -------------------------------------------------------------------------------


def _utc(at: float) -> str:
    try:
        moment = datetime.datetime.fromtimestamp(at, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return f"{at:.6g} (out of range)"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _span(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes}m"
    return f"{hours // 24}d {hours % 24}h"


def _when(at: float | None, now: float, none: str) -> str:
    """``2025-11-24T16:00:00Z (3h 12m ago)``, or ``(in 5m)`` for a time to come."""
    if at is None:
        return none
    if at > 1e12 or at - now > 1e11:  # no span to speak of
        return _utc(at)
    relative = f"{_span(now - at)} ago" if at <= now else f"in {_span(at - now)}"
    return f"{_utc(at)} ({relative})"


def _days(at: float | None, now: float) -> str:
    if at is None:
        return "unknown"
    days = (at - now) / 86400
    if not -1e9 < days < 1e9:
        return _utc(at)
    if days >= 0:
        return f"{_utc(at)} ({days:.0f} days left)"
    return f"{_utc(at)} (expired {-days:.0f} days ago)"


def table(health: Health, now: float) -> str:
    """The health as aligned ``name: value`` lines, every text from the socket escaped."""
    gpus = health.gpus
    rows = [
        ("state", health.state.value),
        ("reason", health.reason.value),
        ("line", printable(health.line, 1000)),
        ("since", _when(health.since, now, "unknown")),
        ("last GPU pass", _when(health.last_gpu_pass, now, "never")),
        ("last vTPM pass", _when(health.last_vtpm_pass, now, "never")),
        ("token expiry", _when(health.token_expiry, now, "no token")),
        ("AK certificate", _days(health.ak_cert_expiry, now)),
        ("GPUs", f"{gpus.count}/{gpus.expected}"),
    ]
    width = max(len(name) for name, _ in rows) + 1
    lines = [f"{name + ':':<{width}} {value}" for name, value in rows]
    for gpu in gpus.devices:
        cc = "on" if gpu.cc else "off"
        ready = "yes" if gpu.ready else "no"
        lines.append(f"  {printable(gpu.uuid, 128)}  cc={cc}  ready={ready}")
    return "\n".join(lines) + "\n"


def onboarding_table(state: onboard_state.State, now: float) -> str:
    """Onboarding's stages, one line each: status, since when, attempts or the failure."""
    progress = state.progress()
    lines = [f"onboarding: {progress.line.removeprefix('onboarding ')}"]
    stages = zip(onboard_state.STAGES, state.records, strict=True)
    for index, (stage, record) in enumerate(stages, 1):
        when = "" if record.since is None else _when(record.since, now, "")
        row = f"  {index} {stage.name:<17} {record.status.value:<9} {when}"
        if record.status in (onboard_state.Status.APPLYING, onboard_state.Status.REBOOTING):
            row += f"  attempt {record.attempts} of {onboard_state.MAX_ATTEMPTS}"
        elif record.status is onboard_state.Status.FAILED:
            row += f"  {record.reason}: {printable(record.error or '', 500)}"
        lines.append(row.rstrip())
    return "\n".join(lines) + "\n"


__all__ = [
    "EXIT_FAILED",
    "EXIT_HEALTHY",
    "EXIT_TRANSIENT",
    "onboarding_table",
    "register_status",
    "run",
    "table",
]
