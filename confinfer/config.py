"""Configuration: one frozen, typed dataclass.

Sources, lowest precedence first: built-in defaults, ``/etc/confinfer/*.toml`` (files read in
name order; keys at top level), ``CONFINFER_<KEY>`` environment variables (what
``testbed.env`` sets), then command-line flags applied by the caller with :func:`override`.
Every value is validated at load; errors name the file (or variable), the key and the value.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from confinfer.errors import ConfigError, Reason

CONFIG_DIR = Path("/etc/confinfer")
ENV_PREFIX = "CONFINFER_"

SKR_ALGORITHMS = ("RSA_AES_KEY_WRAP_256", "CKM_RSA_AES_KEY_WRAP", "RSA_AES_KEY_WRAP_384")

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}


def parse_size(text: str) -> int:
    """``4194304``, ``4M``, ``4MiB``, ``64G``: binary multiples. Raises ValueError."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 4194304, 4M, 64GiB)")
    return int(match.group(1)) << _SHIFT[match.group(2).upper()]


@dataclass(frozen=True)
class Config:
    # Attestation (MAA)
    maa_url: str = "https://sharedeus.eus.attest.azure.net"
    # Issuers whose tokens we accept; empty means "exactly maa_url".
    maa_allowed_issuers: tuple[str, ...] = ()
    # Key Vault
    keyvault_url: str | None = None
    key_id: str | None = None
    skr_algorithm: str = "RSA_AES_KEY_WRAP_256"
    # The Azure SDK checks that a vault's challenge names a resource the host belongs to.
    # Only a local emulator on an IP address needs this off.
    keyvault_verify_challenge_resource: bool = True
    managed_identity_client_id: str | None = None
    # Instance metadata service (managed-identity tokens, the VCEK chain). When unset, the
    # redirect azure-identity honours (AZURE_POD_IDENTITY_AUTHORITY_HOST) or Azure's address.
    imds_url: str | None = None
    # An installed AzureAttestSKR binary, for the compatibility key-release backend.
    skr_tool: Path | None = None
    # TLS trust for MAA and Key Vault; None means the system store.
    ca_bundle: Path | None = None
    # Roots that Key Vault's signed release answer (its x5c chain) must lead to; None means
    # ca_bundle, else the system store.
    keyvault_release_ca_bundle: Path | None = None
    # vTPM
    tpm_tcti: str = "device:/dev/tpmrm0"
    # GPU
    nvml_library: str = "libnvidia-ml.so.1"
    # Retries against remote services
    http_timeout_s: float = 30.0
    max_retries: int = 4
    # Upper bound on what one unseal may write.
    max_bytes: int | None = None
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


_FIELDS = {f.name: f for f in dataclasses.fields(Config) if f.name != "sources"}


def _coerce(name: str, raw: Any, origin: str) -> Any:
    """Turn a TOML value or an environment string into the field's type, or raise."""
    kind = str(_FIELDS[name].type)

    def bad(why: str) -> ConfigError:
        return ConfigError(
            f"{origin}: key {name!r} = {raw!r}: {why}", reason=Reason.CONFIG_INVALID
        )

    if raw == "" and "None" in kind:
        return None  # an empty variable means "not set"
    if "bool" in kind:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "on", "0", "false", "no",
                                                     "off"):
            return raw.lower() in ("1", "true", "yes", "on")
        raise bad("expected a boolean")
    if "tuple" in kind:
        if isinstance(raw, str):
            items = [s.strip() for s in raw.split(",") if s.strip()]
        elif isinstance(raw, list) and all(isinstance(s, str) for s in raw):
            items = list(raw)
        else:
            raise bad("expected a list of strings")
        return tuple(s.rstrip("/") for s in items)
    if "int" in kind and "Path" not in kind:
        if isinstance(raw, bool):
            raise bad("expected an integer")
        try:
            value = parse_size(raw) if name == "max_bytes" and isinstance(raw, str) else int(raw)
        except (TypeError, ValueError):
            raise bad("expected an integer" + (" or a size like 64G" if name == "max_bytes"
                                               else "")) from None
        if value < 0:
            raise bad("must not be negative")
        return value
    if "float" in kind:
        try:
            value_f = float(raw)
        except (TypeError, ValueError):
            raise bad("expected a number") from None
        if value_f <= 0:
            raise bad("must be positive")
        return value_f
    if not isinstance(raw, str):
        raise bad("expected a string")
    if "Path" in kind:
        return Path(raw)
    return raw


def _validate(cfg: Config) -> None:
    def origin(key: str) -> str:
        return cfg.sources.get(key, "default")

    for key in ("maa_url", "keyvault_url", "key_id"):
        value = getattr(cfg, key)
        if value is None:
            continue
        url = urlparse(value)
        if url.scheme != "https" or not url.netloc:
            raise ConfigError(
                f"{origin(key)}: key {key!r} = {value!r}: expected an https:// URL",
                reason=Reason.CONFIG_INVALID,
            )
    for issuer in cfg.maa_allowed_issuers:
        if not issuer.startswith("https://"):
            raise ConfigError(
                f"{origin('maa_allowed_issuers')}: key 'maa_allowed_issuers' = {issuer!r}: "
                "expected https:// URLs",
                reason=Reason.CONFIG_INVALID,
            )
    if cfg.imds_url is not None and not cfg.imds_url.startswith(("http://", "https://")):
        raise ConfigError(
            f"{origin('imds_url')}: key 'imds_url' = {cfg.imds_url!r}: expected an http(s):// URL",
            reason=Reason.CONFIG_INVALID,
        )
    if cfg.skr_algorithm not in SKR_ALGORITHMS:
        raise ConfigError(
            f"{origin('skr_algorithm')}: key 'skr_algorithm' = {cfg.skr_algorithm!r}: "
            f"expected one of {', '.join(SKR_ALGORITHMS)}",
            reason=Reason.CONFIG_INVALID,
        )
    for key in ("ca_bundle", "keyvault_release_ca_bundle"):
        path = getattr(cfg, key)
        if path is not None and not path.is_file():
            raise ConfigError(
                f"{origin(key)}: key {key!r} = '{path}': no such file", reason=Reason.CONFIG_INVALID
            )


def load(
    config_dir: Path = CONFIG_DIR, environ: Mapping[str, str] | None = None
) -> Config:
    """Load and validate the configuration."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if config_dir.is_dir():
        for path in sorted(config_dir.glob("*.toml")):
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"{path}: cannot parse: {exc}", reason=Reason.CONFIG_INVALID) from None
            for key, raw in data.items():
                if key not in _FIELDS:
                    raise ConfigError(f"{path}: unknown key {key!r}", reason=Reason.CONFIG_INVALID)
                values[key] = _coerce(key, raw, str(path))
                sources[key] = str(path)
    for key in _FIELDS:
        var = ENV_PREFIX + key.upper()
        if var in env:
            values[key] = _coerce(key, env[var], f"${var}")
            sources[key] = f"${var}"
    if "imds_url" not in values and env.get("AZURE_POD_IDENTITY_AUTHORITY_HOST"):
        values["imds_url"] = env["AZURE_POD_IDENTITY_AUTHORITY_HOST"]
        sources["imds_url"] = "$AZURE_POD_IDENTITY_AUTHORITY_HOST"
    cfg = Config(**values, sources=sources)
    _validate(cfg)
    return cfg


def override(cfg: Config, **flags: Any) -> Config:
    """Apply command-line flags (None means 'not given') and validate again."""
    given = {k: v for k, v in flags.items() if v is not None}
    for key in given:
        if key not in _FIELDS:
            raise ConfigError(f"unknown configuration key {key!r}", reason=Reason.CONFIG_INVALID)
    sources = dict(cfg.sources)
    sources.update({k: f"--{k.replace('_', '-')}" for k in given})
    new = dataclasses.replace(cfg, **given, sources=sources)
    _validate(new)
    return new
