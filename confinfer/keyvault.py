"""The one Key Vault client: wrapKey, unwrapKey, Secure Key Release and the key's release policy.

**Which key, which host.** A package's key id is a hint, never an address. :func:`choose_key`
is the one place that turns a hint into a key to ask for: the vault host and key that receive
any request come only from ``key_id`` (which ``--key-id`` overrides) and
``keyvault_allowed_keys``. A hint naming anything else is refused with ``key-mismatch`` before
any network request, and :class:`KeyVault` itself refuses a key id the configuration does not
allow, so no caller can route a request elsewhere.

**One credential policy** (:meth:`KeyVault.access_token`): the token's audience comes from the
vault's host name (``*.vault.azure.net`` -> ``https://vault.azure.net``, Managed HSM and the
national clouds alike), never from the vault's answer. With ``azure_credential = "auto"``, Secure
Key Release and release-policy reads use the VM's managed identity (confinfer.imds); seal's
wrapKey and unseal's unwrapKey use azure-identity's ``DefaultAzureCredential`` (``az login`` on
an operator's machine). A 401 challenge whose ``resource`` disagrees with that audience is
refused (``keyvault-challenge-invalid``) when ``keyvault_verify_challenge_resource`` is on.

**One retry policy and one HTTP layer**: confinfer.http (total deadline, capped bodies, bounded
retries with one Retry-After rule). **One error map**: :func:`_refusal`.

**The release answer is verified** as Key Vault signs it (shared/reference/azure-protocols.md
§7): a compact JWS, RS256 only, signed by the x5c leaf, which is the vault's own TLS service
certificate: its chain leads to the configured release roots (``keyvault_release_ca_bundle``,
else ``ca_bundle``, else the system store), it is valid for TLS server authentication (EKU
serverAuth) and for the vault host asked (SAN), and the header's ``x5t#S256`` is its SHA-256
thumbprint. The payload must echo the request: ``request.kid`` is the key asked for and
``request.enc`` the wrapping asked for (and ``request.nonce`` a nonce sent), and it must release
that key. Key Vault's own SDKs check none of this; we do, so a released key is never taken from
whoever managed to answer on the vault's address.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from confinfer import imds, jose, log
from confinfer.closable import Closable
from confinfer.config import Config
from confinfer.errors import (
    ConfinferError,
    KeyReleaseError,
    KeyUnwrapError,
    Reason,
    ServiceError,
    UsageError,
    printable,
)
from confinfer.http import KEYVAULT, Http, Reply, error_text

LOG = logging.getLogger(__name__)

API_VERSION = "7.4"
# Secure Key Release wrapping algorithms ("enc") and the OAEP hash of their RSA part.
SKR_ALGORITHMS: Mapping[str, str] = {
    "RSA_AES_KEY_WRAP_256": "sha256",
    "CKM_RSA_AES_KEY_WRAP": "sha1",
    "RSA_AES_KEY_WRAP_384": "sha384",
}
# Audiences by the vault host's DNS suffix; anything else (a local emulator) gets the first.
_AUDIENCES = (
    (".vault.azure.net", "https://vault.azure.net"),
    (".managedhsm.azure.net", "https://managedhsm.azure.net"),
    (".vault.azure.cn", "https://vault.azure.cn"),
    (".managedhsm.azure.cn", "https://managedhsm.azure.cn"),
    (".vault.usgovcloudapi.net", "https://vault.usgovcloudapi.net"),
    (".managedhsm.usgovcloudapi.net", "https://managedhsm.usgovcloudapi.net"),
)
# Key Vault's answer when the identity lacks the data-plane role (RBAC) or an access policy.
_ACCESS_DENIED_CODES = frozenset({"ForbiddenByRbac", "ForbiddenByPolicy", "AccessDenied"})
_NAME = re.compile(r"[0-9A-Za-z-]{1,127}")
_VERSION = re.compile(r"[0-9A-Za-z]{1,64}")


# --- key ids and the key-trust rule ----------------------------------------------------------


@dataclass(frozen=True)
class KeyId:
    """A Key Vault / Managed HSM key identifier: ``https://<vault>/keys/<name>[/<version>]``."""

    vault_url: str
    name: str
    version: str | None = None

    @classmethod
    def parse(cls, kid: object) -> KeyId:
        url = urlparse(kid.strip()) if isinstance(kid, str) else None
        parts = [p for p in url.path.split("/") if p] if url else []
        if (
            url is None
            or url.scheme != "https"
            or not url.hostname
            or url.username is not None
            or url.query
            or url.fragment
            or len(parts) not in (2, 3)
            or parts[0] != "keys"
            or not _NAME.fullmatch(parts[1])
            or (len(parts) == 3 and not _VERSION.fullmatch(parts[2]))
        ):
            raise UsageError(
                f"not a Key Vault key id: {printable(repr(kid), 200)}",
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

    @property
    def host(self) -> str:
        return urlparse(self.vault_url).hostname or ""

    @property
    def audience(self) -> str:
        """The access-token audience for this vault, from its host name alone."""
        host = self.host
        for suffix, audience in _AUDIENCES:
            if host.endswith(suffix):
                return audience
        return _AUDIENCES[0][1]

    def accepts(self, other: KeyId) -> bool:
        """Whether ``other`` is this key (any version of it when this one names none)."""
        if (other.vault_url, other.name) != (self.vault_url, self.name):
            return False
        return self.version is None or other.version == self.version


def allowed_keys(cfg: Config) -> tuple[KeyId, ...]:
    """The keys requests may be made for: ``key_id`` (``--key-id``), ``keyvault_allowed_keys``."""
    ids = ([cfg.key_id] if cfg.key_id else []) + list(cfg.keyvault_allowed_keys)
    return tuple(KeyId.parse(kid) for kid in ids)


def choose_key(cfg: Config, hint: str | None) -> KeyId:
    """The key to ask Key Vault for, given a package's key id ``hint`` (unauthenticated).

    ``hint`` may select among the allowed keys (and a version of an allowed versionless key);
    it never adds one. A ``sha256:`` fingerprint hint (a package sealed offline) and no hint at
    all leave the choice to ``key_id``. Raises ``no-key-id`` or ``key-mismatch``; makes no
    request.
    """
    allowed = allowed_keys(cfg)
    if not allowed:
        raise UsageError(
            "no Key Vault key is configured",
            reason=Reason.NO_KEY_ID,
            hint="give --key-id KID or set key_id (CONFINFER_KEY_ID); a package's own key id is "
            "only checked against the configured keys, never used as an address",
        )
    if not hint or hint.startswith("sha256:"):
        return allowed[0]
    try:
        asked = KeyId.parse(hint)
    except UsageError:
        asked = None
    for key in allowed:
        if asked is not None and key.accepts(asked):
            # Host, name (and a pinned version) are the configuration's; only a version the
            # configuration left open comes from the package.
            return KeyId(key.vault_url, key.name, key.version or asked.version)
    raise KeyUnwrapError(
        f"the package names the key {printable(hint, 300)}, which is not a configured key "
        f"({', '.join(str(k) for k in allowed)}); no request was made",
        reason=Reason.KEY_MISMATCH,
        hint="if the package is genuine, add its key to keyvault_allowed_keys or give --key-id",
    )


# --- the released key ------------------------------------------------------------------------


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
                    f"cannot read trust anchors from {path}: {exc}",
                    reason=Reason.TRUST_ANCHOR_INVALID,
                ) from None
    if not roots:
        raise KeyReleaseError(
            "no trust anchors to verify Key Vault's release signature with",
            reason=Reason.TRUST_ANCHOR_INVALID,
            hint="install the system CA bundle or set keyvault_release_ca_bundle",
        )
    return roots


def _subject(host: str) -> x509.DNSName | x509.IPAddress:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _verify_signer(
    header: Mapping[str, Any], host: str, roots: Sequence[x509.Certificate], now: dt.datetime
) -> x509.Certificate:
    """The x5c leaf, once it is shown to be a TLS server certificate for ``host``."""
    try:
        certs = jose.x5c(header)
    except jose.JoseError as exc:
        raise _invalid(str(exc)) from None
    leaf = certs[0]
    thumbprint = header.get("x5t#S256")
    expected = jose.b64url_encode(hashlib.sha256(leaf.public_bytes(Encoding.DER)).digest())
    if not isinstance(thumbprint, str) or not hmac.compare_digest(thumbprint, expected):
        raise _invalid("the header's x5t#S256 is not the thumbprint of its x5c certificate")
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is None or ExtendedKeyUsageOID.SERVER_AUTH not in usages:
        raise _invalid("the signing certificate is not a TLS server certificate")
    # The x5c root, when present, is not trusted for being there: only the configured roots.
    intermediates = [c for c in certs[1:] if c not in roots]
    verifier = (
        PolicyBuilder()
        .store(Store(list(roots)))
        .time(now)
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(),
            # The signer is a TLS server certificate (CA:FALSE, a SAN, serverAuth) and gets the
            # Web PKI checks a TLS client would make.
            ee_policy=ExtensionPolicy.webpki_defaults_ee(),
        )
        .build_server_verifier(_subject(host))
    )
    try:
        verifier.verify(leaf, intermediates)
    except VerificationError as exc:
        raise _invalid(
            f"the signing certificate is not valid for {host} under the trusted roots "
            f"({printable(exc, 200)})"
        ) from None
    return leaf


def verify_release(
    compact: str,
    key_id: KeyId,
    *,
    roots: Sequence[x509.Certificate],
    algorithm: str,
    nonce: str | None = None,
    now: dt.datetime | None = None,
) -> ReleasedKey:
    """Verify a Secure Key Release JWS as the module docstring says; its payload."""
    try:
        jws = jose.parse(compact)
    except jose.JoseError as exc:
        raise _invalid(str(exc)) from None
    leaf = _verify_signer(jws.header, key_id.host, roots, now or dt.datetime.now(dt.UTC))
    public_key = leaf.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise _invalid("the signing certificate does not hold an RSA key")
    try:
        jose.verify(jws, public_key)
    except jose.JoseError:
        raise _invalid("the signature does not verify with the x5c leaf certificate") from None
    payload = jws.payload
    request = payload.get("request")
    echoed = request if isinstance(request, dict) else {}
    try:
        asked = KeyId.parse(echoed.get("kid"))
    except UsageError:
        asked = None
    if asked != key_id:
        raise KeyReleaseError(
            f"Key Vault's signed answer is for a request for "
            f"{printable(echoed.get('kid'), 200)}, not {key_id}",
            reason=Reason.RELEASE_KEY_MISMATCH,
        )
    if echoed.get("enc") != algorithm:
        raise KeyReleaseError(
            f"Key Vault's signed answer names the wrapping {printable(echoed.get('enc'), 80)} "
            f"where {algorithm} was asked for",
            reason=Reason.RELEASE_ANSWER_INVALID,
        )
    if nonce is not None and echoed.get("nonce") != nonce:
        raise KeyReleaseError(
            "Key Vault's release answer does not echo this request's nonce (a replayed answer?)",
            reason=Reason.RELEASE_NONCE_MISMATCH,
        )
    try:
        key = payload["response"]["key"]["key"]
        released_kid, key_hsm = key["kid"], key["key_hsm"]
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
    try:
        released = KeyId.parse(released_kid)
    except UsageError:
        released = None
    if released is None or released.version is None or not key_id.accepts(released):
        raise KeyReleaseError(
            f"Key Vault released {printable(released_kid, 200)} where {key_id} was asked for",
            reason=Reason.RELEASE_KEY_MISMATCH,
        )
    return ReleasedKey(jws=compact, payload=payload)


# --- the client ------------------------------------------------------------------------------


def _challenge_resource(reply: Reply) -> str | None:
    header = reply.headers.get("WWW-Authenticate", "")
    match = re.search(r'(?:resource|scope)="([^"]*)"', header)
    return match.group(1) if match else None


def _inner_code(reply: Reply) -> str | None:
    try:
        body = reply.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    inner = error.get("innererror") if isinstance(error, dict) else None
    code = inner.get("code") if isinstance(inner, dict) else None
    return str(code) if code else None


class KeyVault(Closable):
    """The Key Vault data plane for the keys ``cfg`` allows. Use with ``with``."""

    def __init__(self, cfg: Config, *, http: Http | None = None) -> None:
        self._cfg = cfg
        self._own_http = http is None
        self._http = http if http is not None else Http(cfg)
        self._allowed = allowed_keys(cfg)
        self._operator_credential: Any = None

    def close(self) -> None:
        if self._own_http:
            self._http.close()

    # credentials

    def access_token(self, key: KeyId, operation: str) -> str:
        """A bearer token for ``key``'s vault, from the credential the policy picks."""
        choice = self._cfg.azure_credential
        if choice == "auto":
            choice = "managed-identity" if operation in ("release", "get") else "default"
        if choice == "managed-identity":
            return imds.managed_identity_token(self._http, self._cfg, key.audience).token
        return self._azure_identity_token(choice, key.audience)

    def _azure_identity_token(self, choice: str, audience: str) -> str:
        # Imported here: azure-identity costs start-up time that the VM's path never needs.
        from azure.core.exceptions import ClientAuthenticationError
        from azure.identity import (
            AzureCliCredential,
            CredentialUnavailableError,
            DefaultAzureCredential,
        )

        if self._operator_credential is None:
            if choice == "cli":
                self._operator_credential = AzureCliCredential()
            else:
                client_id = self._cfg.managed_identity_client_id
                self._operator_credential = DefaultAzureCredential(
                    **({"managed_identity_client_id": client_id} if client_id else {})
                )
        try:
            with log.step("imds-token"):
                return str(self._operator_credential.get_token(audience + "/.default").token)
        except (CredentialUnavailableError, ClientAuthenticationError) as exc:
            raise ServiceError(
                f"no Azure credential for {audience}: "
                f"{printable(str(exc).strip().splitlines()[0] if str(exc).strip() else exc)}",
                reason=Reason.KEYVAULT_UNAUTHORIZED,
                hint="sign in with `az login` (or set azure_credential); the identity needs "
                "the key's wrap/unwrap permission",
            ) from None

    # requests

    def _check_allowed(self, key: KeyId) -> None:
        if not any(a.accepts(key) for a in self._allowed):
            raise KeyUnwrapError(
                f"{key} is not a configured key; no request was made",
                reason=Reason.KEY_MISMATCH,
            )

    def _call(self, key: KeyId, operation: str, body: Mapping[str, Any] | None) -> Any:
        self._check_allowed(key)
        # /keys/<name>[/<version>] reads the key; /keys/<name>/<version or "">/<op> acts on it.
        path = f"/keys/{quote(key.name)}"
        if operation == "get":
            path += f"/{quote(key.version)}" if key.version else ""
        else:
            path += f"/{quote(key.version or '')}/{operation}"
        url = f"{key.vault_url}{path}?api-version={API_VERSION}"
        token = self.access_token(key, operation)
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode("utf-8")
        reply = self._http.request(
            "GET" if operation == "get" else "POST",
            url,
            service=KEYVAULT,
            headers=headers,
            body=data,
        )
        if reply.status != 200:
            raise self._refusal(reply, key, operation)
        try:
            return reply.json()
        except ValueError:
            raise KeyReleaseError(
                f"Key Vault's answer to {operation} for {key} is not JSON",
                reason=Reason.KEYVAULT_FAILED,
            ) from None

    def _refusal(self, reply: Reply, key: KeyId, operation: str) -> ConfinferError:
        """The one error map from a Key Vault answer to a reason."""
        said = error_text(reply)
        status = reply.status
        if status == 401:
            resource = _challenge_resource(reply)
            if (
                self._cfg.keyvault_verify_challenge_resource
                and resource is not None
                and resource.rstrip("/") != key.audience
            ):
                return KeyReleaseError(
                    f"Key Vault at {key.vault_url} asks for a token for "
                    f"{printable(resource, 200)}, not {key.audience}; no token was sent there",
                    reason=Reason.KEYVAULT_CHALLENGE_INVALID,
                    hint="the host does not answer as Key Vault does; check the key id's host",
                )
            imds.forget_tokens()
            return KeyReleaseError(
                f"Key Vault rejected the access token for {key}: {said}",
                reason=Reason.KEYVAULT_UNAUTHORIZED,
                hint="check that the identity belongs to the vault's tenant "
                "(managed_identity_client_id)",
            )
        if status == 403 and _inner_code(reply) in _ACCESS_DENIED_CODES:
            return KeyReleaseError(
                f"Key Vault denied this identity {operation} on {key}: {said}",
                reason=Reason.KEYVAULT_FORBIDDEN,
                hint="grant the identity the role for it (Secure Key Release: 'Key Vault Crypto "
                "Service Release User' on the key; wrap/unwrap: 'Key Vault Crypto User')",
            )
        if status == 403 and operation == "release":
            return KeyReleaseError(
                f"Key Vault refused to release {key}: {said}",
                reason=Reason.RELEASE_REFUSED,
                details={"service_message": said},
                hint="compare the key's release policy with the attestation token's claims "
                "(`confinfer attest` prints them)",
            )
        if status == 404:
            return KeyReleaseError(
                f"Key Vault has no key {key}: {said}",
                reason=Reason.KEY_NOT_FOUND,
                hint="check key_id (name and version) and the vault URL",
            )
        if status == 400 and operation == "unwrapkey":
            # Key Vault answers 400 when the blob does not decrypt under this key.
            return KeyUnwrapError(
                f"Key Vault could not unwrap the data key with {key}: {said}",
                reason=Reason.KEY_UNWRAP,
            )
        return KeyReleaseError(
            f"Key Vault could not {operation} with {key} (HTTP {status}): {said}",
            reason=Reason.KEYVAULT_FAILED,
        )

    def wrap_key(self, key: KeyId, plaintext: bytes) -> tuple[bytes, str]:
        """RSA-OAEP-256 wrapKey; the wrapped bytes and the versioned key id Key Vault used."""
        body = self._call(
            key, "wrapkey", {"alg": "RSA-OAEP-256", "value": jose.b64url_encode(plaintext)}
        )
        try:
            wrapped = jose.b64url_decode(body["value"])
            kid = KeyId.parse(body.get("kid") or str(key))
        except (TypeError, KeyError, jose.JoseError, UsageError):
            raise KeyReleaseError(
                f"Key Vault's wrapKey answer for {key} is malformed", reason=Reason.KEYVAULT_FAILED
            ) from None
        if not key.accepts(kid):
            raise KeyReleaseError(
                f"Key Vault wrapped with {kid}, not {key}", reason=Reason.RELEASE_KEY_MISMATCH
            )
        return wrapped, str(kid)

    def unwrap_key(self, key: KeyId, wrapped: bytes) -> bytearray:
        """RSA-OAEP-256 unwrapKey; the plaintext in a buffer the caller zeroes."""
        body = self._call(
            key, "unwrapkey", {"alg": "RSA-OAEP-256", "value": jose.b64url_encode(wrapped)}
        )
        try:
            return bytearray(jose.b64url_decode(body["value"]))
        except (TypeError, KeyError, jose.JoseError):
            raise KeyReleaseError(
                f"Key Vault's unwrapKey answer for {key} is malformed",
                reason=Reason.KEYVAULT_FAILED,
            ) from None

    def release(
        self, key: KeyId, maa_token: str, *, algorithm: str, nonce: str | None = None
    ) -> ReleasedKey:
        """Secure Key Release of ``key`` to the holder of ``maa_token``, verified."""
        if algorithm not in SKR_ALGORITHMS:
            raise UsageError(
                f"unknown key-release algorithm {algorithm!r}; expected one of "
                f"{', '.join(SKR_ALGORITHMS)}"
            )
        roots = trust_anchors(self._cfg.release_roots)
        body: dict[str, Any] = {"target": maa_token, "enc": algorithm}
        if nonce is not None:
            body["nonce"] = nonce
        with log.step("keyvault-release"):
            answer = self._call(key, "release", body)
            value = answer.get("value") if isinstance(answer, dict) else None
            if not isinstance(value, str):
                raise _invalid("the answer has no signed value")
            released = verify_release(value, key, roots=roots, algorithm=algorithm, nonce=nonce)
        LOG.debug("Key Vault released %s", released.kid)
        return released

    def release_policy(self, key: KeyId) -> dict[str, Any] | None:
        """The key's release policy as JSON, or None when this identity may not read it.

        Used only to explain a refusal: the policy is evaluated locally against the token so
        that the message can name the claim that failed.
        """
        try:
            bundle = self._call(key, "get", None)
        except ConfinferError as exc:
            LOG.debug("cannot read the release policy of %s: %s", key, exc.message)
            return None
        policy = bundle.get("release_policy") if isinstance(bundle, dict) else None
        data = policy.get("data") if isinstance(policy, dict) else None
        try:
            decoded = json.loads(jose.b64url_decode(data))
        except (ValueError, RecursionError):
            return None
        return decoded if isinstance(decoded, dict) else None
