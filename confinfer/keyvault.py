"""Azure Key Vault Secure Key Release: the release call and verification of its signed answer.

:func:`release_key` asks Key Vault (or a Managed HSM) to release an exportable key against an MAA
token, using the VM's managed identity, and returns the JWS Key Vault answers with once that JWS
has been verified here: RS256 only, the ``x5c`` chain up to a trust anchor (``cfg.ca_bundle``, or
the system store), the signature with the chain's leaf, the released ``kid`` against the one asked
for, and the request nonce echoed back. Key Vault's own clients do not check that signature; we do,
so a released key is never taken from whoever managed to answer on the vault's address.

Retries are ours, not the SDK's (its pipeline runs with ``retry_total=0``): up to
``cfg.max_retries`` more attempts after a 5xx, a 429 or a connection failure, waiting 0.5 s, 1 s,
2 s, ... (at most 8 s) or what ``Retry-After`` asks for (at most 30 s, else we give up at once).
Releasing is free of side effects, so repeating the POST is safe. Every other answer fails at once
with its own reason.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import logging
import os
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from confinfer.config import SKR_ALGORITHMS, Config
from confinfer.errors import KeyReleaseError, Reason, ServiceError, UsageError
from confinfer.token import decode_b64url

if TYPE_CHECKING:
    from azure.keyvault.keys import KeyClient

LOG = logging.getLogger(__name__)

# Hook for step timings: called with a step name and its duration in seconds.
StepHook = Callable[[str, float], None]

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 8.0
RETRY_AFTER_MAX_S = 30.0
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# azure-identity reads its IMDS redirect from this variable only.
_IMDS_REDIRECT_VAR = "AZURE_POD_IDENTITY_AUTHORITY_HOST"
_AZURE_IMDS = "http://169.254.169.254"
# Key Vault's answer when the identity lacks the data-plane role (RBAC) or an access policy.
_ACCESS_DENIED_CODES = frozenset({"ForbiddenByRbac", "ForbiddenByPolicy", "AccessDenied"})


@dataclass(frozen=True)
class KeyId:
    """A Key Vault / Managed HSM key identifier: ``https://<vault>/keys/<name>[/<version>]``."""

    vault_url: str
    name: str
    version: str | None = None

    @classmethod
    def parse(cls, kid: str) -> KeyId:
        url = urlparse(kid.strip())
        parts = [p for p in url.path.split("/") if p]
        if (
            url.scheme != "https"
            or not url.netloc
            or url.query
            or url.fragment
            or len(parts) not in (2, 3)
            or parts[0] != "keys"
        ):
            raise UsageError(
                f"not a Key Vault key id: {kid!r}",
                reason=Reason.KEY_ID_INVALID,
                hint="expected https://<vault>.vault.azure.net/keys/<name>[/<version>]",
            )
        return cls(
            vault_url=f"https://{url.netloc.lower()}",
            name=parts[1],
            version=parts[2] if len(parts) == 3 else None,
        )

    def __str__(self) -> str:
        base = f"{self.vault_url}/keys/{self.name}"
        return f"{base}/{self.version}" if self.version else base

    def accepts(self, released_kid: str) -> bool:
        """Whether a released key's ``kid`` is this key (any version when none was asked for)."""
        try:
            other = KeyId.parse(released_kid)
        except UsageError:
            return False
        if (other.vault_url, other.name) != (self.vault_url, self.name):
            return False
        if self.version is None:
            return other.version is not None
        return other.version == self.version


@dataclass(frozen=True)
class ReleasedKey:
    """A verified Secure Key Release answer: the compact JWS and its decoded payload."""

    jws: str
    payload: dict[str, Any]

    @property
    def key(self) -> Mapping[str, Any]:
        """``response.key.key``: the released key's JWK (public parts and ``key_hsm``)."""
        key: Mapping[str, Any] = self.payload["response"]["key"]["key"]
        return key

    @property
    def kid(self) -> str:
        return str(self.key["kid"])

    @property
    def key_hsm(self) -> str:
        """base64url of the transfer blob (JSON with ``header`` and ``ciphertext``)."""
        return str(self.key["key_hsm"])


# --- verification ----------------------------------------------------------------------------


def _invalid(message: str) -> KeyReleaseError:
    return KeyReleaseError(
        f"Key Vault's release answer does not verify: {message}",
        reason=Reason.RELEASE_SIGNATURE_INVALID,
        hint="the answer did not come from Key Vault unaltered; check the vault URL and the "
        "network path, and the trust anchor (keyvault_release_ca_bundle, else ca_bundle)",
    )


def trust_anchors(ca_bundle: Path | None) -> list[x509.Certificate]:
    """The roots a release JWS's ``x5c`` chain must lead to: ``ca_bundle``, else the system's.

    Callers pass ``Config.release_roots``: ``keyvault_release_ca_bundle``, else ``ca_bundle``.
    """
    if ca_bundle is not None:
        paths = [ca_bundle]
    else:
        defaults = ssl.get_default_verify_paths()
        paths = []
        if defaults.cafile:
            paths.append(Path(defaults.cafile))
        elif defaults.capath and Path(defaults.capath).is_dir():
            paths.extend(sorted(p for p in Path(defaults.capath).iterdir() if p.is_file()))
    roots: list[x509.Certificate] = []
    for path in paths:
        try:
            roots.extend(x509.load_pem_x509_certificates(path.read_bytes()))
        except (OSError, ValueError) as exc:
            if ca_bundle is not None:
                raise KeyReleaseError(
                    f"cannot read trust anchors from {path}: {exc}", reason=Reason.TRUST_ANCHOR_INVALID
                ) from None
    if not roots:
        raise KeyReleaseError(
            "no trust anchors to verify Key Vault's release signature with",
            reason=Reason.TRUST_ANCHOR_INVALID,
            hint="install the system CA bundle or set keyvault_release_ca_bundle",
        )
    return roots


def _verify_chain(x5c: Any, roots: list[x509.Certificate], now: dt.datetime) -> x509.Certificate:
    if not isinstance(x5c, list) or not x5c or not all(isinstance(c, str) for c in x5c):
        raise _invalid("the header has no x5c certificate chain")
    try:
        certs = [
            x509.load_der_x509_certificate(base64.b64decode(c, validate=True)) for c in x5c
        ]
    except (binascii.Error, ValueError):
        raise _invalid("the x5c chain holds something that is not a DER certificate") from None
    leaf, intermediates = certs[0], certs[1:]
    # The signing certificate's purposes are Key Vault's business; what matters here is that a
    # trusted CA issued it. CA certificates in the path get the usual Web PKI checks.
    verifier = (
        PolicyBuilder()
        .store(Store(roots))
        .time(now)
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=ExtensionPolicy.permit_all(),
        )
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, intermediates)
    except VerificationError as exc:
        raise _invalid(f"the x5c chain does not lead to a trusted root ({exc})") from None
    return leaf


def verify_release(
    jws: str,
    key_id: KeyId,
    *,
    roots: list[x509.Certificate],
    nonce: str | None = None,
    algorithm: str | None = None,
    now: dt.datetime | None = None,
) -> ReleasedKey:
    """Verify a Secure Key Release JWS and return it with its payload; raise KeyReleaseError.

    Checks: compact form; ``alg`` is RS256 (``none`` and HMAC are refused); the ``x5c`` chain
    leads to one of ``roots`` and is valid at ``now``; the signature verifies with the leaf; the
    payload's ``response.key.key.kid`` is ``key_id`` (any version when ``key_id`` has none) and
    carries ``key_hsm``; a sent ``nonce`` (and ``algorithm``) is echoed in ``request``.
    """
    if not isinstance(jws, str):
        raise _invalid("the answer is not a compact JWS")
    parts = jws.split(".")
    if len(parts) != 3 or not all(parts):
        raise _invalid("the answer is not a signed compact JWS")
    try:
        header = json.loads(decode_b64url(parts[0]))
        payload = json.loads(decode_b64url(parts[1]))
        signature = decode_b64url(parts[2])
    except (ValueError, UnicodeDecodeError):
        raise _invalid("the JWS is not base64url-encoded JSON") from None
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise _invalid("the JWS header or payload is not a JSON object")
    alg = header.get("alg")
    if alg != "RS256":
        raise _invalid(f"JWS algorithm {alg!r} refused (only RS256 is accepted)")
    if header.get("crit"):
        raise _invalid("the JWS names critical header extensions we do not implement")
    leaf = _verify_chain(header.get("x5c"), roots, now or dt.datetime.now(dt.UTC))
    public_key = leaf.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise _invalid("the x5c leaf does not hold an RSA key")
    try:
        public_key.verify(
            signature,
            f"{parts[0]}.{parts[1]}".encode("ascii"),
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
    except InvalidSignature:
        raise _invalid("the signature does not verify with the x5c leaf certificate") from None

    try:
        key = payload["response"]["key"]["key"]
        released_kid = key["kid"]
        key_hsm = key["key_hsm"]
    except (KeyError, TypeError):
        raise KeyReleaseError(
            "Key Vault's release answer has no response.key.key with kid and key_hsm",
            reason=Reason.RELEASE_ANSWER_INVALID,
        ) from None
    if not isinstance(released_kid, str) or not isinstance(key_hsm, str):
        raise KeyReleaseError(
            "Key Vault's release answer has a malformed kid or key_hsm",
            reason=Reason.RELEASE_ANSWER_INVALID,
        )
    if not key_id.accepts(released_kid):
        raise KeyReleaseError(
            f"Key Vault released {released_kid!r} where {key_id} was asked for",
            reason=Reason.RELEASE_KEY_MISMATCH,
        )
    request = payload.get("request")
    echoed = request if isinstance(request, dict) else {}
    if nonce is not None and echoed.get("nonce") != nonce:
        raise KeyReleaseError(
            "Key Vault's release answer does not echo this request's nonce (a replayed answer?)",
            reason=Reason.RELEASE_NONCE_MISMATCH,
        )
    if algorithm is not None and "enc" in echoed and echoed["enc"] != algorithm:
        raise KeyReleaseError(
            f"Key Vault wrapped the key with {echoed['enc']!r} where {algorithm} was asked for",
            reason=Reason.RELEASE_ANSWER_INVALID,
        )
    return ReleasedKey(jws=jws, payload=payload)


# --- the release call ------------------------------------------------------------------------


class _TimedCredential:
    """Wraps the managed-identity credential: times token requests and names their failures.

    Errors raised here are ConfinferErrors, not AzureErrors, so they pass through the SDK's
    pipeline untouched and reach the caller with our reason.
    """

    def __init__(self, inner: Any, imds: str, on_step: StepHook | None) -> None:
        self._inner = inner
        self._imds = imds
        self._on_step = on_step
        self.spent_s = 0.0

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        from azure.core.exceptions import ClientAuthenticationError
        from azure.identity import CredentialUnavailableError

        start = time.perf_counter()
        try:
            return getattr(self._inner, method)(*args, **kwargs)
        except CredentialUnavailableError as exc:
            raise ServiceError(
                f"no managed-identity token: IMDS at {self._imds} did not answer "
                f"({_first_line(str(exc))})",
                reason=Reason.IMDS_UNAVAILABLE,
                hint="run this on an Azure VM with a managed identity, or check that IMDS "
                "(169.254.169.254) is reachable from this process",
            ) from None
        except ClientAuthenticationError as exc:
            raise ServiceError(
                f"IMDS refused a managed-identity token: {_first_line(str(exc))}",
                reason=Reason.IMDS_TOKEN_REFUSED,
                hint="assign a managed identity to the VM; with several, set "
                "managed_identity_client_id",
            ) from None
        finally:
            spent = time.perf_counter() - start
            self.spent_s += spent
            if self._on_step is not None:
                self._on_step("imds-token", spent)

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        return self._call("get_token", *scopes, **kwargs)

    def get_token_info(self, *scopes: str, options: Any = None) -> Any:
        return self._call("get_token_info", *scopes, options=options)

    def close(self) -> None:
        self._inner.close()


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "no detail"


def managed_identity_credential(cfg: Config) -> Any:
    """``ManagedIdentityCredential`` for ``cfg``, pointed at ``cfg.imds`` and bounded in retries."""
    from azure.identity import ManagedIdentityCredential

    # azure-identity takes its IMDS address only from the environment; keep it in step with the
    # configuration (which itself defaults to that variable).
    if cfg.imds_url is not None and os.environ.get(_IMDS_REDIRECT_VAR, _AZURE_IMDS).rstrip(
        "/"
    ) != cfg.imds:
        os.environ[_IMDS_REDIRECT_VAR] = cfg.imds
    return ManagedIdentityCredential(
        client_id=cfg.managed_identity_client_id,
        # azure-identity's IMDS backoff (0.8 s doubling) with our bound on attempts.
        retry_total=cfg.max_retries,
        retry_connect=cfg.max_retries,
        retry_read=cfg.max_retries,
        retry_status=cfg.max_retries,
    )


def _retry_delay(attempt: int, retry_after: str | None) -> float | None:
    """Seconds to wait before attempt ``attempt + 1``; None when Retry-After is beyond our cap."""
    if retry_after is not None:
        try:
            wanted = float(retry_after)
        except ValueError:
            wanted = -1.0
        if wanted > RETRY_AFTER_MAX_S:
            return None
        if wanted >= 0:
            return wanted
    return float(min(BACKOFF_FIRST_S * 2**attempt, BACKOFF_MAX_S))


def _service_message(exc: Any) -> str:
    """Key Vault's own words from an HttpResponseError: ``code: message`` (or the status).

    The inner error code, when there is one, is the precise one (``ForbiddenByRbac``,
    ``ReleasePolicyNotSatisfied``, ...); the outer one is the HTTP status in words.
    """
    error = getattr(exc, "error", None)
    code = _inner_code(exc) or getattr(error, "code", None)
    message = getattr(error, "message", None)
    if message:
        return f"{code}: {message}" if code else str(message)
    return _first_line(getattr(exc, "message", None) or str(exc))


def _inner_code(exc: Any) -> str | None:
    error = getattr(exc, "error", None)
    inner = getattr(error, "innererror", None)
    if isinstance(inner, Mapping):
        code = inner.get("code")
        return str(code) if code else None
    return None


def _map_http_error(exc: Any, key_id: KeyId) -> Exception:
    status = getattr(exc, "status_code", None)
    said = _service_message(exc)
    if status == 403:
        if _inner_code(exc) in _ACCESS_DENIED_CODES:
            return KeyReleaseError(
                f"Key Vault denied this identity the release of {key_id}: {said}",
                reason=Reason.KEYVAULT_FORBIDDEN,
                hint="grant the VM's managed identity the 'Key Vault Crypto Service Release "
                "User' role (or keys/release in an access policy)",
            )
        return KeyReleaseError(
            f"Key Vault refused to release {key_id}: {said}",
            reason=Reason.RELEASE_REFUSED,
            details={"service_message": said},
            hint="compare the key's release policy with the attestation token's claims "
            "(`confinfer attest` prints them)",
        )
    if status == 401:
        return ServiceError(
            f"Key Vault rejected the managed identity's token: {said}",
            reason=Reason.KEYVAULT_UNAUTHORIZED,
            hint="check that the managed identity belongs to the vault's tenant "
            "(managed_identity_client_id)",
        )
    if status == 404:
        return KeyReleaseError(
            f"Key Vault has no key {key_id}: {said}",
            reason=Reason.KEY_NOT_FOUND,
            hint="check key_id (name and version) and the vault URL",
        )
    if status is not None and (status >= 500 or status == 429):
        return ServiceError(
            f"Key Vault kept failing ({status}) releasing {key_id}: {said}",
            reason=Reason.KEYVAULT_UNAVAILABLE,
        )
    return KeyReleaseError(
        f"Key Vault could not release {key_id} ({status}): {said}",
        reason=Reason.KEYVAULT_FAILED,
    )


def _release_with_retries(
    client: KeyClient,
    key_id: KeyId,
    maa_token: str,
    algorithm: str,
    nonce: str | None,
    max_retries: int,
    sleep: Callable[[float], None],
) -> str:
    from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError
    from azure.keyvault.keys import KeyExportEncryptionAlgorithm

    attempt = 0
    while True:
        try:
            result = client.release_key(
                key_id.name,
                maa_token,
                version=key_id.version,
                algorithm=KeyExportEncryptionAlgorithm(algorithm),
                nonce=nonce,
            )
            return str(result.value)
        except HttpResponseError as exc:
            status = exc.status_code
            headers = getattr(exc.response, "headers", None) or {}
            retry_after = headers.get("Retry-After")
            if status in _RETRY_STATUSES and attempt < max_retries:
                delay = _retry_delay(attempt, retry_after)
                if delay is None:
                    raise ServiceError(
                        f"Key Vault is throttling key releases (Retry-After: {retry_after} s)",
                        reason=Reason.KEYVAULT_THROTTLED,
                        hint=f"retry in {retry_after} s",
                    ) from None
                attempt += 1
                LOG.warning(
                    "Key Vault answered %s; retry %d/%d in %.1f s", status, attempt,
                    max_retries, delay,
                )
                sleep(delay)
                continue
            raise _map_http_error(exc, key_id) from None
        except (ServiceRequestError, ServiceResponseError) as exc:
            if attempt < max_retries:
                delay = _retry_delay(attempt, None) or BACKOFF_MAX_S
                attempt += 1
                LOG.warning(
                    "Key Vault unreachable (%s); retry %d/%d in %.1f s",
                    _first_line(str(exc)), attempt, max_retries, delay,
                )
                sleep(delay)
                continue
            raise ServiceError(
                f"Key Vault at {key_id.vault_url} is unreachable: {_first_line(str(exc))}",
                reason=Reason.KEYVAULT_UNAVAILABLE,
                hint="check DNS, the network path to the vault and ca_bundle",
            ) from None


def _key_client(cfg: Config, kid: KeyId, credential: Any) -> KeyClient:
    from azure.keyvault.keys import KeyClient

    options: dict[str, Any] = {
        "verify_challenge_resource": cfg.keyvault_verify_challenge_resource,
        "retry_total": 0,  # retries are ours: see the module docstring
        "connection_timeout": cfg.http_timeout_s,
        "read_timeout": cfg.http_timeout_s,
    }
    if cfg.ca_bundle is not None:
        options["connection_verify"] = str(cfg.ca_bundle)
    return KeyClient(kid.vault_url, credential, **options)


def release_key(
    cfg: Config,
    key_id: str | KeyId,
    maa_token: str,
    *,
    algorithm: str = "RSA_AES_KEY_WRAP_256",
    nonce: str | None = None,
    on_step: StepHook | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> ReleasedKey:
    """Release ``key_id`` to the holder of ``maa_token`` and return the verified answer.

    ``on_step`` receives ``("imds-token", s)`` for each managed-identity token request and
    ``("keyvault-release", s)`` for the rest of the call (challenge, release, retries,
    verification). Errors: KeyReleaseError (``release-refused`` carrying Key Vault's reason,
    ``key-not-found``, ``keyvault-forbidden``, ``release-signature-invalid``,
    ``release-key-mismatch``, ``release-nonce-mismatch``), ServiceError (``imds-unavailable``,
    ``imds-token-refused``, ``keyvault-unauthorized``, ``keyvault-unavailable``,
    ``keyvault-unreachable``, ``keyvault-throttled``).
    """
    kid = key_id if isinstance(key_id, KeyId) else KeyId.parse(key_id)
    if algorithm not in SKR_ALGORITHMS:
        raise UsageError(
            f"unknown key-release algorithm {algorithm!r}; expected one of "
            f"{', '.join(SKR_ALGORITHMS)}",
            reason=Reason.USAGE,
        )
    roots = trust_anchors(cfg.release_roots)
    start = time.perf_counter()
    credential = _TimedCredential(managed_identity_credential(cfg), cfg.imds, on_step)
    try:
        with _key_client(cfg, kid, credential) as client:
            jws = _release_with_retries(
                client, kid, maa_token, algorithm, nonce, cfg.max_retries, sleep
            )
        released = verify_release(jws, kid, roots=roots, nonce=nonce, algorithm=algorithm)
    finally:
        credential.close()
        if on_step is not None:
            on_step("keyvault-release", time.perf_counter() - start - credential.spent_s)
    LOG.debug("Key Vault released %s", released.kid)
    return released


def release_policy(cfg: Config, key_id: str | KeyId) -> dict[str, Any] | None:
    """The key's release policy as JSON, or None when this identity may not read it.

    Used only to explain a refusal: the key's policy is evaluated locally against the token
    so the message can name the claim that failed.
    """
    from azure.core.exceptions import AzureError

    kid = key_id if isinstance(key_id, KeyId) else KeyId.parse(key_id)
    credential = managed_identity_credential(cfg)
    try:
        with _key_client(cfg, kid, credential) as client:
            key = client.get_key(kid.name, version=kid.version)
    except AzureError as exc:
        LOG.debug("cannot read the release policy of %s: %s", kid, _first_line(str(exc)))
        return None
    finally:
        credential.close()
    policy = key.properties.release_policy
    if policy is None or not policy.encoded_policy:
        return None
    try:
        data = json.loads(bytes(policy.encoded_policy))
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None
