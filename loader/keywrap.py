"""Where the model's data key (DEK) comes from: wrapping it with the KEK and getting it back.

The DEK is 32 random bytes, held in a bytearray and zeroed after use (best effort: Python and
the libraries beneath it may keep transient copies). It is never logged.

Wrapping (owner side, ``confinfer seal``) is RSA-OAEP with SHA-256 and MGF1-SHA-256 (Key
Vault's ``RSA-OAEP-256``), done either offline with the KEK's public key (:class:`PemWrapper`,
key id ``sha256:<hex of SHA-256 over the SubjectPublicKeyInfo DER>``) or by Key Vault
(:class:`KeyVaultWrapper`, key id = the versioned key URL Key Vault answers with).

Unwrapping is the :class:`DekUnwrapper` protocol, ``unwrap(wrapped, key_id) -> bytearray``,
where ``key_id`` is what the package's header says: unauthenticated until the DEK it yields has
verified the header, so it is a hint (confinfer.keyvault.choose_key), never an address. The
backends:

- :class:`PemUnwrapper`: the KEK's private key, offline (development, tests);
- :class:`KeyVaultUnwrapper`: Key Vault's unwrapKey, for identities allowed to use the KEK;
- :class:`SkrUnwrapper`: Secure Key Release on an attested VM (confinfer.release): the KEK is
  released into this process through the vTPM, unwraps the DEK here and is dropped;
- :class:`CompatUnwrapper`: an installed AzureAttestSKR (loader.azureattestskr).

The one RSA-OAEP-256 DEK unwrap is :func:`unwrap_dek`; the one length check is
:func:`checked_dek`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from confinfer.config import Config
from confinfer.errors import KeyUnwrapError, Reason, UsageError

if TYPE_CHECKING:
    from confinfer.keyvault import KeyId

LOG = logging.getLogger(__name__)

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


def is_fingerprint(key_id: str | None) -> bool:
    return bool(key_id) and str(key_id).startswith(FINGERPRINT_PREFIX)


def checked_dek(dek: bytearray) -> bytearray:
    """``dek`` when it is an AES-256 key; else zeroed and refused (``dek-length``)."""
    if len(dek) != DEK_LEN:
        size = len(dek)
        zero(dek)
        raise KeyUnwrapError(
            f"the unwrapped key is {size} bytes; AES-256 needs {DEK_LEN}",
            reason=Reason.DEK_LENGTH,
        )
    return dek


def unwrap_dek(key: rsa.RSAPrivateKey, wrapped: bytes, kek_name: str) -> bytearray:
    """RSA-OAEP-256 (MGF1-SHA-256, no label) unwrap of a DEK with the KEK's private key.

    The library hands the plaintext back as immutable ``bytes``; it is copied into the
    bytearray returned (which the caller zeroes) and the immutable copy dropped at once.
    """
    try:
        raw = key.decrypt(bytes(wrapped), _OAEP)
    except ValueError:
        raise KeyUnwrapError(
            f"the data key does not unwrap with the KEK {kek_name} (a different key, or a "
            "damaged wrapped key)",
            reason=Reason.KEY_UNWRAP,
            hint="check the package's key id (confinfer inspect) against the key given",
        ) from None
    dek = bytearray(raw)
    del raw
    return checked_dek(dek)


@dataclass(frozen=True)
class WrappedDek:
    wrapped: bytes
    key_id: str


class DekWrapper(Protocol):
    def wrap(self, dek: bytearray) -> WrappedDek: ...


class DekUnwrapper(Protocol):
    def unwrap(self, wrapped: bytes, key_id: str | None) -> bytearray: ...


def key_ids_match(expected: str, actual: str) -> bool:
    """Whether a package's key id is the key the operator named (any version of it when the
    operator named none)."""
    if expected == actual:
        return True
    if is_fingerprint(expected) or is_fingerprint(actual):
        return False
    from confinfer.keyvault import KeyId

    try:
        return KeyId.parse(expected).accepts(KeyId.parse(actual))
    except UsageError:
        return False


# -- offline: PEM keys -------------------------------------------------------------------------


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
            private = b"PRIVATE KEY-----" in data
            raise UsageError(
                f"{path}: not a PEM public key or certificate"
                + (" (it holds a private key)" if private else ""),
                reason=Reason.KEY_FILE,
                hint=(
                    "give the public half: openssl pkey -in KEY.pem -pubout -out KEK.pub.pem; "
                    "the private key never needs to leave its owner"
                )
                if private
                else None,
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
        if is_fingerprint(key_id) and key_id != self.key_id:
            raise KeyUnwrapError(
                f"the package was sealed for the KEK {key_id}; the given key is {self.key_id}",
                reason=Reason.KEY_MISMATCH,
            )
        return unwrap_dek(self._key, wrapped, self.key_id)


# -- Key Vault ---------------------------------------------------------------------------------


def _configured_key(cfg: Config, hint: str | None) -> KeyId:
    from confinfer.keyvault import choose_key

    return choose_key(cfg, hint)


class KeyVaultWrapper:
    """Wrap through Key Vault's wrapKey (RSA-OAEP-256) with the configured KEK."""

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        self.key = _configured_key(cfg, None)  # a clear error before any other work

    def wrap(self, dek: bytearray) -> WrappedDek:
        from confinfer.keyvault import KeyVault

        with KeyVault(self._cfg) as vault:
            wrapped, kid = vault.wrap_key(self.key, bytes(dek))
        # Key Vault answers with the versioned id; recording it pins the exact key version.
        return WrappedDek(wrapped, kid)


class KeyVaultUnwrapper:
    """Unwrap through Key Vault's unwrapKey: for identities allowed to use the KEK directly
    (development, recovery). An attested VM gets its key through Secure Key Release instead."""

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        _configured_key(cfg, None)

    def unwrap(self, wrapped: bytes, key_id: str | None) -> bytearray:
        from confinfer.keyvault import KeyVault

        key = _configured_key(self._cfg, key_id)
        with KeyVault(self._cfg) as vault:
            return checked_dek(vault.unwrap_key(key, wrapped))


# -- Secure Key Release ------------------------------------------------------------------------


class SkrUnwrapper:
    """Attest, release the KEK into the vTPM, unwrap the DEK here, drop the KEK."""

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        _configured_key(cfg, None)

    def unwrap(self, wrapped: bytes, key_id: str | None) -> bytearray:
        from confinfer import log, release
        from confinfer.tpm import Vtpm

        key = _configured_key(self._cfg, key_id)
        with Vtpm(self._cfg.tpm_tcti) as vtpm:
            kek = release.release_kek(self._cfg, key, vtpm)
        with kek:
            if is_fingerprint(key_id) and fingerprint(kek.public_key()) != key_id:
                raise KeyUnwrapError(
                    f"the package was sealed for the KEK {key_id}; Key Vault released {kek.kid}",
                    reason=Reason.KEY_MISMATCH,
                )
            with log.step("dek-unwrap"):
                return unwrap_dek(kek.private_key(), wrapped, kek.kid)


class CompatUnwrapper:
    """Through an installed AzureAttestSKR (``-u`` mode), under the same key rule."""

    def __init__(self, tool_path: Path | None, cfg: Config) -> None:
        from loader import azureattestskr

        self._tool = azureattestskr.resolve_tool(tool_path)
        self._cfg = cfg
        _configured_key(cfg, None)

    def unwrap(self, wrapped: bytes, key_id: str | None) -> bytearray:
        from loader import azureattestskr

        key = _configured_key(self._cfg, key_id)
        if is_fingerprint(key_id):
            LOG.warning(
                "the package was sealed offline for %s; AzureAttestSKR unwraps it with "
                "%s and nothing checks that they are the same key",
                key_id,
                key,
            )
        return checked_dek(azureattestskr.unwrap_dek(self._tool, self._cfg, str(key), wrapped))
