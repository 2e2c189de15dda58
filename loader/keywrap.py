"""Wrapping and unwrapping the model's data key (DEK) with the key-encryption key (KEK).

The DEK is 32 random bytes, held in a bytearray and zeroed after use (best effort: Python and
the libraries beneath it may keep transient copies). It is never logged.

Wrapping (owner side, ``confinfer seal``) is RSA-OAEP with SHA-256 and MGF1-SHA-256 (Key
Vault's ``RSA-OAEP-256``), done either offline with the KEK's public key (:class:`PemWrapper`,
key id ``sha256:<hex of SHA-256 over the SubjectPublicKeyInfo DER>``) or by Key Vault
(:class:`KeyVaultWrapper`, key id = the versioned key URL Key Vault answers with).

Unwrapping is the :class:`DekUnwrapper` protocol, ``unwrap(wrapped, key_id) -> bytearray``: the
unseal engine only ever asks "give me the DEK for this wrapped blob and this key id", so an
offline private key (:class:`PemUnwrapper`), Key Vault's unwrapKey (:class:`KeyVaultUnwrapper`)
and a Secure Key Release backend all plug into the same place.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from confinfer.config import Config
from confinfer.errors import ConfinferError, KeyUnwrapError, Reason, ServiceError, UsageError

if TYPE_CHECKING:
    from azure.keyvault.keys.crypto import CryptographyClient

DEK_LEN = 32
ALGORITHM = "RSA-OAEP-256"
MIN_RSA_BITS = 2048
FINGERPRINT_PREFIX = "sha256:"

_OAEP = padding.OAEP(
    mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
)


def new_dek() -> bytearray:
    return bytearray(os.urandom(DEK_LEN))


def zero(buf: bytearray) -> None:
    """Overwrite a key buffer in place (best effort)."""
    buf[:] = bytes(len(buf))


def fingerprint(key: rsa.RSAPublicKey) -> str:
    """``sha256:<hex>`` of the public key's SubjectPublicKeyInfo (DER)."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return FINGERPRINT_PREFIX + hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class WrappedDek:
    wrapped: bytes
    key_id: str


class DekWrapper(Protocol):
    def wrap(self, dek: bytearray) -> WrappedDek: ...


class DekUnwrapper(Protocol):
    def unwrap(self, wrapped: bytes, key_id: str | None) -> bytearray: ...


def _read_pem(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(
            f"cannot read the {what} {path}: {exc.strerror}", reason=Reason.KEY_FILE
        ) from None


def _check_size(key: rsa.RSAPublicKey | rsa.RSAPrivateKey, path: Path) -> None:
    if key.key_size < MIN_RSA_BITS:
        raise UsageError(
            f"{path}: an RSA-{key.key_size} KEK is too small (at least {MIN_RSA_BITS} bits)",
            reason=Reason.KEY_FILE,
        )


def _not_rsa(path: Path) -> UsageError:
    return UsageError(f"{path}: the KEK must be an RSA key", reason=Reason.KEY_FILE)


def _checked_dek(raw: bytes) -> bytearray:
    dek = bytearray(raw)
    if len(dek) != DEK_LEN:
        zero(dek)
        raise KeyUnwrapError(
            f"the unwrapped key is {len(raw)} bytes; AES-256 needs {DEK_LEN}",
            reason=Reason.DEK_LENGTH,
        )
    return dek


class PemWrapper:
    """Wrap offline with the KEK's public key (PEM: a public key or an X.509 certificate)."""

    def __init__(self, public_key: rsa.RSAPublicKey) -> None:
        self.public_key = public_key
        self.key_id = fingerprint(public_key)

    @classmethod
    def from_file(cls, path: Path) -> PemWrapper:
        data = _read_pem(path, "KEK public key")
        key: object
        try:
            if b"-----BEGIN CERTIFICATE-----" in data:
                from cryptography import x509

                key = x509.load_pem_x509_certificate(data).public_key()
            else:
                key = serialization.load_pem_public_key(data)
        except ValueError:
            raise UsageError(
                f"{path}: not a PEM public key or certificate", reason=Reason.KEY_FILE
            ) from None
        if not isinstance(key, rsa.RSAPublicKey):
            raise _not_rsa(path)
        _check_size(key, path)
        return cls(key)

    def wrap(self, dek: bytearray) -> WrappedDek:
        return WrappedDek(self.public_key.encrypt(bytes(dek), _OAEP), self.key_id)


class PemUnwrapper:
    """Unwrap offline with the KEK's private key (unencrypted PEM, PKCS#8 or PKCS#1)."""

    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        self._key = private_key
        self.key_id = fingerprint(private_key.public_key())

    @classmethod
    def from_file(cls, path: Path) -> PemUnwrapper:
        data = _read_pem(path, "KEK private key")
        try:
            # The operator's own key: its consistency checks (tens of ms for RSA) buy nothing.
            key = serialization.load_pem_private_key(
                data, password=None, unsafe_skip_rsa_key_validation=True
            )
        except TypeError:
            raise UsageError(
                f"{path}: the private key is password-protected; give an unencrypted PEM",
                reason=Reason.KEY_FILE,
            ) from None
        except ValueError:
            raise UsageError(f"{path}: not a PEM private key", reason=Reason.KEY_FILE) from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise _not_rsa(path)
        _check_size(key, path)
        return cls(key)

    def unwrap(self, wrapped: bytes, key_id: str | None) -> bytearray:
        if key_id and key_id.startswith(FINGERPRINT_PREFIX) and key_id != self.key_id:
            raise KeyUnwrapError(
                f"the package was sealed for the KEK {key_id}; the given key is {self.key_id}",
                reason=Reason.KEY_MISMATCH,
            )
        try:
            return _checked_dek(self._key.decrypt(wrapped, _OAEP))
        except ValueError:
            raise KeyUnwrapError(
                "the data key does not unwrap with this KEK (a different key, or a damaged "
                "wrapped key)",
                reason=Reason.KEY_UNWRAP,
            ) from None


# -- Key Vault ---------------------------------------------------------------------------------


def _keyvault_client(key_id: str, cfg: Config) -> CryptographyClient:
    # Imported here: the Azure SDK costs memory and start-up time that offline use never needs.
    from azure.identity import DefaultAzureCredential
    from azure.keyvault.keys.crypto import CryptographyClient

    from confinfer.keyvault import KeyId

    KeyId.parse(key_id)  # a clear usage error for a malformed id, before any network traffic
    credential_args: dict[str, Any] = {}
    if cfg.managed_identity_client_id:
        credential_args["managed_identity_client_id"] = cfg.managed_identity_client_id
    client_args: dict[str, Any] = {
        "verify_challenge_resource": cfg.keyvault_verify_challenge_resource,
        "retry_total": cfg.max_retries,
        "connection_timeout": cfg.http_timeout_s,
        "read_timeout": cfg.http_timeout_s,
    }
    if cfg.ca_bundle is not None:
        client_args["connection_verify"] = str(cfg.ca_bundle)
    return CryptographyClient(key_id, DefaultAzureCredential(**credential_args), **client_args)


def _first_line(text: object) -> str:
    lines = str(text).strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= 300 else line[:297] + "..."


def keyvault_error(exc: Exception, operation: str, key_id: str) -> ConfinferError:
    """The one-line error for an Azure SDK exception; re-raises anything it does not know."""
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ServiceRequestError,
        ServiceResponseError,
    )

    where = f"Key Vault {operation} with {key_id}"
    if isinstance(exc, ClientAuthenticationError):
        return ServiceError(
            f"{where}: authentication failed: {_first_line(exc.message)}",
            reason=Reason.KEYVAULT_UNAUTHORIZED,
            hint="sign in (az login) or check the managed identity; the identity needs the "
            f"key's {operation} permission",
        )
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        return ServiceError(
            f"{where}: cannot reach the vault: {_first_line(exc.message)}",
            reason=Reason.KEYVAULT_UNAVAILABLE,
        )
    if isinstance(exc, HttpResponseError):
        status = exc.status_code
        reason = {401: Reason.KEYVAULT_UNAUTHORIZED, 403: Reason.KEYVAULT_FORBIDDEN,
                  404: Reason.KEY_NOT_FOUND}.get(status or 0, Reason.KEYVAULT_FAILED)
        return ServiceError(
            f"{where}: HTTP {status}: {_first_line(exc.message)}", reason=reason
        )
    raise exc


class KeyVaultWrapper:
    """Wrap through Key Vault's wrapKey (RSA-OAEP-256) with the KEK ``key_id``."""

    def __init__(self, key_id: str, cfg: Config) -> None:
        self.key_id = key_id
        self._cfg = cfg

    def wrap(self, dek: bytearray) -> WrappedDek:
        from azure.core.exceptions import AzureError
        from azure.keyvault.keys.crypto import KeyWrapAlgorithm

        try:
            client = _keyvault_client(self.key_id, self._cfg)
            result = client.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, bytes(dek))
        except AzureError as exc:
            raise keyvault_error(exc, "wrapKey", self.key_id) from None
        # Key Vault answers with the versioned id; recording it pins the exact key version.
        return WrappedDek(bytes(result.encrypted_key), result.key_id or self.key_id)


class KeyVaultUnwrapper:
    """Unwrap through Key Vault's unwrapKey: for identities allowed to use the KEK directly
    (development, recovery). An attested VM gets its key through Secure Key Release instead."""

    def __init__(self, key_id: str, cfg: Config) -> None:
        self.key_id = key_id
        self._cfg = cfg

    def unwrap(self, wrapped: bytes, key_id: str | None) -> bytearray:
        from azure.core.exceptions import AzureError
        from azure.keyvault.keys.crypto import KeyWrapAlgorithm

        kid = key_id if key_id and not key_id.startswith(FINGERPRINT_PREFIX) else self.key_id
        try:
            client = _keyvault_client(kid, self._cfg)
            result = client.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped)
        except AzureError as exc:
            err = keyvault_error(exc, "unwrapKey", kid)
            if err.reason == Reason.KEYVAULT_FAILED:
                # Key Vault answers 400 when the blob does not decrypt under this key.
                raise KeyUnwrapError(
                    f"Key Vault could not unwrap the data key with {kid}: {err.message}",
                    reason=Reason.KEY_UNWRAP,
                ) from None
            raise err from None
        return _checked_dek(result.key)


def key_ids_match(expected: str, actual: str) -> bool:
    """Whether a package's key id is the key the operator named (any version of it when the
    operator named none)."""
    if expected == actual:
        return True
    if expected.startswith(FINGERPRINT_PREFIX) or actual.startswith(FINGERPRINT_PREFIX):
        return False
    from confinfer.keyvault import KeyId

    try:
        return KeyId.parse(expected).accepts(actual)
    except UsageError:
        return False
