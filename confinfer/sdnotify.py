"""The sd_notify protocol (``sd_notify(3)``) for ``Type=notify`` services, stdlib only.

A message is a datagram of ``KEY=value`` lines sent to the socket systemd names in
``$NOTIFY_SOCKET``: a file system path, or an abstract socket written with a leading ``@``
(``@/org/freedesktop/systemd1/notify/...``) whose first byte on the wire is NUL. Outside
systemd the variable is unset and every call here does nothing.

Notification is advisory: a failure to send is logged once per process and never raised, so
that a daemon's work loop does not die of its status line. Every value is made one printable
line (:func:`confinfer.errors.printable`), so ``STATUS=`` can neither break into a second field
nor carry terminal escapes into ``systemctl status``.
"""

from __future__ import annotations

import logging
import os
import re
import socket

from confinfer.errors import printable

log = logging.getLogger(__name__)

_KEY = re.compile(r"[A-Z][A-Z0-9_]*")
_VALUE_LIMIT = 4000
_SEND_TIMEOUT_S = 2.0  # a datagram to PID 1 either goes at once or PID 1 is stuck

_warned = False  # one log line per process for a socket that does not take our messages


def _warn_once(message: str, *args: object) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning(message, *args)


def _address(value: str) -> str | None:
    """The ``connect()`` address for ``$NOTIFY_SOCKET``, or None when it names no Unix socket."""
    if value.startswith("@"):
        # An abstract socket: '@' stands for the leading NUL byte (cloud-init's socket.py drops
        # the result of this replace, so its abstract-socket notifications go nowhere).
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def notify(**fields: str | int) -> bool:
    """Send one message of ``KEY=value`` fields: ``notify(READY=1, STATUS="serving")``.

    Returns whether it was sent: False without ``$NOTIFY_SOCKET`` or when sending failed (logged
    once). A key that is not an upper-case sd_notify name is a programming error (ValueError).
    """
    for key in fields:
        if not _KEY.fullmatch(key):
            raise ValueError(f"not an sd_notify field name: {key!r}")
    target = os.environ.get("NOTIFY_SOCKET", "")
    if not target or not fields:
        return False
    address = _address(target)
    if address is None:
        _warn_once("sd_notify: NOTIFY_SOCKET=%s is not a Unix socket; not notifying", target)
        return False
    message = "\n".join(f"{key}={printable(value, _VALUE_LIMIT)}" for key, value in fields.items())
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT_S)
            sock.connect(address)
            sock.send(message.encode("utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: a path with an embedded NUL
        _warn_once("sd_notify: cannot send to NOTIFY_SOCKET=%s: %s", target, exc)
        return False
    return True


def ready(status: str | None = None) -> bool:
    """``READY=1``: the service is truly ready (for attestd: after the first full pass)."""
    if status is None:
        return notify(READY=1)
    return notify(READY=1, STATUS=status)


def status(line: str) -> bool:
    """``STATUS=``: the one line ``systemctl status`` shows; send it on every state change."""
    return notify(STATUS=line)


def watchdog() -> bool:
    """``WATCHDOG=1``: send from inside the work loop, so that a hung loop is killed."""
    return notify(WATCHDOG=1)


def stopping(status: str | None = None) -> bool:
    """``STOPPING=1``: shutdown has begun (on SIGTERM)."""
    if status is None:
        return notify(STOPPING=1)
    return notify(STOPPING=1, STATUS=status)


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds (``WatchdogSec=``), or None when no watchdog applies.

    None when ``$WATCHDOG_USEC`` is unset, not a positive integer, or when ``$WATCHDOG_PID`` is
    set to another process's id (the variables were inherited, not meant for us). Send
    :func:`watchdog` at least every half of it, as sd_watchdog_enabled(3) advises.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    if not usec.isascii() or not usec.isdigit() or int(usec) <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None and (not pid.isascii() or not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000
