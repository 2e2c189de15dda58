"""Configuration: one frozen, typed dataclass, filled from one table of settings.

Sources, lowest precedence first: built-in defaults, ``/etc/confinfer/*.toml`` (files read in
name order; keys at top level), ``CONFINFER_<KEY>`` environment variables (what
``testbed.env`` sets), then command-line flags applied by the caller with :func:`override`.

Every key has one :class:`Setting` in :data:`SETTINGS`: its name, its parser, its default and a
one-line doc (after mkosi's ``ConfigSetting`` table). The TOML files, the environment, the flags
and the docs test all go through that table, so a value means the same wherever it is written.
A parser is a small named function that accepts the TOML value, the flag's Python value or the
text of a variable, and raises :class:`Invalid` with the reason it refuses; :func:`load` and
:func:`override` turn that into one ``config-invalid`` error naming the origin (file path,
``$VAR`` or ``--flag``), the key and the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import reprlib
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from types import UnionType
from typing import Any, Generic, TypeAlias, TypeVar
from urllib.parse import SplitResult, urlsplit

from confinfer.errors import ConfigError, Reason

CONFIG_DIR = Path("/etc/confinfer")
ENV_PREFIX = "CONFINFER_"

SKR_ALGORITHMS = ("RSA_AES_KEY_WRAP_256", "CKM_RSA_AES_KEY_WRAP", "RSA_AES_KEY_WRAP_384")
AZURE_CREDENTIALS = ("auto", "managed-identity", "cli", "default")

KiB, MiB, GiB, PiB = 1 << 10, 1 << 20, 1 << 30, 1 << 50
MAX_FILE_BYTES = 1 * MiB  # a configuration file larger than this is refused unread
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


@dataclass(frozen=True)
class Config:
    """The validated configuration. Each field is a :data:`SETTINGS` row (same order and
    default); the meanings are there and in docs/operator-guide.md §1.2."""

    maa_url: str = "https://sharedeus.eus.attest.azure.net"
    maa_allowed_issuers: tuple[str, ...] = ()
    keyvault_url: str | None = None
    key_id: str | None = None
    keyvault_allowed_keys: tuple[str, ...] = ()
    skr_algorithm: str = "RSA_AES_KEY_WRAP_256"
    keyvault_verify_challenge_resource: bool = True
    azure_credential: str = "auto"
    managed_identity_client_id: str | None = None
    imds_url: str | None = None
    skr_tool: Path | None = None
    ca_bundle: Path | None = None
    keyvault_release_ca_bundle: Path | None = None
    tpm_tcti: str = "device:/dev/tpmrm0"
    nvml_library: str = "libnvidia-ml.so.1"
    http_timeout_s: float = 30.0
    max_retries: int = 4
    http_max_response_bytes: int = 4 * MiB
    max_bytes: int | None = None
    # Where each value came from: a file path, "$CONFINFER_<KEY>" or "--<flag>".
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def release_roots(self) -> Path | None:
        """Where the roots for Key Vault's release signature come from (None: the system)."""
        return self.keyvault_release_ca_bundle or self.ca_bundle

    @property
    def imds(self) -> str:
        return (self.imds_url or "http://169.254.169.254").rstrip("/")

    @property
    def issuers(self) -> tuple[str, ...]:
        return self.maa_allowed_issuers or (self.maa_url.rstrip("/"),)


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


def _human(n: int) -> str:
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
        return _bounded(_integer(raw, from_text, expected), lo, hi, _human)

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
                raise Invalid(f"item {_show(each)}: {exc}") from None
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


def _show(value: object, limit: int = 80) -> str:
    """``repr(value)``, bounded in depth and cut to about ``limit`` characters."""
    text = _REPR.repr(str(value) if isinstance(value, PurePath) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def refused(origin: str, key: str, value: object, why: str) -> ConfigError:
    """The one error for a refused value: ``<origin>: key '<key>' = <value>: <why>``."""
    return ConfigError(
        f"{origin}: key {key!r} = {_show(value)}: {why}",
        reason=Reason.CONFIG_INVALID,
        details={"origin": origin, "key": key, "why": why},
    )


# --- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One configuration key: how it is parsed, its default and what it means."""

    name: str
    parse: Parse[T]
    default: T
    doc: str
    # Run on the final value only (after precedence), e.g. "the file exists".
    check: Callable[[Any], None] | None = None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def value(self, raw: object, origin: str) -> T:
        """``raw`` (from ``origin``) parsed, or a ``config-invalid`` error."""
        try:
            return self.parse(raw)
        except Invalid as exc:
            raise refused(origin, self.name, raw, str(exc)) from None


SETTINGS: tuple[Setting[Any], ...] = (
    Setting(
        "maa_url",
        parse=parse_https_url,
        default="https://sharedeus.eus.attest.azure.net",
        doc="Microsoft Azure Attestation provider for guest attestation.",
    ),
    Setting(
        "maa_allowed_issuers",
        parse=parse_list(parse_https_url),
        default=(),
        doc="Issuers whose attestation tokens are accepted; empty means exactly maa_url.",
    ),
    Setting(
        "keyvault_url",
        parse=optional(parse_https_url),
        default=None,
        doc="Vault URL (validated; Key Vault calls take the vault from the key id).",
    ),
    Setting(
        "key_id",
        parse=optional(parse_key_id),
        default=None,
        doc="The KEK, https://<vault>/keys/<name>[/<version>], when --key-id is not given.",
    ),
    Setting(
        "keyvault_allowed_keys",
        parse=parse_list(parse_key_id),
        default=(),
        doc=(
            "Key ids a sealed package may name besides key_id; a package's key id is a hint, "
            "never an address."
        ),
    ),
    Setting(
        "skr_algorithm",
        parse=parse_choice(*SKR_ALGORITHMS),
        default="RSA_AES_KEY_WRAP_256",
        doc="Export wrapping Secure Key Release asks Key Vault for.",
    ),
    Setting(
        "keyvault_verify_challenge_resource",
        parse=parse_bool,
        default=True,
        doc="Check that the vault's challenge names a resource its host belongs to.",
    ),
    Setting(
        "azure_credential",
        parse=parse_choice(*AZURE_CREDENTIALS),
        default="auto",
        doc="Which Azure credential Key Vault requests use.",
    ),
    Setting(
        "managed_identity_client_id",
        parse=optional(parse_str),
        default=None,
        doc="Client id of the managed identity to use, when the VM has several.",
    ),
    Setting(
        "imds_url",
        parse=optional(parse_http_url),
        default=None,
        doc="Instance Metadata Service (VCEK chain, managed-identity tokens).",
    ),
    Setting(
        "skr_tool",
        parse=optional(parse_path),
        default=None,
        doc="An installed AzureAttestSKR binary for the compatibility key-release backend.",
    ),
    Setting(
        "ca_bundle",
        parse=optional(parse_path),
        default=None,
        doc="PEM roots trusted for TLS to MAA, IMDS and Key Vault; unset means the system store.",
        check=existing_file,
    ),
    Setting(
        "keyvault_release_ca_bundle",
        parse=optional(parse_path),
        default=None,
        doc="PEM roots Key Vault's signed release answer must lead to; unset means ca_bundle.",
        check=existing_file,
    ),
    Setting(
        "tpm_tcti",
        parse=parse_str,
        default="device:/dev/tpmrm0",
        doc="TSS2 TCTI of the vTPM.",
    ),
    Setting(
        "nvml_library",
        parse=parse_str,
        default="libnvidia-ml.so.1",
        doc="NVML library.",
    ),
    Setting(
        "http_timeout_s",
        parse=parse_seconds(3600.0),
        default=30.0,
        doc="Time limit of each HTTP request to MAA, IMDS and Key Vault.",
    ),
    Setting(
        "max_retries",
        parse=parse_int(0, 100),
        default=4,
        doc="Extra attempts after a retryable failure of a remote service.",
    ),
    Setting(
        "http_max_response_bytes",
        parse=parse_bytes(1, 1 * GiB),
        default=4 * MiB,
        doc="Cap on any one HTTP response body read from MAA, IMDS, JWKS endpoints and Key Vault.",
    ),
    Setting(
        "max_bytes",
        parse=optional(parse_bytes(0, 1 * PiB)),
        default=None,
        doc="Largest model one unseal may write; unset means no cap.",
    ),
)

BY_NAME: Mapping[str, Setting[Any]] = {s.name: s for s in SETTINGS}


def _table_matches_config() -> None:
    fields = [f for f in dataclasses.fields(Config) if f.name != "sources"]
    if [f.name for f in fields] != [s.name for s in SETTINGS] or any(
        f.default != s.default for f, s in zip(fields, SETTINGS, strict=True)
    ):
        raise AssertionError("config.SETTINGS and config.Config disagree")  # a bug, at import


_table_matches_config()


# --- loading ---------------------------------------------------------------------------------


def _unknown(origin: str, key: str) -> ConfigError:
    near = difflib.get_close_matches(key, BY_NAME, n=1)
    return ConfigError(
        f"{origin}: unknown key {_show(key)}",
        reason=Reason.CONFIG_INVALID,
        hint=f"did you mean {near[0]!r}?" if near else None,
    )


def _read(path: Path) -> dict[str, Any]:
    """One configuration file's top-level table."""

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{path}: cannot parse: {why}", reason=Reason.CONFIG_INVALID)

    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise bad(f"larger than {_human(MAX_FILE_BYTES)}")
        return tomllib.loads(data.decode("utf-8"))
    except OSError as exc:
        raise bad(exc.strerror or str(exc)) from None
    except RecursionError:  # tomllib recurses once per level of [[[...]]] or {a={b=...}}
        raise bad("values nested too deeply") from None
    except ValueError as exc:  # TOMLDecodeError, UnicodeDecodeError, an over-long integer
        raise bad(str(exc)) from None


def _checked(cfg: Config) -> Config:
    for setting in SETTINGS:
        value = getattr(cfg, setting.name)
        if setting.check is not None and value is not None:
            try:
                setting.check(value)
            except Invalid as exc:
                origin = cfg.sources.get(setting.name, "default")
                raise refused(origin, setting.name, value, str(exc)) from None
    return cfg


def load(config_dir: Path = CONFIG_DIR, environ: Mapping[str, str] | None = None) -> Config:
    """Load and validate the configuration."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    files = sorted(config_dir.glob("*.toml")) if config_dir.is_dir() else []
    for path in files:
        for key, raw in _read(path).items():
            if key not in BY_NAME:
                raise _unknown(str(path), key)
            values[key] = BY_NAME[key].value(raw, str(path))
            sources[key] = str(path)
    for setting in SETTINGS:
        if setting.env in env:
            values[setting.name] = setting.value(env[setting.env], f"${setting.env}")
            sources[setting.name] = f"${setting.env}"
    if "imds_url" not in values and env.get("AZURE_POD_IDENTITY_AUTHORITY_HOST"):
        var = "AZURE_POD_IDENTITY_AUTHORITY_HOST"
        values["imds_url"] = BY_NAME["imds_url"].value(env[var], f"${var}")
        sources["imds_url"] = f"${var}"
    return _checked(Config(**values, sources=sources))


def override(cfg: Config, **flags: Any) -> Config:
    """Apply command-line flags (None means 'not given'), parsed and checked like any value."""
    values: dict[str, Any] = {}
    sources = dict(cfg.sources)
    for key, raw in flags.items():
        if raw is None:
            continue
        setting = BY_NAME.get(key)
        if setting is None:
            raise ConfigError(f"unknown configuration key {key!r}", reason=Reason.CONFIG_INVALID)
        values[key] = setting.value(raw, setting.flag)
        sources[key] = setting.flag
    return _checked(dataclasses.replace(cfg, **values, sources=sources))
