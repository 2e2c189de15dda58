"""RS256 tokens and the key sets that verify them, as Azure's services handle them.

Signing: :func:`sign` makes a compact JWS with ``kid`` (and optionally ``x5c``) from a testbed
:class:`~testbed.pki.Pair`. Verifying: :func:`verify` checks an RS256 token against a ``kid ->
public key`` map; :func:`fetch_signing_keys` builds that map the way Key Vault does for an
attestation authority: OpenID metadata at ``{issuer}/.well-known/openid-configuration``, then the
JWKS at its ``jwks_uri``, every entry's ``x5c`` chain checked against the trusted roots and its
``n``/``e`` against the certificate. Every refusal is a :class:`TokenError` with a stable reason.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import jwt.types
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from testbed.pki import Pair

FETCH_TIMEOUT_S = 5.0
MAX_DOCUMENT_BYTES = 256 * 1024


class TokenError(Exception):
    """A token, or the key set meant to verify it, was refused."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


_B64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")


def b64url_decode(text: str) -> bytes:
    """Decode base64url with or without padding; raises ValueError on anything else."""
    if not isinstance(text, str) or not _B64URL.fullmatch(text):
        raise ValueError("not base64url")
    text = text.rstrip("=")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def x5t(cert: x509.Certificate) -> str:
    """The certificate's SHA-1 thumbprint, base64url: what AAD and MAA use as ``kid``."""
    der = cert.public_bytes(serialization.Encoding.DER)
    return b64url(hashlib.sha1(der, usedforsecurity=False).digest())


def sign(
    claims: Mapping[str, Any],
    pair: Pair,
    *,
    x5c: Sequence[Pair] = (),
    kid: str | None = None,
    extra_header: Mapping[str, Any] | None = None,
) -> str:
    """A compact RS256 JWS over ``claims`` signed by ``pair``'s key."""
    if not isinstance(pair.key, rsa.RSAPrivateKey):
        raise TypeError("RS256 needs an RSA key")
    header: dict[str, Any] = {"kid": kid if kid is not None else x5t(pair.cert)}
    if x5c:
        header["x5c"] = [base64.b64encode(p.cert_der).decode("ascii") for p in x5c]
    header.update(extra_header or {})
    return jwt.encode(dict(claims), pair.key, algorithm="RS256", headers=header)


def unverified_header(token: str) -> dict[str, Any]:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise TokenError("malformed", f"not a compact JWS: {exc}") from None
    return dict(header)


def unverified_claims(token: str) -> dict[str, Any]:
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise TokenError("malformed", f"not a compact JWS: {exc}") from None
    return dict(claims)


def verify(
    token: str,
    keys: Mapping[str, rsa.RSAPublicKey],
    *,
    issuer: str | None = None,
    audience: str | Sequence[str] | None = None,
    leeway_s: int = 60,
) -> dict[str, Any]:
    """The verified claims of an RS256 ``token`` whose header ``kid`` names one of ``keys``."""
    header = unverified_header(token)
    if header.get("alg") != "RS256":
        raise TokenError("algorithm", f"token alg {header.get('alg')!r} is not RS256")
    kid = header.get("kid")
    if not isinstance(kid, str) or kid not in keys:
        raise TokenError("unknown-kid", f"token kid {kid!r} names no signing key of the issuer")
    options: jwt.types.Options = {"require": ["exp", "iss"], "verify_aud": audience is not None}
    try:
        claims = jwt.decode(
            token,
            keys[kid],
            algorithms=["RS256"],
            issuer=issuer,
            audience=audience,
            leeway=leeway_s,
            options=options,
        )
    except jwt.ExpiredSignatureError:
        raise TokenError("expired", "token has expired (exp is in the past)") from None
    except jwt.ImmatureSignatureError:
        raise TokenError("not-yet-valid", "token is not yet valid (nbf in the future)") from None
    except jwt.InvalidSignatureError:
        raise TokenError("signature", "token signature does not verify") from None
    except jwt.InvalidAudienceError:
        raise TokenError("audience", "token audience is not accepted here") from None
    except jwt.InvalidIssuerError:
        raise TokenError("issuer", "token issuer is not accepted here") from None
    except jwt.MissingRequiredClaimError as exc:
        raise TokenError("missing-claim", f"token lacks the {exc.claim!r} claim") from None
    except jwt.PyJWTError as exc:
        raise TokenError("malformed", f"token is malformed: {exc}") from None
    return dict(claims)


def load_roots(bundle: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(bundle.read_bytes())


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def verify_chain(chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]) -> None:
    """``chain[0]`` must lead, through the rest of ``chain`` in order, to one of ``roots``."""
    if not chain:
        raise TokenError("untrusted-chain", "empty x5c")
    now = dt.datetime.now(dt.UTC)
    for cert in chain:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise TokenError(
                "untrusted-chain",
                f"certificate {cert.subject.rfc4514_string()!r} is outside its validity period",
            )
    current, rest = chain[0], list(chain[1:])
    while True:
        if any(current == root or _issued_by(current, root) for root in roots):
            return
        if not rest or not _issued_by(current, rest[0]):
            raise TokenError(
                "untrusted-chain",
                f"x5c of {chain[0].subject.rfc4514_string()!r} does not lead to a trusted root",
            )
        current = rest.pop(0)


def _int(value: Any) -> int:
    return int.from_bytes(b64url_decode(value), "big")


def signing_keys(jwks: Any, roots: Sequence[x509.Certificate]) -> dict[str, rsa.RSAPublicKey]:
    """The ``kid -> key`` map of a JWKS whose entries carry trusted ``x5c`` chains."""
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise TokenError("metadata", "JWKS is not an object with a 'keys' array")
    keys: dict[str, rsa.RSAPublicKey] = {}
    for entry in jwks["keys"]:
        if not isinstance(entry, dict) or entry.get("kty") != "RSA":
            continue
        kid, x5c = entry.get("kid"), entry.get("x5c")
        if not isinstance(kid, str) or not isinstance(x5c, list) or not x5c:
            raise TokenError("metadata", "JWKS entry lacks 'kid' or 'x5c'")
        try:
            chain = [
                x509.load_der_x509_certificate(base64.b64decode(c, validate=True)) for c in x5c
            ]
        except (ValueError, TypeError):
            raise TokenError("metadata", f"JWKS entry {kid!r}: x5c is not base64 DER") from None
        verify_chain(chain, roots)
        public = chain[0].public_key()
        if not isinstance(public, rsa.RSAPublicKey):
            raise TokenError("metadata", f"JWKS entry {kid!r}: certificate key is not RSA")
        if "n" in entry or "e" in entry:
            numbers = public.public_numbers()
            try:
                same = (_int(entry.get("n")), _int(entry.get("e"))) == (numbers.n, numbers.e)
            except (ValueError, TypeError):
                same = False
            if not same:
                raise TokenError("metadata", f"JWKS entry {kid!r}: n/e do not match its x5c")
        keys[kid] = public
    return keys


async def _get_json(session: aiohttp.ClientSession, url: str, ssl_ctx: ssl.SSLContext) -> Any:
    if not url.startswith("https://"):
        raise TokenError("metadata", f"refusing to fetch {url!r}: not https")
    try:
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
        async with session.get(url, ssl=ssl_ctx, timeout=timeout) as resp:
            if resp.status != 200:
                raise TokenError("metadata", f"GET {url} answered HTTP {resp.status}")
            body = await resp.content.read(MAX_DOCUMENT_BYTES + 1)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise TokenError("metadata", f"GET {url} failed: {exc.__class__.__name__}: {exc}") from None
    if len(body) > MAX_DOCUMENT_BYTES:
        raise TokenError("metadata", f"GET {url}: document too large")
    try:
        return json.loads(body)
    except ValueError:
        raise TokenError("metadata", f"GET {url}: not JSON") from None


async def fetch_signing_keys(
    session: aiohttp.ClientSession,
    issuer: str,
    ssl_ctx: ssl.SSLContext,
    roots: Sequence[x509.Certificate],
) -> tuple[str, dict[str, rsa.RSAPublicKey]]:
    """``(jwks_uri, kid -> key)`` for ``issuer``, from its OpenID metadata and JWKS."""
    base = issuer.rstrip("/")
    metadata = await _get_json(session, f"{base}/.well-known/openid-configuration", ssl_ctx)
    jwks_uri = metadata.get("jwks_uri") if isinstance(metadata, dict) else None
    if not isinstance(jwks_uri, str):
        raise TokenError("metadata", f"OpenID metadata of {base} has no jwks_uri")
    return jwks_uri, signing_keys(await _get_json(session, jwks_uri, ssl_ctx), roots)
