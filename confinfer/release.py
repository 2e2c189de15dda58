"""Secure Key Release: from an attested vTPM to the model's key-encryption key (KEK).

The flow::

    vTPM evidence --MAA--> token naming the PCR-bound ephemeral key (TpmEphemeralEncryptionKey)
    token --Key Vault release--> signed JWS whose key_hsm blob is
        RSA-OAEP(ephemeral key, K_aes) || AES-KWP(K_aes, PKCS#8 DER of the KEK)
    vTPM RSA_Decrypt (OAEP, hash by algorithm) -> K_aes -> RFC 5649 unwrap -> KEK private key

The RSA part can only be decrypted inside this vTPM and only while PCRs 0-7 hold the values
that were attested. ``K_aes`` lives in a bytearray zeroed as soon as it has been used; the
RFC 5649 unwrap is cryptography's ``aes_key_unwrap_with_padding``, whose result (the KEK's
PKCS#8 DER) is immutable ``bytes`` that is dropped at once after parsing (best effort: Python
cannot wipe it). Nothing secret is ever logged. This module releases the KEK only; what the KEK
unwraps (the model's DEK) is the loader's business (loader/keysource.py).

Steps are timed through confinfer.log.step (names in :data:`STEPS`) for benchmarks and debug
logs.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap_with_padding

from confinfer import jose, log
from confinfer.closable import Closable
from confinfer.config import Config
from confinfer.errors import (
    AttestationError,
    ConfinferError,
    KeyReleaseError,
    PolicyError,
    Reason,
    UsageError,
)
from confinfer.keyvault import SKR_ALGORITHMS, KeyId, KeyVault, ReleasedKey

if TYPE_CHECKING:
    from confinfer.maa import AttestationResult
    from confinfer.tpm import Vtpm

LOG = logging.getLogger(__name__)

# Modulus size of the vTPM's RSA-2048 transfer key, when the token does not tell.
DEFAULT_TRANSFER_KEY_BYTES = 256

# Step names, in flow order (bench/skr.py prints them in this order).
STEPS = (
    "tpm",  # ephemeral key, certify, quote, NV and PCR reads
    "imds-thim",  # the VCEK chain from IMDS
    "maa",  # MAA guest attestation round trip and token decryption/verification
    "imds-token",  # managed-identity access token for Key Vault
    "keyvault-release",  # the release call and JWS verification
    "tpm-decrypt",  # RSA-OAEP of the transfer blob in the vTPM
    "unwrap",  # AES-KWP unwrap and PKCS#8 parse of the KEK
)


class OaepDecryptor(Protocol):
    """Decrypts with the vTPM's ephemeral transfer key (confinfer.tpm.Vtpm is one)."""

    def decrypt_oaep(self, ciphertext: bytes, hash_name: str) -> bytearray: ...


class KekPrivateKey(Closable):
    """The released KEK; :meth:`close` drops it.

    The private key lives in OpenSSL memory, which OpenSSL clears when the key is freed
    (``RSA_free`` clears the private components); :meth:`close` drops our only reference.
    """

    def __init__(self, key: rsa.RSAPrivateKey, kid: str) -> None:
        self._key: rsa.RSAPrivateKey | None = key
        self.kid = kid

    def private_key(self) -> rsa.RSAPrivateKey:
        if self._key is None:
            raise KeyReleaseError(
                "the released KEK has already been dropped", reason=Reason.KEK_CLOSED
            )
        return self._key

    def public_key(self) -> rsa.RSAPublicKey:
        return self.private_key().public_key()

    def close(self) -> None:
        self._key = None


def zero(buf: bytearray) -> None:
    """Overwrite a secret in place."""
    buf[:] = bytes(len(buf))


# --- the transfer blob ------------------------------------------------------------------------


def _blob_invalid(message: str) -> KeyReleaseError:
    return KeyReleaseError(
        f"the released key's transfer blob is invalid: {message}",
        reason=Reason.TRANSFER_BLOB_INVALID,
    )


@dataclass(frozen=True)
class TransferBlob:
    """The decoded ``key_hsm``: the algorithm named in its header (if any) and the ciphertext."""

    enc: str | None
    ciphertext: bytes


def parse_transfer_blob(key_hsm: str) -> TransferBlob:
    """Decode ``key_hsm``: base64url JSON ``{"header": {...,"enc"}, "ciphertext": b64url}``."""
    try:
        blob = json.loads(jose.b64url_decode(key_hsm))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _blob_invalid("key_hsm is not base64url-encoded JSON") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("ciphertext"), str):
        raise _blob_invalid("key_hsm has no ciphertext")
    try:
        ciphertext = jose.b64url_decode(blob["ciphertext"])
    except ValueError:
        raise _blob_invalid("the ciphertext is not base64url") from None
    header = blob.get("header")
    enc = header.get("enc") if isinstance(header, dict) else None
    return TransferBlob(enc=enc if isinstance(enc, str) else None, ciphertext=ciphertext)


def _released_public_n(released: ReleasedKey) -> int | None:
    numbers = jose.rsa_numbers(released.key)
    return numbers[0] if numbers else None


def unwrap_transfer_blob(
    released: ReleasedKey,
    algorithm: str,
    decryptor: OaepDecryptor,
    *,
    transfer_key_bytes: int = DEFAULT_TRANSFER_KEY_BYTES,
) -> KekPrivateKey:
    """Turn a verified release into the KEK: TPM OAEP decrypt, AES-KWP unwrap, PKCS#8 parse."""
    kty = released.key.get("kty")
    if kty not in ("RSA", "RSA-HSM"):
        raise KeyReleaseError(
            f"the released key {released.kid} is {kty!r}, not an RSA key that can unwrap DEKs",
            reason=Reason.KEK_NOT_RSA,
        )
    blob = parse_transfer_blob(released.key_hsm)
    # The blob's header is covered by Key Vault's signature; it must agree with the request.
    if blob.enc is not None and blob.enc != algorithm:
        raise _blob_invalid(f"it is wrapped with {blob.enc!r}, not {algorithm}")
    if len(blob.ciphertext) <= transfer_key_bytes + 8:
        raise _blob_invalid("the ciphertext is too short")
    rsa_part = blob.ciphertext[:transfer_key_bytes]
    wrapped = blob.ciphertext[transfer_key_bytes:]

    with log.step("tpm-decrypt"):
        aes_key = decryptor.decrypt_oaep(rsa_part, SKR_ALGORITHMS[algorithm])
    try:
        with log.step("unwrap"):
            try:
                der = aes_key_unwrap_with_padding(bytes(aes_key), wrapped)
            except (InvalidUnwrap, ValueError):
                raise _blob_invalid("the AES key-wrap integrity check failed") from None
            try:
                key = serialization.load_der_private_key(der, password=None)
            except (ValueError, TypeError):
                raise _blob_invalid("the unwrapped key is not a PKCS#8 private key") from None
            finally:
                del der
    finally:
        zero(aes_key)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise KeyReleaseError(
            f"the released key {released.kid} is not an RSA key that can unwrap DEKs",
            reason=Reason.KEK_NOT_RSA,
        )
    expected_n = _released_public_n(released)
    if expected_n is not None and key.public_key().public_numbers().n != expected_n:
        raise KeyReleaseError(
            f"the private key in the transfer blob is not the released key {released.kid}",
            reason=Reason.RELEASE_KEY_MISMATCH,
        )
    return KekPrivateKey(key, released.kid)


# --- the whole flow ---------------------------------------------------------------------------


def transfer_key_bytes(claims: Mapping[str, Any]) -> int:
    """Modulus size of the key Key Vault wraps to: the token's first RSA encryption key."""
    runtime = claims.get("x-ms-runtime")
    keys = runtime.get("keys") if isinstance(runtime, dict) else None
    for jwk in keys if isinstance(keys, list) else []:
        if not isinstance(jwk, dict) or jwk.get("kty") != "RSA":
            continue
        ops = jwk.get("key_ops")
        if (isinstance(ops, list) and "encrypt" in ops) or "enc" in (
            jwk.get("use"),
            jwk.get("key_use"),
        ):
            numbers = jose.rsa_numbers(jwk)
            return (numbers[0].bit_length() + 7) // 8 if numbers else DEFAULT_TRANSFER_KEY_BYTES
    return DEFAULT_TRANSFER_KEY_BYTES


def check_token_fresh(claims: Mapping[str, Any], now: dt.datetime | None = None) -> None:
    """Refuse a token that has expired before it is spent on a release."""
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise AttestationError("the MAA token has no exp claim", reason=Reason.TOKEN_MALFORMED)
    moment = (now or dt.datetime.now(dt.UTC)).timestamp()
    if exp <= moment:
        expired = dt.datetime.fromtimestamp(exp, dt.UTC).isoformat(timespec="seconds")
        raise AttestationError(
            f"the MAA token expired at {expired}; Key Vault would refuse it",
            reason=Reason.TOKEN_EXPIRED,
            hint="attest again (is the VM's clock right?)",
        )


def new_nonce() -> str:
    """A fresh release nonce; Key Vault echoes it in the signed answer."""
    return base64.urlsafe_b64encode(secrets.token_bytes(18)).decode("ascii")


def explain_refusal(
    exc: KeyReleaseError, vault: KeyVault, key_id: KeyId, claims: Mapping[str, Any]
) -> KeyReleaseError:
    """Add which claim failed, by evaluating the key's release policy locally when readable."""
    policy_json = vault.release_policy(key_id)
    if policy_json is None:
        return exc
    from confinfer import policy

    issuer = claims.get("iss")
    try:
        policy.evaluate(policy_json, dict(claims), str(issuer) if issuer else "")
    except PolicyError as local:
        return KeyReleaseError(
            f"{exc.message} (local check of the key's release policy: {local.message})",
            reason=exc.reason,
            details={**exc.details, **local.details},
            hint=exc.hint,
        )
    except ConfinferError:
        return exc
    return exc


def release_kek(
    cfg: Config,
    key_id: KeyId,
    vtpm: Vtpm,
    *,
    algorithm: str | None = None,
    nonce: str | None = None,
    attestation: AttestationResult | None = None,
) -> KekPrivateKey:
    """Attest, release ``key_id`` from Key Vault, decrypt it in ``vtpm``: the KEK.

    ``key_id`` comes from :func:`confinfer.keyvault.choose_key` (the configured keys).
    ``algorithm`` defaults to ``cfg.skr_algorithm``; ``nonce`` to a fresh random one (Key
    Vault must echo it). ``attestation`` reuses a result obtained elsewhere (attestd).
    """
    from confinfer import maa
    from confinfer.http import Http

    alg = algorithm or cfg.skr_algorithm
    if alg not in SKR_ALGORITHMS:
        raise UsageError(
            f"unknown key-release algorithm {alg!r}; expected one of {', '.join(SKR_ALGORITHMS)}"
        )
    with Http(cfg) as http, KeyVault(cfg, http=http) as vault:
        result = attestation or maa.attest(vtpm, cfg, http=http)
        check_token_fresh(result.claims)
        try:
            released = vault.release(
                key_id,
                result.token,
                algorithm=alg,
                nonce=nonce if nonce is not None else new_nonce(),
            )
        except KeyReleaseError as exc:
            if exc.reason == Reason.RELEASE_REFUSED:
                raise explain_refusal(exc, vault, key_id, result.claims) from None
            raise
    kek = unwrap_transfer_blob(
        released, alg, vtpm, transfer_key_bytes=transfer_key_bytes(result.claims)
    )
    LOG.info("released KEK %s (%s)", kek.kid, alg)
    return kek
