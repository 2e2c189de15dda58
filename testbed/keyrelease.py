"""Secure Key Release, Key Vault's side: judge the attestation token, wrap the key, sign the reply.

``verify_target`` takes the release request's ``target`` (an attestation token) through what Key
Vault checks: its ``iss`` names an authority of the key's release policy; that authority's OpenID
metadata and JWKS (fetched over TLS, x5c chains checked against the trusted roots) hold the key
the header ``kid`` names; RS256, ``exp`` and ``nbf`` verify; the claims satisfy the policy; and
``x-ms-runtime.keys`` holds an RSA key for encryption (the transfer key).

``release_jws`` wraps the key to the transfer key (CKM_RSA_AES_KEY_WRAP: ``RSA-OAEP(transfer key,
K_aes) || AES-KWP(K_aes, PKCS#8 DER)``, OAEP and MGF1 hash by ``enc``) and signs the reply
``{"request": {...}, "response": {"key": {key{..., key_hsm}, attributes, release_policy}}}`` as
Key Vault does (shared/reference/azure-protocols.md §7.1-7.2): RS256 by the vault's own TLS
service certificate, header ``alg, kid, x5t, typ, x5t#S256, x5c`` with x5c = [leaf,
intermediate, root].
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

from testbed import releasepolicy
from testbed.jwks import (
    TokenError,
    b64url,
    b64url_decode,
    fetch_signing_keys,
    unverified_claims,
    unverified_header,
    verify,
)
from testbed.keystore import KeyVersion
from testbed.pki import Pair, Trust

ENC_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "CKM_RSA_AES_KEY_WRAP": hashes.SHA1,
    "RSA_AES_KEY_WRAP_256": hashes.SHA256,
    "RSA_AES_KEY_WRAP_384": hashes.SHA384,
}
DEFAULT_ENC = "CKM_RSA_AES_KEY_WRAP"
MIN_TRANSFER_KEY_BITS = 2048
TOKEN_LEEWAY_S = 60


class ReleaseRefused(Exception):
    """Key Vault refuses the release; ``code`` is the inner error code, stable per cause."""

    def __init__(self, code: str, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class TransferKey:
    kid: str
    public_key: rsa.RSAPublicKey


def _int(value: Any) -> int:
    return int.from_bytes(b64url_decode(value), "big")


def transfer_key(claims: Mapping[str, Any]) -> TransferKey:
    """The first RSA key in ``x-ms-runtime.keys`` usable for encryption."""
    runtime = claims.get("x-ms-runtime")
    keys = runtime.get("keys") if isinstance(runtime, dict) else None
    for jwk in keys if isinstance(keys, list) else []:
        if not isinstance(jwk, dict) or jwk.get("kty") != "RSA":
            continue
        ops = jwk.get("key_ops")
        usable = (isinstance(ops, list) and "encrypt" in ops) or "enc" in (
            jwk.get("use"),
            jwk.get("key_use"),
        )
        if not usable:
            continue
        try:
            public = rsa.RSAPublicNumbers(_int(jwk["e"]), _int(jwk["n"])).public_key()
        except (KeyError, ValueError, TypeError):
            raise ReleaseRefused(
                "NoTransferKey",
                f"x-ms-runtime.keys: the RSA encryption key {jwk.get('kid')!r} has an invalid n/e",
            ) from None
        if public.key_size < MIN_TRANSFER_KEY_BITS:
            raise ReleaseRefused(
                "NoTransferKey",
                f"x-ms-runtime.keys: key {jwk.get('kid')!r} "
                f"is {public.key_size} bits; at least {MIN_TRANSFER_KEY_BITS} "
                "required",
            )
        return TransferKey(str(jwk.get("kid", "")), public)
    raise ReleaseRefused(
        "NoTransferKey",
        "the attestation token carries no RSA key with encrypt usage in x-ms-runtime.keys",
    )


async def verify_target(
    target: str,
    policy: releasepolicy.Policy,
    session: aiohttp.ClientSession,
    ssl_ctx: ssl.SSLContext,
    roots: Sequence[x509.Certificate],
) -> tuple[dict[str, Any], TransferKey]:
    """The verified claims of the attestation token and the key to wrap the release to."""
    try:
        header = unverified_header(target)
        issuer = unverified_claims(target).get("iss")
    except TokenError as exc:
        raise ReleaseRefused(
            "BadParameter", f"target is not an attestation token: {exc.message}", status=400
        ) from None
    if not isinstance(issuer, str):
        raise ReleaseRefused("AttestationTokenInvalid", "the attestation token has no 'iss'")
    authorities = policy.authorities_for(issuer)
    if not authorities:
        known = ", ".join(a.authority for a in policy.authorities)
        raise ReleaseRefused(
            "UntrustedAuthority",
            f"the attestation token's issuer {issuer!r} is "
            f"not an authority of the key's release policy ({known})",
        )
    try:
        jwks_uri, keys = await fetch_signing_keys(session, authorities[0].authority, ssl_ctx, roots)
    except TokenError as exc:
        raise ReleaseRefused(
            "AuthorityMetadataUnavailable",
            "cannot obtain the signing keys of "
            f"authority {authorities[0].authority}: {exc.message}",
        ) from None
    jku = header.get("jku")
    if jku is not None and jku != jwks_uri:
        raise ReleaseRefused(
            "AttestationTokenInvalid",
            f"the attestation token's jku {jku!r} is not the authority's jwks_uri {jwks_uri!r}",
        )
    try:
        claims = verify(target, keys, leeway_s=TOKEN_LEEWAY_S)
    except TokenError as exc:
        raise ReleaseRefused(
            "AttestationTokenInvalid", f"attestation token refused ({exc.reason}): {exc.message}"
        ) from None
    verdict = releasepolicy.evaluate(policy, issuer, claims)
    if not verdict.allowed:
        raise ReleaseRefused(
            "ReleasePolicyNotSatisfied",
            "the attestation token does not satisfy "
            f"the key's release policy: {verdict.describe()}",
        )
    return claims, transfer_key(claims)


def wrap_key_material(transfer: rsa.RSAPublicKey, enc: str, material: bytes) -> bytes:
    """CKM_RSA_AES_KEY_WRAP: ``RSA-OAEP(transfer, K_aes) || AES-KWP(K_aes, material)``."""
    algorithm = ENC_HASHES[enc]
    k_aes = os.urandom(32)
    wrapped_aes = transfer.encrypt(
        k_aes, padding.OAEP(mgf=padding.MGF1(algorithm()), algorithm=algorithm(), label=None)
    )
    return wrapped_aes + aes_key_wrap_with_padding(k_aes, material)


def key_hsm(transfer_kid: str, enc: str, ciphertext: bytes) -> str:
    """The ``key_hsm`` blob: base64url of JSON whose ``ciphertext`` is base64url.

    Member order and ``schema_version`` "1.0" are those of a recorded release (not the BYOK
    spec's "1.0.0"); ``header.kid`` is the kid of the transfer key in the target token.
    """
    blob = {
        "schema_version": "1.0",
        "header": {"kid": transfer_kid, "alg": "dir", "enc": enc},
        "ciphertext": b64url(ciphertext),
    }
    return b64url(json.dumps(blob, separators=(",", ":")).encode("utf-8"))


def jws_header(chain: Sequence[Pair]) -> dict[str, Any]:
    """The release JWS header, members in the order Key Vault sends them: ``alg``, ``kid``
    (uppercase hex SHA-1 of x5c[0]), ``x5t`` (its base64url), ``typ``, ``x5t#S256``
    (base64url SHA-256 of x5c[0]) and ``x5c`` (leaf to root, standard base64 with padding)."""
    leaf = chain[0].cert_der
    sha1 = hashlib.sha1(leaf, usedforsecurity=False).digest()
    return {
        "alg": "RS256",
        "kid": sha1.hex().upper(),
        "x5t": b64url(sha1),
        "typ": "JWT",
        "x5t#S256": b64url(hashlib.sha256(leaf).digest()),
        "x5c": [base64.b64encode(p.cert_der).decode("ascii") for p in chain],
    }


def sign_compact(header: Mapping[str, Any], payload: Mapping[str, Any], signer: Pair) -> str:
    """A compact RS256 JWS with exactly this header (no members added, none reordered)."""
    if not isinstance(signer.key, rsa.RSAPrivateKey):
        raise TypeError("RS256 needs an RSA key")
    signing_input = (
        b64url(json.dumps(header, separators=(",", ":")).encode("utf-8"))
        + "."
        + b64url(json.dumps(payload, separators=(",", ":")).encode("utf-8"))
    )
    signature = signer.key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


def release_jws(
    trust: Trust,
    kv: KeyVersion,
    vault_url: str,
    *,
    api_version: str,
    enc: str,
    nonce: str | None,
    transfer: TransferKey,
    requested_kid: str,
    signer_role: str = "kv_tls",
) -> str:
    """The signed release reply for ``kv`` wrapped to ``transfer``.

    ``requested_kid`` is the key URL as the request named it (no version when it named none);
    ``signer_role`` is the TLS certificate that signs: the vault's own (``kv_tls``), or
    ``kv_tls_foreign`` for the "signed for another host" fault.
    """
    jwk = kv.public_jwk(vault_url) | {"kty": "RSA"}
    jwk["key_hsm"] = key_hsm(
        transfer.kid, enc, wrap_key_material(transfer.public_key, enc, kv.pkcs8_der())
    )
    released: dict[str, Any] = {"key": jwk, "attributes": kv.attributes() | {"exportable": True}}
    if kv.release_policy is not None:
        released["release_policy"] = {
            "data": b64url(kv.release_policy.data),
            "immutable": kv.release_policy.immutable,
        }
    request: dict[str, Any] = {"api-version": api_version, "enc": enc, "kid": requested_kid}
    if nonce is not None:
        request["nonce"] = nonce
    payload = {"request": request, "response": {"key": released}}
    chain = trust.chain(signer_role)
    return sign_compact(jws_header(chain), payload, chain[0])
