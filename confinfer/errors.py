"""The one error hierarchy and the one registry of failure reasons.

Every expected failure carries a :class:`Reason`: a stable slug that scripts, ``STATUS=`` lines
and dashboards key on. Each reason belongs to exactly one :class:`Kind`, and the kind decides
the exit code, taken from the BSD ``sysexits.h`` table that systemd also names in
``systemctl status`` (``status=77/NOPERM``). A unit can therefore say
``RestartPreventExitStatus=64 65 77 78``: restarting does not mend a usage error, a damaged or
hostile package, a refusal by MAA or Key Vault, or a bad configuration, while an unreachable
service (69) or a local fault (74) may pass.

An expected failure is reported as one line (``confinfer: <reason>: <message>``), optionally
followed by a hint, and a non-zero exit. Integrity failures are deliberately opaque: their
messages never carry plaintext, key material or byte offsets. Messages may quote what a package
or a server said; :func:`printable` makes such text one printable line before it is shown.

The exception classes exist for callers that catch a family of failures; the reason, not the
class, decides the exit code.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any


class Kind(enum.Enum):
    """A failure class and its exit code (sysexits.h)."""

    USAGE = 64  # EX_USAGE: the command line or the input named something that cannot work
    INTEGRITY = 65  # EX_DATAERR: a package or archive is damaged, hostile or for another key
    UNAVAILABLE = 69  # EX_UNAVAILABLE: a remote service is unreachable or keeps failing
    SOFTWARE = 70  # EX_SOFTWARE: an internal invariant was broken (a bug)
    SYSTEM = 74  # EX_IOERR: the vTPM, the file system or a local resource failed
    REFUSED = 77  # EX_NOPERM: attestation, a policy or Key Vault refused
    CONFIG = 78  # EX_CONFIG: the configuration is invalid
    INTERRUPTED = 130  # 128 + SIGINT: stopped by a signal, cleanup done

    @property
    def exit_code(self) -> int:
        return self.value


class Reason(enum.StrEnum):
    """Every failure reason the product reports. docs/operator-guide.md has a row for each."""

    # usage
    USAGE = "usage"
    CHUNK_SIZE = "chunk-size"
    DEST_INVALID = "dest-invalid"
    DEST_NOT_EMPTY = "dest-not-empty"
    KEY_FILE = "key-file"
    KEY_ID_INVALID = "key-id-invalid"
    MODEL_DIR = "model-dir"
    MODEL_TOO_MANY_FILES = "model-too-many-files"
    MODEL_LAYOUT = "model-layout"
    BLOB_NOT_FOUND = "blob-not-found"
    NO_KEY = "no-key"
    NO_KEY_ID = "no-key-id"
    PACKAGE_UNREADABLE = "package-unreadable"
    UNSUPPORTED_FILE = "unsupported-file"
    DEPLOY_USER_DATA_TOO_LARGE = "deploy-user-data-too-large"
    REQUEST_TOO_LARGE = "request-too-large"
    # integrity and format
    INTEGRITY = "integrity"
    FORMAT = "format"
    UNSAFE_ARCHIVE = "unsafe-archive"
    ARCHIVE_CHANGED = "archive-changed"
    ARCHIVE_MALFORMED = "archive-malformed"
    ARCHIVE_TOO_MANY_ENTRIES = "archive-too-many-entries"
    ARCHIVE_TOO_SHORT = "archive-too-short"
    ARCHIVE_TRUNCATED = "archive-truncated"
    BAD_MAGIC = "bad-magic"
    CHUNK_INTEGRITY = "chunk-integrity"
    DEK_LENGTH = "dek-length"
    DUPLICATE_ENTRY = "duplicate-entry"
    HEADER_INTEGRITY = "header-integrity"
    HEADER_INVALID = "header-invalid"
    KEY_MISMATCH = "key-mismatch"
    KEY_UNWRAP = "key-unwrap"
    MISSING_PARENT = "missing-parent"
    PATH_CONFLICT = "path-conflict"
    PATH_THROUGH_FILE = "path-through-file"
    TRAILING_DATA = "trailing-data"
    TRUNCATED = "truncated"
    UNSAFE_ENTRY_TYPE = "unsafe-entry-type"
    UNSAFE_PATH = "unsafe-path"
    UNSUPPORTED_FORMAT = "unsupported-format"
    WRAPPED_DEK_INVALID = "wrapped-dek-invalid"
    BLOB_NAME_UNSAFE = "blob-name-unsafe"
    HANDOFF_INVALID = "handoff-invalid"
    ONBOARD_DOWNLOAD_MISMATCH = "onboard-download-mismatch"
    ONBOARD_SIGNING_KEY_MISMATCH = "onboard-signing-key-mismatch"
    # a remote service is unavailable
    SERVICE = "service"
    ATTESTD_BAD_RESPONSE = "attestd-bad-response"
    ATTESTD_UNAVAILABLE = "attestd-unavailable"
    IMDS_BAD_RESPONSE = "imds-bad-response"
    IMDS_TLS = "imds-tls"
    IMDS_UNAVAILABLE = "imds-unavailable"
    KEYVAULT_TLS = "keyvault-tls"
    KEYVAULT_UNAVAILABLE = "keyvault-unavailable"
    MAA_TLS = "maa-tls"
    MAA_UNAVAILABLE = "maa-unavailable"
    RESPONSE_TOO_LARGE = "response-too-large"
    SKR_TOOL_TIMEOUT = "skr-tool-timeout"
    TOKEN_JWKS_UNAVAILABLE = "token-jwks-unavailable"
    DEPLOY_AZ_FAILED = "deploy-az-failed"
    EVIDENCE_RATE_LIMITED = "evidence-rate-limited"
    EVIDENCE_UNAVAILABLE = "evidence-unavailable"
    BLOB_UNAVAILABLE = "blob-unavailable"
    ONBOARD_DOWNLOAD_FAILED = "onboard-download-failed"
    # a bug
    KEK_CLOSED = "kek-closed"
    # the vTPM, the file system, local resources
    ERROR = "error"
    TPM = "tpm"
    DEST_WRITE = "dest-write"
    MODEL_CHANGED = "model-changed"
    NO_SPACE = "no-space"
    PACKAGE_READ = "package-read"
    SIZE_LIMIT = "size-limit"
    TPM_AK_CERT_INVALID = "tpm-ak-cert-invalid"
    TPM_AK_INVALID = "tpm-ak-invalid"
    TPM_AK_MISSING = "tpm-ak-missing"
    TPM_AUTH = "tpm-auth"
    TPM_BAD_PUBLIC = "tpm-bad-public"
    TPM_BAD_REQUEST = "tpm-bad-request"
    TPM_CLOSED = "tpm-closed"
    TPM_DECRYPT_FAILED = "tpm-decrypt-failed"
    TPM_EPHEMERAL_CHANGED = "tpm-ephemeral-changed"
    TPM_ERROR = "tpm-error"
    TPM_LOCKOUT = "tpm-lockout"
    TPM_NO_SHA256_BANK = "tpm-no-sha256-bank"
    TPM_NV_EMPTY = "tpm-nv-empty"
    TPM_NV_MISSING = "tpm-nv-missing"
    TPM_REPORT_STALE = "tpm-report-stale"
    TPM_UNREACHABLE = "tpm-unreachable"
    WIPE_FAILED = "wipe-failed"
    ATTESTD_SOCKET = "attestd-socket"
    MODEL_DIR_BUSY = "model-dir-busy"
    MODEL_MOUNT = "model-mount"
    # onboarding (confinfer onboard) and the unit installer (confinfer install-units)
    ONBOARD_COMMAND_FAILED = "onboard-command-failed"
    ONBOARD_EFFECT_MISSING = "onboard-effect-missing"
    ONBOARD_ATTEMPTS_EXHAUSTED = "onboard-attempts-exhausted"
    ONBOARD_STATE_INVALID = "onboard-state-invalid"
    ONBOARD_REBOOT_TIMEOUT = "onboard-reboot-timeout"
    INSTALL_SOURCE_MISSING = "install-source-missing"
    INSTALL_WRITE_FAILED = "install-write-failed"
    # the serving engine (vllm-supervisor)
    HANDOFF_MISSING = "handoff-missing"
    DOCKER_UNAVAILABLE = "docker-unavailable"
    ENGINE_START_FAILED = "engine-start-failed"
    ENGINE_EXITED = "engine-exited"
    ENGINE_NOT_READY = "engine-not-ready"
    ENGINE_UNHEALTHY = "engine-unhealthy"
    # refused: attestation, policy, Key Vault
    ATTESTATION = "attestation"
    POLICY = "policy"
    KEY_RELEASE = "key-release"
    AK_CERT_RENEWAL_INVALID = "ak-cert-renewal-invalid"
    HCL_AK_MISMATCH = "hcl-ak-mismatch"
    HCL_REPORT_BINDING = "hcl-report-binding"
    HCL_REPORT_INVALID = "hcl-report-invalid"
    HCL_REPORT_UNSUPPORTED = "hcl-report-unsupported"
    IMDS_TOKEN_REFUSED = "imds-token-refused"
    KEK_NOT_RSA = "kek-not-rsa"
    KEY_NOT_FOUND = "key-not-found"
    KEYVAULT_CHALLENGE_INVALID = "keyvault-challenge-invalid"
    KEYVAULT_FORBIDDEN = "keyvault-forbidden"
    KEYVAULT_UNAUTHORIZED = "keyvault-unauthorized"
    KEYVAULT_FAILED = "keyvault-failed"
    MAA_BAD_RESPONSE = "maa-bad-response"
    MAA_REFUSED = "maa-refused"
    MAA_RESPONSE_INTEGRITY = "maa-response-integrity"
    MAA_TOKEN_UNBOUND = "maa-token-unbound"
    POLICY_UNSATISFIED = "policy-unsatisfied"
    POLICY_UNTRUSTED_ISSUER = "policy-untrusted-issuer"
    RELEASE_ANSWER_INVALID = "release-answer-invalid"
    RELEASE_KEY_MISMATCH = "release-key-mismatch"
    RELEASE_NONCE_MISMATCH = "release-nonce-mismatch"
    RELEASE_REFUSED = "release-refused"
    RELEASE_SIGNATURE_INVALID = "release-signature-invalid"
    SKR_TOOL_FAILED = "skr-tool-failed"
    SKR_TOOL_OUTPUT = "skr-tool-output"
    TOKEN_BAD_SIGNATURE = "token-bad-signature"
    TOKEN_EXPIRED = "token-expired"
    TOKEN_JWKS_INVALID = "token-jwks-invalid"
    TOKEN_MALFORMED = "token-malformed"
    TOKEN_NOT_YET_VALID = "token-not-yet-valid"
    TOKEN_UNKNOWN_KID = "token-unknown-kid"
    TOKEN_UNTRUSTED_ISSUER = "token-untrusted-issuer"
    TPM_PCR_CHANGED = "tpm-pcr-changed"
    TPM_PCR_POLICY = "tpm-pcr-policy"
    TRANSFER_BLOB_INVALID = "transfer-blob-invalid"
    TRUST_ANCHOR_INVALID = "trust-anchor-invalid"
    DEPLOY_NOT_LOGGED_IN = "deploy-not-logged-in"
    DEPLOY_PROVIDER_UNREGISTERED = "deploy-provider-unregistered"
    DEPLOY_SIZE_UNAVAILABLE = "deploy-size-unavailable"
    DEPLOY_NO_QUOTA = "deploy-no-quota"
    DEPLOY_KEY_WITHOUT_POLICY = "deploy-key-without-policy"
    API_KEY_REQUIRED = "api-key-required"
    BLOB_FORBIDDEN = "blob-forbidden"
    MODEL_SWAP = "model-swap"
    # configuration
    CONFIG = "config"
    CONFIG_INVALID = "config-invalid"
    POLICY_INVALID = "policy-invalid"
    SKR_TOOL_MISSING = "skr-tool-missing"
    MODEL_SOURCE_INVALID = "model-source-invalid"
    SERVING_IMAGE_MISSING = "serving-image-missing"
    ONBOARD_PIN_MISSING = "onboard-pin-missing"
    # signals
    INTERRUPTED = "interrupted"
    # attestd states short of revoked: starting, healthy, degraded inside a grace. A client that
    # must fail on one (the loader tired of waiting for healthy) fails as unavailable.
    ATTESTD_STARTING = "attestd-starting"
    ATTESTD_HEALTHY = "attestd-healthy"
    ATTESTD_REATTESTING = "attestd-reattesting"
    AK_CERT_RENEWAL_FAILED = "ak-cert-renewal-failed"
    GPU_COLLATERAL_UNAVAILABLE = "gpu-collateral-unavailable"
    GPU_RESET = "gpu-reset"
    GPU_VERIFIER_TIMEOUT = "gpu-verifier-timeout"
    # attestd revoked: a measured hard failure, or a grace that expired
    GPU_CC_OFF = "gpu-cc-off"
    GPU_NOT_PRODUCTION = "gpu-not-production"
    GPU_DEVTOOLS = "gpu-devtools"
    GPU_COUNT_MISMATCH = "gpu-count-mismatch"
    GPU_LOST = "gpu-lost"
    GPU_EVIDENCE_INVALID = "gpu-evidence-invalid"
    GPU_NONCE_MISMATCH = "gpu-nonce-mismatch"
    GPU_VERIFIER_FAILED = "gpu-verifier-failed"
    GRACE_EXPIRED = "grace-expired"
    AK_CERT_EXPIRED = "ak-cert-expired"

    @property
    def kind(self) -> Kind:
        return _KINDS[self]

    @property
    def exit_code(self) -> int:
        return self.kind.exit_code


def _kinds() -> dict[Reason, Kind]:
    """Each reason's kind, from the section of :class:`Reason` it is declared in."""
    first = {
        Reason.USAGE: Kind.USAGE,
        Reason.INTEGRITY: Kind.INTEGRITY,
        Reason.SERVICE: Kind.UNAVAILABLE,
        Reason.KEK_CLOSED: Kind.SOFTWARE,
        Reason.ERROR: Kind.SYSTEM,
        Reason.ATTESTATION: Kind.REFUSED,
        Reason.CONFIG: Kind.CONFIG,
        Reason.INTERRUPTED: Kind.INTERRUPTED,
        Reason.ATTESTD_STARTING: Kind.UNAVAILABLE,
        Reason.GPU_CC_OFF: Kind.REFUSED,
    }
    kinds: dict[Reason, Kind] = {}
    current = Kind.USAGE
    for reason in Reason:
        current = first.get(reason, current)
        kinds[reason] = current
    return kinds


_KINDS = _kinds()


def printable(text: object, limit: int = 500) -> str:
    """``text`` as one printable line: control and non-printable characters escaped
    (``\\n``, ``\\x1b``, ``\\u202e``), cut to ``limit`` characters.

    Used for every string that did not come from this program (a package's key id, a server's
    error message) before a person or the journal sees it, so that it can neither forge a log
    line (a newline followed by ``<0>``) nor hide in terminal escapes.
    """
    out: list[str] = []
    for ch in str(text):
        if ch.isprintable():
            out.append(ch)
        elif ch in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    line = "".join(out)
    return line if len(line) <= limit else line[: limit - 3] + "..."


class ConfinferError(Exception):
    """Base of every expected failure.

    ``reason`` is a :class:`Reason` (``release-refused``); ``message`` is the human line;
    ``details`` is structured context safe to log; ``hint`` tells an operator what to do next.
    """

    reason: Reason = Reason.ERROR

    def __init__(
        self,
        message: str,
        *,
        reason: Reason | None = None,
        details: Mapping[str, Any] | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.details: dict[str, Any] = dict(details or {})
        self.hint = hint

    @property
    def exit_code(self) -> int:
        return self.reason.exit_code

    def one_line(self) -> str:
        return f"{self.reason}: {printable(self.message, 4000)}"


class UsageError(ConfinferError):
    """The command line or input named something that cannot work."""

    reason = Reason.USAGE


class ConfigError(ConfinferError):
    """A configuration file, key or value is invalid."""

    reason = Reason.CONFIG


class IntegrityError(ConfinferError):
    """Authenticated data failed verification. Messages stay opaque by design."""

    reason = Reason.INTEGRITY


class UnsafeArchiveError(ConfinferError):
    """An archive entry would escape the destination or is not a plain file or directory."""

    reason = Reason.UNSAFE_ARCHIVE


class KeyUnwrapError(ConfinferError):
    """A wrapped key could not be unwrapped (wrong key, corrupt blob)."""

    reason = Reason.KEY_UNWRAP


class TpmError(ConfinferError):
    """The vTPM refused an operation or is unreachable."""

    reason = Reason.TPM


class AttestationError(ConfinferError):
    """Attestation failed: the service refused the evidence or its token did not verify."""

    reason = Reason.ATTESTATION


class PolicyError(ConfinferError):
    """A token's claims do not satisfy a policy; ``details['claim']`` names the claim."""

    reason = Reason.POLICY


class KeyReleaseError(ConfinferError):
    """Key Vault refused or failed a Secure Key Release."""

    reason = Reason.KEY_RELEASE


class ServiceError(ConfinferError):
    """A remote service (IMDS, MAA, Key Vault) was unreachable or kept failing."""

    reason = Reason.SERVICE


class Interrupted(ConfinferError):
    """The work was interrupted by a signal; partial output has been removed."""

    reason = Reason.INTERRUPTED


class FormatError(ConfinferError):
    """A package is not in a format we read, or its structure is malformed."""

    reason = Reason.FORMAT


class SizeLimitError(ConfinferError):
    """Writing would exceed the configured size cap (``max_bytes``)."""

    reason = Reason.SIZE_LIMIT


class NoSpaceError(ConfinferError):
    """The destination file system ran out of space (ENOSPC, EDQUOT)."""

    reason = Reason.NO_SPACE
