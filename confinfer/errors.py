"""The one error hierarchy: every expected failure carries a stable reason slug.

An expected failure is reported as one line (``confinfer: <reason>: <message>``), optionally
followed by a hint, and a non-zero exit. Integrity failures are deliberately opaque: their
messages never carry plaintext, key material or byte offsets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ConfinferError(Exception):
    """Base of every expected failure.

    ``reason`` is a stable, machine-readable slug (``release-policy-refused``); ``message`` is
    the human line; ``details`` is structured context safe to log; ``hint`` tells an operator
    what to do next.
    """

    reason = "error"
    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        details: Mapping[str, Any] | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.details: dict[str, Any] = dict(details or {})
        self.hint = hint

    def one_line(self) -> str:
        return f"{self.reason}: {self.message}"


class UsageError(ConfinferError):
    """The command line or input named something that cannot work."""

    reason = "usage"
    exit_code = 2


class ConfigError(ConfinferError):
    """A configuration file, key or value is invalid."""

    reason = "config"
    exit_code = 2


class IntegrityError(ConfinferError):
    """Authenticated data failed verification. Messages stay opaque by design."""

    reason = "integrity"


class UnsafeArchiveError(ConfinferError):
    """An archive entry would escape the destination or is not a plain file or directory."""

    reason = "unsafe-archive"


class KeyUnwrapError(ConfinferError):
    """A wrapped key could not be unwrapped (wrong key, corrupt blob)."""

    reason = "key-unwrap"


class TpmError(ConfinferError):
    """The vTPM refused an operation or is unreachable."""

    reason = "tpm"


class AttestationError(ConfinferError):
    """Attestation failed: the service refused the evidence or its token did not verify."""

    reason = "attestation"


class PolicyError(ConfinferError):
    """A token's claims do not satisfy a policy; ``details['claim']`` names the claim."""

    reason = "policy"


class KeyReleaseError(ConfinferError):
    """Key Vault refused or failed a Secure Key Release."""

    reason = "key-release"


class ServiceError(ConfinferError):
    """A remote service (IMDS, MAA, Key Vault) was unreachable or kept failing."""

    reason = "service"


class Interrupted(ConfinferError):
    """The work was interrupted by a signal; partial output has been removed."""

    reason = "interrupted"
    exit_code = 130


class FormatError(ConfinferError):
    """A package is not in a format we read, or its structure is malformed."""

    reason = "format"


class SizeLimitError(ConfinferError):
    """Writing would exceed the configured size cap (``max_bytes``)."""

    reason = "size-limit"


class NoSpaceError(ConfinferError):
    """The destination file system ran out of space (ENOSPC, EDQUOT)."""

    reason = "no-space"
