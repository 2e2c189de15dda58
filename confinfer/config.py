"""Configuration: one frozen, typed dataclass, filled from one table of settings.

Sources, lowest precedence first: built-in defaults, ``/etc/confinfer/*.toml`` (files read in
name order; keys at top level), ``CONFINFER_<KEY>`` environment variables (what
``testbed.env`` sets), then command-line flags applied by the caller with :func:`override`.

Every key has one :class:`Setting` in :data:`SETTINGS`: its name, its parser, its default and a
one-line doc (after mkosi's ``ConfigSetting`` table). The TOML files, the environment, the flags
and the docs test all go through that table, so a value means the same wherever it is written. A
parser (confinfer.configvalues) is a small named function that accepts the TOML value, the
flag's Python value or the text of a variable, and raises :class:`Invalid` with the reason it
refuses; :func:`load` turns that into one ``config-invalid`` error naming the origin (file path
or ``$VAR``), the key and the value, and :func:`override` into a usage error (``usage``, or
``key-id-invalid`` for ``--key-id``) naming the ``--flag``, the key and the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic

from confinfer.configvalues import (
    GiB,
    Invalid,
    MiB,
    Parse,
    PiB,
    T,
    existing_file,
    human,
    optional,
    parse_bool,
    parse_bytes,
    parse_choice,
    parse_http_url,
    parse_https_url,
    parse_int,
    parse_key_id,
    parse_list,
    parse_path,
    parse_seconds,
    parse_sha256,
    parse_str,
    refused,
    show,
)
from confinfer.errors import ConfigError, Reason, UsageError

CONFIG_DIR = Path("/etc/confinfer")
ENV_PREFIX = "CONFINFER_"

SKR_ALGORITHMS = ("RSA_AES_KEY_WRAP_256", "CKM_RSA_AES_KEY_WRAP", "RSA_AES_KEY_WRAP_384")
AZURE_CREDENTIALS = ("auto", "managed-identity", "cli", "default")
# onboard_hardware: the Azure VM itself, or the testbed's stand-ins (testbed/onboard.py).
ONBOARD_HARDWARE = ("azure", "testbed")

MAX_FILE_BYTES = 1 * MiB  # a configuration file larger than this is refused unread


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
    nvattest_path: Path | None = None
    nvattest_rim_url: str | None = None
    nvattest_ocsp_url: str | None = None
    nvattest_rim_dir: Path | None = None
    gpu_evidence_timeout_s: float = 120.0
    gpu_evidence_max_age_s: float = 300.0
    gpu_expected_count: int = 1
    gpu_fast_check_s: float = 5.0
    gpu_evidence_backend: str = "nvattest"
    gpu_lgv_venv: Path | None = None
    gpu_evidence_interval_s: float = 900.0
    gpu_grace_s: float = 3600.0
    gpu_reset_grace_s: float = 120.0
    vtpm_attest_interval_s: float = 900.0
    vtpm_grace_s: float = 3600.0
    vtpm_policy: Path | None = None
    ak_cert_renew_days: int = 90
    attestd_socket: Path = Path("/run/attestd/attestd.sock")
    attestd_socket_group: str | None = None
    evidence_rate_per_min: int = 60
    evidence_tls_key: Path | None = None
    model_source: str | None = None
    model_dir: Path = Path("/run/confinfer/model")
    model_tmpfs_bytes: int | None = None
    model_allow_swap: bool = False
    serving_uid: int = 10001
    serving_gid: int = 10001
    loader_attestd_wait_s: float = 600.0
    loader_attestd_grace_s: float = 30.0
    serving_image: str = "confinfer/vllm-openai:serving"
    serving_port: int = 8000
    serving_model_name: str = "model"
    serving_args: tuple[str, ...] = ()
    serving_ready_timeout_s: float = 900.0
    serving_gpus: bool = True
    docker_host: str = "unix:///var/run/docker.sock"
    onboard_hardware: str = "azure"
    onboard_nvattest_url: str | None = None
    onboard_nvattest_sha256: str | None = None
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
    Setting(
        "nvattest_path",
        parse=optional(parse_path),
        default=None,
        doc="The nvattest CLI that attestd runs for GPU evidence; unset means nvattest on PATH.",
    ),
    Setting(
        "nvattest_rim_url",
        parse=optional(parse_https_url),
        default=None,
        doc="RIM service base URL nvattest uses (--rim-url); unset means nvattest's default.",
    ),
    Setting(
        "nvattest_ocsp_url",
        parse=optional(parse_https_url),
        default=None,
        doc="OCSP responder URL nvattest uses (--ocsp-url); unset means nvattest's default.",
    ),
    Setting(
        "nvattest_rim_dir",
        parse=optional(parse_path),
        default=None,
        doc="A local directory of RIM files nvattest reads instead of the RIM service.",
    ),
    Setting(
        "gpu_evidence_timeout_s",
        parse=parse_seconds(3600.0),
        default=120.0,
        doc="Overall deadline of one nvattest run; on expiry its process group is killed.",
    ),
    Setting(
        "gpu_evidence_max_age_s",
        parse=parse_seconds(86400.0),
        default=300.0,
        doc="Oldest GPU evidence result (its EAT's iat) accepted as fresh.",
    ),
    Setting(
        "gpu_expected_count",
        parse=parse_int(0, 64),
        default=1,
        doc="GPUs this VM must have; the fast checks compare NVML's count with it.",
    ),
    Setting(
        "gpu_fast_check_s",
        parse=parse_seconds(300.0),
        default=5.0,
        doc="Interval of attestd's NVML fast checks (CC mode, environment, DevTools, GPU set).",
    ),
    Setting(
        "gpu_evidence_backend",
        parse=parse_choice("nvattest", "lgv"),
        default="nvattest",
        doc="GPU evidence verifier: nvattest, or lgv (NVIDIA's legacy Python verifier).",
    ),
    Setting(
        "gpu_lgv_venv",
        parse=optional(parse_path),
        default=None,
        doc="Virtualenv of NVIDIA's legacy Python local GPU verifier (gpu_evidence_backend = lgv).",
    ),
    Setting(
        "gpu_evidence_interval_s",
        parse=parse_seconds(86400.0),
        default=900.0,
        doc="Interval of attestd's full GPU evidence attestation (also run on a reset).",
    ),
    Setting(
        "gpu_grace_s",
        parse=parse_seconds(7 * 86400.0),
        default=3600.0,
        doc="How long a GPU evidence pass stays good while its collateral is unreachable.",
    ),
    Setting(
        "gpu_reset_grace_s",
        parse=parse_seconds(3600.0),
        default=120.0,
        doc="How long a reset GPU's evidence may take to pass again before it is revoked.",
    ),
    Setting(
        "vtpm_attest_interval_s",
        parse=parse_seconds(86400.0),
        default=900.0,
        doc="Interval of attestd's MAA guest attestation (shortened to half a token's life).",
    ),
    Setting(
        "vtpm_grace_s",
        parse=parse_seconds(7 * 86400.0),
        default=3600.0,
        doc="How long a vTPM pass stays good while MAA or IMDS is unreachable.",
    ),
    Setting(
        "vtpm_policy",
        parse=optional(parse_path),
        default=None,
        doc="Claims policy (release-policy grammar) for attestd's MAA token; unset: built in.",
        check=existing_file,
    ),
    Setting(
        "ak_cert_renew_days",
        parse=parse_int(1, 3650),
        default=90,
        doc="attestd renews the vTPM's AK certificate through IMDS when it has fewer days left.",
    ),
    Setting(
        "attestd_socket",
        parse=parse_path,
        default=Path("/run/attestd/attestd.sock"),
        doc="attestd's Unix socket (health, events, evidence, metrics).",
    ),
    Setting(
        "attestd_socket_group",
        parse=optional(parse_str),
        default=None,
        doc="Group that owns attestd's socket (mode 0660); unset means attestd's own group.",
    ),
    Setting(
        "evidence_rate_per_min",
        parse=parse_int(1, 6000),
        default=60,
        doc="Most /v1/evidence answers attestd gives per minute (each is a fresh MAA attestation).",
    ),
    Setting(
        "evidence_tls_key",
        parse=optional(parse_path),
        default=None,
        doc="PEM certificate or public key whose SPKI SHA-256 /v1/evidence binds (Caddy's key).",
    ),
    Setting(
        "model_source",
        parse=optional(parse_str),
        default=None,
        doc="The sealed package model-loader serves: a local directory or an https Blob prefix.",
    ),
    Setting(
        "model_dir",
        parse=parse_path,
        default=Path("/run/confinfer/model"),
        doc="Where model-loader mounts the model tmpfs (visible to the container engine).",
    ),
    Setting(
        "model_tmpfs_bytes",
        parse=optional(parse_bytes(1, 1 * PiB)),
        default=None,
        doc="Size cap of the model tmpfs; unset means the package's plaintext size plus 5%.",
    ),
    Setting(
        "model_allow_swap",
        parse=parse_bool,
        default=False,
        doc="Serve even when swap is on and the kernel's tmpfs has no noswap option.",
    ),
    Setting(
        "serving_uid",
        parse=parse_int(1, 2**31 - 1),
        default=10001,
        doc="The uid the engine runs as; model-loader hands the model tree to it read-only.",
    ),
    Setting(
        "serving_gid",
        parse=parse_int(1, 2**31 - 1),
        default=10001,
        doc="The gid the engine runs as.",
    ),
    Setting(
        "loader_attestd_wait_s",
        parse=parse_seconds(86400.0),
        default=600.0,
        doc="How long model-loader waits for attestd to be healthy before it fails.",
    ),
    Setting(
        "loader_attestd_grace_s",
        parse=parse_seconds(3600.0),
        default=30.0,
        doc="How long model-loader keeps the model while attestd cannot be reached.",
    ),
    Setting(
        "serving_image",
        parse=parse_str,
        default="confinfer/vllm-openai:serving",
        doc="The serving container image (production: vLLM's image pinned by digest).",
    ),
    Setting(
        "serving_port",
        parse=parse_int(1, 65535),
        default=8000,
        doc="The engine's port on 127.0.0.1 (Caddy proxies to it).",
    ),
    Setting(
        "serving_model_name",
        parse=parse_str,
        default="model",
        doc="The model name the OpenAI API serves (--served-model-name).",
    ),
    Setting(
        "serving_args",
        parse=parse_list(parse_str),
        default=(),
        doc="Extra arguments for the engine (vLLM's serve flags).",
    ),
    Setting(
        "serving_ready_timeout_s",
        parse=parse_seconds(86400.0),
        default=900.0,
        doc="How long vllm.service waits for the engine's /health before it fails.",
    ),
    Setting(
        "serving_gpus",
        parse=parse_bool,
        default=True,
        doc="Request the GPUs for the serving container (off only for the CPU test engine).",
    ),
    Setting(
        "docker_host",
        parse=parse_str,
        default="unix:///var/run/docker.sock",
        doc="The container engine's API socket.",
    ),
    Setting(
        "onboard_hardware",
        parse=parse_choice(*ONBOARD_HARDWARE),
        default="azure",
        doc="What onboarding's stages act on: azure (the VM) or testbed (the stand-ins).",
    ),
    Setting(
        "onboard_nvattest_url",
        parse=optional(parse_https_url),
        default=None,
        doc="The nvattest .deb that onboarding installs (https); needed on Azure.",
    ),
    Setting(
        "onboard_nvattest_sha256",
        parse=optional(parse_sha256),
        default=None,
        doc="SHA-256 of that .deb; onboarding installs it only if the digest matches.",
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
        f"{origin}: unknown key {show(key)}",
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
            raise bad(f"larger than {human(MAX_FILE_BYTES)}")
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


def load(
    config_dir: Path = CONFIG_DIR,
    environ: Mapping[str, str] | None = None,
    *,
    files: tuple[Path, ...] | None = None,
) -> Config:
    """Load and validate the configuration. ``files`` replaces the directory's ``*.toml``
    (``attestd --config FILE``); each must exist."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if files is None:
        files = tuple(sorted(config_dir.glob("*.toml"))) if config_dir.is_dir() else ()
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


def _flag_error(key: str, exc: ConfigError) -> UsageError:
    """A refused flag value is a usage error (64), not a configuration error: the same
    message, with ``key-id-invalid`` for ``--key-id`` and ``usage`` for any other flag."""
    reason = Reason.KEY_ID_INVALID if key == "key_id" else Reason.USAGE
    return UsageError(exc.message, reason=reason, details=exc.details, hint=exc.hint)


def override(cfg: Config, **flags: Any) -> Config:
    """Apply command-line flags (None means 'not given'), parsed and checked like any value.
    A refused flag value raises :class:`UsageError` (see :func:`_flag_error`)."""
    values: dict[str, Any] = {}
    sources = dict(cfg.sources)
    for key, raw in flags.items():
        if raw is None:
            continue
        setting = BY_NAME.get(key)
        if setting is None:
            raise ConfigError(f"unknown configuration key {key!r}", reason=Reason.CONFIG_INVALID)
        try:
            values[key] = setting.value(raw, setting.flag)
        except ConfigError as exc:
            raise _flag_error(key, exc) from None
        sources[key] = setting.flag
    try:
        return _checked(dataclasses.replace(cfg, **values, sources=sources))
    except ConfigError as exc:
        key = str(exc.details.get("key", ""))
        if key in values:  # the flag's own value failed its check (a file that is missing)
            raise _flag_error(key, exc) from None
        raise
