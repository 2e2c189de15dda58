"""The one JOSE layer: strict base64url, compact JWS parsing and RS256 verification, JWK keys.

Both signed things this product trusts go through here: MAA's attestation tokens
(:mod:`confinfer.token`) and Key Vault's Secure Key Release answer (:mod:`confinfer.keyvault`).
Signature verification is PyJWT's (``jwt.api_jws``), asked for RS256 only. Around it we add
what PyJWT leaves open: its base64url decoder skips characters outside the alphabet, so every
segment is checked against the strict alphabet first; ``crit`` header extensions are refused
(we implement none); the payload must be one JSON object; deep nesting is an error, not a
RecursionError. Callers choose the key; this module never fetches one.

Failures are :class:`JoseError` (a ValueError) with a short message; callers turn it into their
own reason (``token-malformed``, ``release-signature-invalid``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

ALGORITHM = "RS256"
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


class JoseError(ValueError):
    """A JWS, JWK or base64 value is malformed or does not verify."""


class AlgorithmError(JoseError):
    """A JWS names an algorithm other than RS256 (``none`` and HMAC included)."""


def b64url_decode(text: object) -> bytes:
    """Decode base64url, unpadded or padded, strictly; JoseError otherwise."""
    body = text.rstrip("=") if isinstance(text, str) else None
    if body is None or not _B64URL.fullmatch(body) or len(body) % 4 == 1:
        raise JoseError("not base64url")
    padded = body + "=" * (-len(body) % 4)
    if text not in (body, padded):
        raise JoseError("not base64url (wrong padding)")
    try:
        data = base64.urlsafe_b64decode(padded)
    except (binascii.Error, ValueError):
        raise JoseError("not base64url") from None
    if b64url_encode(data) != body:
        raise JoseError("not base64url (non-canonical trailing bits)")
    return data


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64_decode(text: object) -> bytes:
    """Decode standard, padded base64 strictly (x5c entries); JoseError otherwise."""
    if not isinstance(text, str) or not _B64.fullmatch(text) or len(text) % 4:
        raise JoseError("not base64")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise JoseError("not base64") from None


def b64_encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def json_object(data: bytes, what: str) -> dict[str, Any]:
    """``data`` as one JSON object; JoseError otherwise."""
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise JoseError(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise JoseError(f"{what} is not a JSON object")
    return value


@dataclass(frozen=True)
class Jws:
    """A compact JWS, parsed but not yet verified."""

    compact: str
    header: dict[str, Any]
    payload: dict[str, Any]


def parse(compact: object) -> Jws:
    """Split and decode a compact JWS (header, payload); nothing is verified yet."""
    if not isinstance(compact, str) or compact.count(".") != 2:
        raise JoseError("not a compact JWS (three dot-separated parts)")
    head, body, signature = compact.split(".")
    header = json_object(b64url_decode(head), "the header")
    alg = header.get("alg")
    if alg != ALGORITHM:
        raise AlgorithmError(f"algorithm {printable_alg(alg)} refused (only {ALGORITHM})")
    if not body or not signature:
        raise JoseError("a JWS part is empty (unsigned?)")
    payload = json_object(b64url_decode(body), "the payload")
    b64url_decode(signature)
    if "crit" in header:
        raise JoseError("critical header extensions are not supported")
    return Jws(compact, header, payload)


def printable_alg(alg: object) -> str:
    text = repr(alg)
    return text if len(text) <= 40 else text[:37] + "..."


def verify(jws: Jws, key: rsa.RSAPublicKey) -> None:
    """Check ``jws``'s RS256 signature with ``key``; JoseError when it does not verify."""
    try:
        jwt.api_jws.decode_complete(jws.compact, key=key, algorithms=[ALGORITHM])
    except jwt.exceptions.InvalidSignatureError:
        raise JoseError("the signature does not verify") from None
    except jwt.exceptions.PyJWTError as exc:
        raise JoseError(f"not a valid JWS ({exc.__class__.__name__})") from None


def rsa_public_key(jwk: Mapping[str, Any]) -> rsa.RSAPublicKey:
    """The RSA public key of a JWK's ``n`` and ``e``; JoseError when they are not one."""
    n, e = jwk.get("n"), jwk.get("e")
    if not isinstance(n, str) or not n or not isinstance(e, str) or not e:
        raise JoseError("the JWK has no n and e")
    numbers = rsa.RSAPublicNumbers(
        int.from_bytes(b64url_decode(e), "big"), int.from_bytes(b64url_decode(n), "big")
    )
    try:
        return numbers.public_key()
    except ValueError:
        raise JoseError("n and e are not a valid RSA key") from None


def rsa_numbers(jwk: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(n, e)`` of an RSA JWK, or None when it has none that decode."""
    try:
        key = rsa_public_key(jwk)
    except JoseError:
        return None
    numbers = key.public_numbers()
    return numbers.n, numbers.e


def x5c(header: Mapping[str, Any]) -> list[x509.Certificate]:
    """The ``x5c`` chain of a JWS header or JWK (leaf first); JoseError when malformed."""
    chain = header.get("x5c")
    if not isinstance(chain, list) or not chain or not all(isinstance(c, str) for c in chain):
        raise JoseError("there is no x5c certificate chain")
    try:
        return [x509.load_der_x509_certificate(b64_decode(c)) for c in chain]
    except ValueError:
        raise JoseError("the x5c chain holds something that is not a DER certificate") from None


def b64_any_decode(text: object) -> bytes:
    """Decode base64 or base64url, padded or not (some services use either); JoseError."""
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9+/_-]*={0,2}", text):
        raise JoseError("not base64")
    return b64url_decode(text.rstrip("=").replace("+", "-").replace("/", "_"))
