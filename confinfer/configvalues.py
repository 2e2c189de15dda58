"""Parsers for configuration values: each takes a TOML value, a flag's Python value or the
text of a ``CONFINFER_*`` variable, and returns the typed value or raises :class:`Invalid`
with the reason it refuses (confinfer.config turns that into one ``config-invalid`` line
naming the origin, the key and the value). Numbers are finite, bounded and ASCII; booleans are
never numbers; strings and paths carry no control characters.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Callable
from pathlib import Path, PurePath
from types import UnionType
from typing import TypeAlias, TypeVar
from urllib.parse import SplitResult, urlsplit

from confinfer.errors import ConfigError, Reason

KiB, MiB, GiB, PiB = 1 << 10, 1 << 20, 1 << 30, 1 << 50
MAX_TEXT = 4096  # longest string value (PATH_MAX)
MAX_ITEMS = 64  # longest list value

_SIZE = re.compile(r"^\s*([0-9]{1,30})\s*(?:([KMGT])(?:i?B)?|B)?\s*$", re.IGNORECASE)
_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}


def parse_size(text: str) -> int:
    """``4194304``, ``4M``, ``4MiB``, ``64G``: binary multiples. Raises ValueError."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 4194304, 4M, 64GiB)")
    return int(match.group(1)) << _SHIFT[(match.group(2) or "").upper()]


# --- parsers -------------------------------------------------------------------------------

T = TypeVar("T")
Parse: TypeAlias = Callable[[object], T]


class Invalid(Exception):
    """Raised by a parser: why the value is refused. The caller adds origin, key and value."""


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_bool(raw: object) -> bool:
    """A TOML or flag boolean, or the text ``1 true yes on`` / ``0 false no off``."""
    expected = "expected a boolean (true or false)"
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        if raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        raise Invalid(expected)
    raise _wrong_type(expected, raw)


def _wrong_type(expected: str, raw: object) -> Invalid:
    """``expected …, not a list``: a value of the wrong TOML (or Python) type."""
    kinds: tuple[tuple[type | UnionType, str], ...] = (
        (bool, "a boolean"),  # before int: True is an int
        (int, "an integer"),
        (float, "a floating-point number"),
        (str, "a string"),
        (list | tuple, "a list"),
        (dict, "a table"),
        (PurePath, "a path"),
    )
    kind = next((name for cls, name in kinds if isinstance(raw, cls)), f"a {type(raw).__name__}")
    return Invalid(f"{expected}, not {kind}")


def _text(raw: object, expected: str) -> str:
    if not isinstance(raw, str):
        raise _wrong_type(expected, raw)
    if len(raw) > MAX_TEXT:
        raise Invalid(f"longer than {MAX_TEXT} characters")
    if not raw.isprintable():  # control, format and line-break characters
        raise Invalid("must not contain control characters")
    return raw


def parse_str(raw: object) -> str:
    """A non-empty string of printable characters."""
    text = _text(raw, "expected a string")
    if not text:
        raise Invalid("must not be empty")
    return text


def parse_choice(*choices: str) -> Parse[str]:
    """One of ``choices``, spelled exactly."""

    def parse(raw: object) -> str:
        expected = f"expected one of {', '.join(choices)}"
        if not isinstance(raw, str):
            raise _wrong_type(expected, raw)
        for choice in choices:
            if raw == choice:
                return choice
        raise Invalid(expected)

    return parse


_INTEGER = re.compile(r"^([+-]?)([0-9]+)$")
_BEYOND = 10**40  # stands in for longer digit strings: past every bound, cheap to convert


def _int_text(text: str) -> int | None:
    """Decimal digits (ASCII only, optional sign) as an int, else None."""
    match = _INTEGER.match(text.strip())
    if not match:
        return None
    sign, digits = match.groups()
    value = int(digits) if len(digits) <= 40 else _BEYOND
    return -value if sign == "-" else value


def _bounded(value: int, lo: int, hi: int, show: Callable[[int], str] = str) -> int:
    if value < lo:
        raise Invalid("must not be negative" if lo == 0 else f"must be at least {show(lo)}")
    if value > hi:
        raise Invalid(f"must be at most {show(hi)}")
    return value


def _integer(raw: object, from_text: Callable[[str], int], expected: str) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        return from_text(raw)
    raise _wrong_type(expected, raw)  # true, 2.5 and 3.0 alike


def parse_int(lo: int, hi: int) -> Parse[int]:
    """A whole number in ``lo..hi``: a TOML integer or decimal digits (no fraction, no 3.0)."""
    expected = "expected an integer"

    def from_text(text: str) -> int:
        value = _int_text(text)
        if value is None:
            raise Invalid(expected)
        return value

    def parse(raw: object) -> int:
        return _bounded(_integer(raw, from_text, expected), lo, hi)

    return parse


def human(n: int) -> str:
    for unit, size in (("PiB", PiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return str(n)


def parse_bytes(lo: int, hi: int) -> Parse[int]:
    """A byte count in ``lo..hi``: an integer, or text such as ``4194304``, ``64G``, ``512MiB``."""
    expected = "expected an integer or a size like 64G"

    def from_text(text: str) -> int:
        value = _int_text(text)  # plain digits read as a TOML integer would be
        if value is not None:
            return value
        try:
            return parse_size(text)
        except ValueError:
            raise Invalid(expected) from None

    def parse(raw: object) -> int:
        return _bounded(_integer(raw, from_text, expected), lo, hi, human)

    return parse


_DECIMAL = re.compile(r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$")


def parse_seconds(hi: float) -> Parse[float]:
    """A finite number of seconds in ``(0, hi]``: a TOML number or decimal text (no nan/inf)."""
    expected = "expected a finite number of seconds > 0"

    def parse(raw: object) -> float:
        if isinstance(raw, str):
            if not _DECIMAL.match(raw.strip()):
                raise Invalid(expected)
        elif isinstance(raw, bool) or not isinstance(raw, int | float):
            raise _wrong_type(expected, raw)
        try:
            value = float(raw)
        except OverflowError:  # an integer beyond any float
            raise Invalid(f"must be at most {hi:g} seconds") from None
        if not math.isfinite(value) or value <= 0:  # "1e999" is inf
            raise Invalid(expected)
        if value > hi:
            raise Invalid(f"must be at most {hi:g} seconds")
        return value

    return parse


def _url(raw: object, schemes: tuple[str, ...], expected: str) -> tuple[str, SplitResult]:
    text = _text(raw, expected)
    if not all(0x21 <= ord(ch) <= 0x7E for ch in text):
        # urlsplit would silently drop tabs and newlines; we refuse them, spaces and non-ASCII.
        raise Invalid(f"{expected}: spaces, control and non-ASCII characters are not allowed")
    try:
        url = urlsplit(text)
        url.port  # noqa: B018 (raises ValueError for a port out of range)
    except ValueError:
        raise Invalid(expected) from None
    if url.scheme not in schemes or not url.hostname:
        raise Invalid(expected)
    if "@" in url.netloc or "?" in text or "#" in text:
        raise Invalid(f"{expected} without user info, query or fragment")
    return text, url


def parse_https_url(raw: object) -> str:
    """An ``https://`` URL with a host and no user info, query or fragment."""
    return _url(raw, ("https",), "expected an https:// URL")[0]


def parse_http_url(raw: object) -> str:
    """An ``http://`` or ``https://`` URL with a host and no user info, query or fragment."""
    return _url(raw, ("http", "https"), "expected an http(s):// URL")[0]


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def parse_sha256(raw: object) -> str:
    """A SHA-256 digest: 64 hexadecimal digits (upper case is read as lower case)."""
    expected = "expected a SHA-256 digest (64 hexadecimal digits)"
    text = _text(raw, expected).lower()
    if not _SHA256.match(text):
        raise Invalid(expected)
    return text


_KEY_PATH = re.compile(r"^/keys/[0-9A-Za-z-]{1,127}(?:/[0-9A-Za-z]{1,64})?/?$")


def parse_key_id(raw: object) -> str:
    """A Key Vault / Managed HSM key id: ``https://<host>/keys/<name>[/<version>]``."""
    expected = "expected a key id https://<vault>/keys/<name>[/<version>]"
    text, url = _url(raw, ("https",), expected)
    if not _KEY_PATH.match(url.path):
        raise Invalid(expected)
    return text.rstrip("/")


def parse_path(raw: object) -> Path:
    """A file-system path: a string (or a flag's Path) without control characters."""
    if isinstance(raw, PurePath):
        raw = str(raw)
    text = _text(raw, "expected a path")
    if not text:
        raise Invalid("expected a path")
    return Path(text)


def parse_list(item: Parse[str]) -> Parse[tuple[str, ...]]:
    """A TOML array (or a flag's list) of strings, or comma-separated text; each item parsed by
    ``item`` with a trailing ``/`` dropped. Empty text is the empty list."""

    def parse(raw: object) -> tuple[str, ...]:
        if isinstance(raw, str):
            # Only spaces are trimmed: a newline or tab in an item is refused by ``item``.
            items: list[object] = [s.strip(" ") for s in raw.split(",") if s.strip(" ")]
        elif isinstance(raw, list | tuple) and all(isinstance(s, str) for s in raw):
            items = list(raw)
        elif isinstance(raw, list | tuple):
            raise Invalid("expected a list of strings")
        else:
            raise _wrong_type("expected a list of strings", raw)
        if len(items) > MAX_ITEMS:
            raise Invalid(f"more than {MAX_ITEMS} items")
        out = []
        for each in items:
            try:
                out.append(item(each).rstrip("/"))
            except Invalid as exc:
                raise Invalid(f"item {show(each)}: {exc}") from None
        return tuple(out)

    return parse


def optional(parse: Parse[T]) -> Parse[T | None]:
    """``parse``, or None for the empty string (an empty variable means "not set")."""

    def parse_optional(raw: object) -> T | None:
        return None if raw == "" else parse(raw)

    return parse_optional


def existing_file(path: Path) -> None:
    """A check on a final value: ``path`` names a regular file (or a link to one)."""
    try:
        if not path.is_file():
            raise Invalid("no such file")
    except OSError as exc:
        raise Invalid(f"cannot read: {exc.strerror}") from None


class _Repr(reprlib.Repr):
    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 3, 80, 80, 40
        self.maxlist = self.maxtuple = self.maxdict = 4

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 1024:  # repr() of a huge int is slow or refused
            return f"<{x.bit_length()}-bit integer>"
        return super().repr_int(x, level)


_REPR = _Repr()


def show(value: object, limit: int = 80) -> str:
    """``repr(value)``, bounded in depth and cut to about ``limit`` characters."""
    text = _REPR.repr(str(value) if isinstance(value, PurePath) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def refused(origin: str, key: str, value: object, why: str) -> ConfigError:
    """The one error for a refused value: ``<origin>: key '<key>' = <value>: <why>``."""
    return ConfigError(
        f"{origin}: key {key!r} = {show(value)}: {why}",
        reason=Reason.CONFIG_INVALID,
        details={"origin": origin, "key": key, "why": why},
    )
