"""attestd's vTPM check: MAA guest attestation with a claims policy, and AK-certificate renewal.

:meth:`VtpmChecker.attest` runs one MAA guest attestation (:func:`confinfer.maa.attest`, which
verifies the token against the configured issuers' JWKS and its binding to this attestation's
TPM key and nonce), then evaluates the token's claims against the claims policy, and returns
the state machine's observation (:mod:`attestd.state`) in a :class:`VtpmResult`:

- :class:`~attestd.state.VtpmPassed` with the token's ``exp``;
- :class:`~attestd.state.VtpmUnreachable` for a failure whose reason is of the unavailable kind:
  MAA, IMDS (THIM) or the JWKS endpoint down, 5xx or timeouts after the HTTP layer's retries,
  a TLS failure, an oversized answer (``maa-unavailable``, ``imds-unavailable``, ...);
- :class:`~attestd.state.VtpmNonCompliant` for every other expected failure, with its own
  reason: MAA refused the evidence, the token's signature, issuer or binding did not verify,
  a claim does not satisfy the policy (``policy-unsatisfied`` naming the claim), and every vTPM
  failure (``tpm-unreachable`` included): what cannot be measured fails closed.

No expected failure raises; a bug does.

**The claims policy** is Key Vault's release-policy grammar (:mod:`confinfer.policy`), so one
policy reads the same in Key Vault and here. ``vtpm_policy`` names a file that replaces the
built-in one, :data:`DEFAULT_POLICY` (an Azure-compliant SEV-SNP CVM, secure boot on, not
debuggable), whose authorities are the configured issuers (``maa_allowed_issuers``, else
``maa_url``): a token from any other issuer is ``policy-untrusted-issuer``. The policy is read
once, when the checker is made; an invalid one is a ``policy-invalid`` error then.

**The AK certificate.** :meth:`VtpmChecker.renew_if_due` renews the vTPM's AK certificate (NV
0x01C101D0) when it has fewer than ``ak_cert_renew_days`` days left, as Microsoft's guest
attestation library does (TpmCertOperations::RenewAndReplaceAkCert): the VM id and a renewal
from IMDS (:func:`confinfer.imds.renew_ak_certificate`), then the certificate written into the
NV index (:meth:`confinfer.tpm.Vtpm.write_ak_cert`). The answer is hostile until checked
(:func:`check_renewed`): it is installed only when it certifies the same RSA key as the vTPM's
AK at 0x81000003, expires later than the current certificate and is valid now; anything else is
``ak-cert-renewal-invalid`` and the NV index is left alone. Its issuer's chain is MAA's to judge:
MAA verifies the AK certificate at every attestation. The library's asynchronous fallback
(API 2021-12-01 and a query a minute later) is not used.

**Concurrency and the vTPM.** The periodic check and attestd's ``/v1/evidence`` call this
checker from worker threads at once: one lock serialises every use of the vTPM (an attestation
holds it from the first TPM command until the answer is opened; a renewal only while it reads
and writes the TPM, not during its IMDS requests), and a second lock lets one renewal run at a
time. The vTPM is opened for each use and closed after it, so a vTPM that restarted (swtpm, a
resource manager) is simply reached again on the next call; an attestation that meets it down
reports ``tpm-unreachable``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from attestd.state import (
    AkCertRenewalFailed,
    AkCertRenewed,
    VtpmNonCompliant,
    VtpmPassed,
    VtpmUnreachable,
)
from confinfer import imds, maa, policy
from confinfer.config import Config
from confinfer.errors import (
    AttestationError,
    ConfinferError,
    Kind,
    Reason,
    UsageError,
    printable,
)
from confinfer.http import Http
from confinfer.tpm import AK_CERT_MAX_BYTES, Vtpm, rsa_numbers

LOG = logging.getLogger(__name__)

DETAIL_CHARS = 300
DAY_S = 86400.0
CLOCK_SKEW_S = 300.0  # a renewed certificate may start this far in the future

# The built-in claims policy: the ``allOf`` rules under each configured issuer. Claim names as
# MAA's AzureGuest token carries them: the isolation claims in ``x-ms-isolation-tee``, secure
# boot at the top level.
DEFAULT_POLICY: tuple[Mapping[str, Any], ...] = (
    {"claim": "x-ms-isolation-tee.x-ms-attestation-type", "equals": "sevsnpvm"},
    {"claim": "x-ms-isolation-tee.x-ms-compliance-status", "equals": "azure-compliant-cvm"},
    {"claim": "secureboot", "equals": True},
    {"claim": "x-ms-isolation-tee.x-ms-sevsnpvm-is-debuggable", "equals": False},
)

# The states' own reasons are never a service's failure (attestd.state refuses them there).
_STATE_REASONS = frozenset(
    {Reason.ATTESTD_STARTING, Reason.ATTESTD_HEALTHY, Reason.ATTESTD_REATTESTING}
)

VtpmObservation = VtpmPassed | VtpmNonCompliant | VtpmUnreachable
VtpmOpener = Callable[[str], Vtpm]


def default_policy(cfg: Config) -> policy.Policy:
    """:data:`DEFAULT_POLICY` under each configured issuer."""
    return policy.parse(
        {
            "version": policy.VERSION,
            "anyOf": [
                {"authority": issuer, "allOf": [dict(rule) for rule in DEFAULT_POLICY]}
                for issuer in cfg.issuers
            ],
        }
    )


def load_policy(cfg: Config) -> policy.Policy:
    """The claims policy: the ``vtpm_policy`` file, else the built-in one."""
    if cfg.vtpm_policy is not None:
        return policy.load(cfg.vtpm_policy)
    return default_policy(cfg)


def _detail(text: object) -> str:
    return printable(text, DETAIL_CHARS)


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


# --- attestation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class VtpmResult:
    """One attestation: the observation, how long it took, and on a pass the verified token,
    its claims and its expiry (``exp``)."""

    observation: VtpmObservation
    duration_s: float
    token: str | None = None
    claims: Mapping[str, Any] | None = None
    expiry: float | None = None

    @property
    def passed(self) -> bool:
        return isinstance(self.observation, VtpmPassed)


def classify(exc: ConfinferError) -> VtpmNonCompliant | VtpmUnreachable:
    """The observation for an attestation that failed with ``exc``."""
    detail = _detail(exc.message)
    if exc.reason.kind is Kind.UNAVAILABLE:
        if exc.reason not in _STATE_REASONS:
            return VtpmUnreachable(exc.reason, detail)
        # Not a failure attestation can raise; whatever it was, it is no pass.
        return VtpmNonCompliant(Reason.ATTESTATION, _detail(f"{exc.reason}: {exc.message}"))
    return VtpmNonCompliant(exc.reason, detail)


def token_expiry(claims: Mapping[str, Any]) -> float:
    """The token's ``exp`` as epoch seconds (confinfer.token already requires it)."""
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        raise AttestationError(
            f"token exp {_detail(repr(exp))} is not a number", reason=Reason.TOKEN_MALFORMED
        )
    return float(exp)


def _check_bound_data(bound_data: Mapping[str, str] | None) -> None:
    """What the caller binds is attestd's own; a mistake there is a bug, never a measurement."""
    for key, value in (bound_data or {}).items():
        if not isinstance(key, str) or not isinstance(value, str) or key == "nonce":
            raise UsageError(
                f"bound data {printable(repr(key), 80)} cannot be carried (string keys and "
                "values, not 'nonce')",
                reason=Reason.USAGE,
            )


# --- the AK certificate -----------------------------------------------------------------------


@dataclass(frozen=True)
class AkCertStatus:
    """The AK certificate the vTPM holds: when it expires and how many days that is away
    (negative once expired)."""

    expiry: float
    days_left: float


@dataclass(frozen=True)
class AkCertResult:
    """A renewal that was due: its observation, and the days left of the certificate the vTPM
    holds afterwards (the new one, or the current one when renewal failed)."""

    observation: AkCertRenewed | AkCertRenewalFailed
    days_left: float


def _certificate(der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        raise AttestationError(
            "the AK certificate is not a DER certificate", reason=Reason.TPM_AK_CERT_INVALID
        ) from None


def cert_status(cert: x509.Certificate, now: float) -> AkCertStatus:
    expiry = cert.not_valid_after_utc.timestamp()
    return AkCertStatus(expiry=expiry, days_left=(expiry - now) / DAY_S)


def renewal_due(status: AkCertStatus, renew_days: int) -> bool:
    """Whether a certificate with ``status`` is renewed: fewer than ``renew_days`` days left,
    or expired."""
    return status.days_left < renew_days


def _invalid(message: str) -> AttestationError:
    return AttestationError(
        f"renewed AK certificate refused: {message}", reason=Reason.AK_CERT_RENEWAL_INVALID
    )


def check_renewed(
    pem: str, current: x509.Certificate, ak_public: bytes, now: float
) -> x509.Certificate:
    """The renewed certificate in ``pem``, if it may replace ``current``: it certifies the RSA
    key of the vTPM's AK (``ak_public``, a marshalled TPM2B_PUBLIC), expires later than
    ``current`` and is valid at ``now``. Otherwise :class:`AttestationError`
    (``ak-cert-renewal-invalid``) naming the check that failed."""
    try:
        renewed = x509.load_pem_x509_certificate(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise _invalid("not a PEM certificate") from None
    key = renewed.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise _invalid("it certifies a key that is not RSA, not the vTPM's AK")
    numbers = key.public_numbers()
    if (numbers.n, numbers.e) != rsa_numbers(ak_public):
        raise _invalid("it certifies another key than the vTPM's AK at 0x81000003")
    old_end, new_end = current.not_valid_after_utc, renewed.not_valid_after_utc
    if new_end <= old_end:
        raise _invalid(
            f"it expires {new_end.isoformat()}, no later than the current one "
            f"({old_end.isoformat()})"
        )
    start = renewed.not_valid_before_utc.timestamp()
    if start > now + CLOCK_SKEW_S or new_end.timestamp() <= now:
        raise _invalid(
            f"it is not valid now (valid {renewed.not_valid_before_utc.isoformat()} to "
            f"{new_end.isoformat()})"
        )
    if len(renewed.public_bytes(serialization.Encoding.DER)) > AK_CERT_MAX_BYTES:
        raise _invalid(f"it is larger than {AK_CERT_MAX_BYTES} bytes")
    return renewed


# --- the checker ------------------------------------------------------------------------------


class VtpmChecker:
    """The vTPM check of one attestd; thread-safe (see the module's notes on concurrency).

    ``opener`` opens the vTPM for one use (default :class:`confinfer.tpm.Vtpm` on
    ``tpm_tcti``); ``http`` makes the HTTP session of one call (default
    :class:`confinfer.http.Http` on the configuration).
    """

    def __init__(
        self,
        cfg: Config,
        *,
        opener: VtpmOpener = Vtpm,
        http: Callable[[Config], Http] = Http,
    ) -> None:
        self._cfg = cfg
        self._policy = load_policy(cfg)
        self._open = opener
        self._http = http
        self._tpm_lock = threading.Lock()
        self._renew_lock = threading.Lock()

    @property
    def policy(self) -> policy.Policy:
        return self._policy

    def attest(
        self, *, nonce: bytes | None = None, bound_data: Mapping[str, str] | None = None
    ) -> VtpmResult:
        """One MAA guest attestation, its token verified and its claims checked.

        ``nonce`` (default: 32 random bytes) and ``bound_data`` go into the token's client
        payload. Raises only for a bug: :class:`UsageError` for bound data that cannot be
        carried, and anything unexpected.
        """
        _check_bound_data(bound_data)
        with self._tpm_lock:
            started = time.monotonic()
            try:
                with self._open(self._cfg.tpm_tcti) as vtpm, self._http(self._cfg) as http:
                    result = maa.attest(
                        vtpm, self._cfg, nonce=nonce, bound_data=bound_data, http=http
                    )
            except ConfinferError as exc:
                return self._failed(exc, started)
        try:
            issuer = str(result.claims.get("iss", ""))
            policy.evaluate(self._policy, result.claims, issuer)
            expiry = token_expiry(result.claims)
        except ConfinferError as exc:
            return self._failed(exc, started)
        duration = time.monotonic() - started
        LOG.debug("vTPM attestation passed in %.2f s (token until %s)", duration, _utc(expiry))
        return VtpmResult(
            VtpmPassed(expiry, _detail(f"token from {issuer} valid until {_utc(expiry)}")),
            duration,
            token=result.token,
            claims=result.claims,
            expiry=expiry,
        )

    @staticmethod
    def _failed(exc: ConfinferError, started: float) -> VtpmResult:
        observation = classify(exc)
        LOG.warning("vTPM attestation failed: %s: %s", observation.reason, observation.detail)
        return VtpmResult(observation, time.monotonic() - started)

    def _read_ak(self) -> tuple[bytes, bytes]:
        """The AK certificate (DER) and the AK's public area, in one use of the vTPM."""
        with self._tpm_lock, self._open(self._cfg.tpm_tcti) as vtpm:
            return vtpm.ak_cert(), vtpm.ak_public()

    def ak_cert_status(self, now: float) -> AkCertStatus:
        """The vTPM's AK certificate's expiry at ``now``. Raises the vTPM's
        :class:`~confinfer.errors.TpmError` when the certificate cannot be read (the
        attestation, which reads it too, fails closed on the same fault)."""
        with self._tpm_lock, self._open(self._cfg.tpm_tcti) as vtpm:
            der = vtpm.ak_cert()
        return cert_status(_certificate(der), now)

    def renew_if_due(self, now: float) -> AkCertResult | None:
        """Renew the AK certificate if it has fewer than ``ak_cert_renew_days`` days left at
        ``now`` (or has expired); None when it is not due, and then nothing is asked of IMDS.

        A renewal never raises for what IMDS answers or for a failed write: those are
        :class:`~attestd.state.AkCertRenewalFailed` with their own reason as ``cause`` and the
        current certificate's expiry. Like :meth:`ak_cert_status`, it raises the vTPM's
        :class:`~confinfer.errors.TpmError` when the current certificate cannot be read.
        """
        with self._renew_lock:
            der, ak_public = self._read_ak()
            current = _certificate(der)
            status = cert_status(current, now)
            if not renewal_due(status, self._cfg.ak_cert_renew_days):
                return None
            LOG.info(
                "AK certificate expires %s (%.1f days left, renewal below %d): renewing "
                "through IMDS",
                _utc(status.expiry),
                status.days_left,
                self._cfg.ak_cert_renew_days,
            )
            try:
                with self._http(self._cfg) as http:
                    pem = imds.renew_ak_certificate(http, self._cfg, imds.certificate_pem(der))
                renewed = check_renewed(pem, current, ak_public, now)
                with self._tpm_lock, self._open(self._cfg.tpm_tcti) as vtpm:
                    vtpm.write_ak_cert(renewed.public_bytes(serialization.Encoding.DER))
            except ConfinferError as exc:
                detail = _detail(exc.message)
                LOG.warning("AK certificate renewal failed: %s: %s", exc.reason, detail)
                return AkCertResult(
                    AkCertRenewalFailed(exc.reason, detail, status.expiry), status.days_left
                )
            after = cert_status(renewed, now)
            LOG.info(
                "AK certificate renewed: serial %X, valid until %s",
                renewed.serial_number,
                renewed.not_valid_after_utc.isoformat(),
            )
            return AkCertResult(AkCertRenewed(after.expiry), after.days_left)


__all__ = [
    "DEFAULT_POLICY",
    "AkCertResult",
    "AkCertStatus",
    "VtpmChecker",
    "VtpmResult",
    "cert_status",
    "check_renewed",
    "classify",
    "default_policy",
    "load_policy",
    "renewal_due",
    "token_expiry",
]
