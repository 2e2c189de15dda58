"""Verification of attestation tokens: RS256 JWTs signed by an allow-listed issuer's JWKS.

The issuer (``iss``) must be on the configured allow-list before anything is fetched. Its
signing keys come from ``{iss}/.well-known/openid-configuration`` -> ``jwks_uri`` (which must lie
under ``iss``) -> JWKS, matched by the header's ``kid``. A ``jku`` header is never fetched: if
present it must name ``{iss}/certs``. Only RS256 is accepted (never ``none`` or an HMAC), and
``exp``/``nbf`` are checked with a small skew. JWKS are cached per issuer in-process and fetched
again once when a token names a key the cache lacks (key rotation).

Failures are :class:`~confinfer.errors.AttestationError` with distinct reasons:
``token-malformed``, ``token-untrusted-issuer``, ``token-unknown-kid``, ``token-bad-signature``,
``token-expired``, ``token-not-yet-valid``, ``token-jwks-invalid``; an unreachable issuer is a
:class:`~confinfer.errors.ServiceError` (``token-jwks-unavailable``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from confinfer import jose
from confinfer.errors import AttestationError, Reason, ServiceError
from confinfer.http import JWKS, Http

if TYPE_CHECKING:
    from confinfer.config import Config

Fetch = Callable[[str], Any]
"""GET a URL and return its decoded JSON body; raise ServiceError when that fails."""

LEEWAY_S = 60
MIN_KEY_BITS = 2048
JWKS_REFRESH_S = 30.0  # at most one unknown-kid refetch per issuer in this interval


@dataclass(frozen=True)
class VerifiedToken:
    token: str
    header: dict[str, Any]
    claims: dict[str, Any]
    issuer: str


def _fail(reason: Reason, message: str) -> AttestationError:
    return AttestationError(f"attestation token: {message}", reason=reason)


def b64url_decode(text: str, what: str) -> bytes:
    """Strict base64url (:func:`confinfer.jose.b64url_decode`), failing as token-malformed."""
    try:
        return jose.b64url_decode(text)
    except jose.JoseError:
        raise _fail(Reason.TOKEN_MALFORMED, f"{what} is not base64url") from None


def _uint(value: Any, what: str) -> int:
    if not isinstance(value, str) or not value:
        raise _fail(Reason.TOKEN_JWKS_INVALID, f"JWK {what} is missing")
    return int.from_bytes(b64url_decode(value, f"JWK {what}"), "big")


def _jwk_key(jwk: Mapping[str, Any]) -> rsa.RSAPublicKey:
    """The RSA key of one JWK; its x5c leaf, when present, must carry the same key."""
    kid = jwk.get("kid")
    if jwk.get("kty") != "RSA":
        raise _fail(Reason.TOKEN_JWKS_INVALID, f"key {kid!r} is not an RSA key")
    if jwk.get("use", "sig") != "sig" or jwk.get("alg", "RS256") != "RS256":
        raise _fail(Reason.TOKEN_JWKS_INVALID, f"key {kid!r} is not an RS256 signing key")
    leaf: rsa.RSAPublicKey | None = None
    x5c = jwk.get("x5c")
    if x5c is not None:
        if not isinstance(x5c, list) or not x5c or not isinstance(x5c[0], str):
            raise _fail(
                Reason.TOKEN_JWKS_INVALID, f"key {kid!r}: x5c is not a list of certificates"
            )
        try:
            cert = x509.load_der_x509_certificate(jose.b64_decode(x5c[0]))
        except ValueError:
            raise _fail(
                Reason.TOKEN_JWKS_INVALID, f"key {kid!r}: x5c[0] is not a certificate"
            ) from None
        cert_key = cert.public_key()
        if not isinstance(cert_key, rsa.RSAPublicKey):
            raise _fail(Reason.TOKEN_JWKS_INVALID, f"key {kid!r}: x5c[0] is not an RSA certificate")
        leaf = cert_key
    if "n" in jwk or "e" in jwk or leaf is None:
        key = rsa.RSAPublicNumbers(_uint(jwk.get("e"), "e"), _uint(jwk.get("n"), "n"))
        try:
            public = key.public_key()
        except ValueError:
            raise _fail(Reason.TOKEN_JWKS_INVALID, f"key {kid!r} is not a valid RSA key") from None
        if leaf is not None and leaf.public_numbers() != public.public_numbers():
            raise _fail(
                Reason.TOKEN_JWKS_INVALID, f"key {kid!r}: x5c certificate does not match n/e"
            )
    else:
        public = leaf
    if public.key_size < MIN_KEY_BITS:
        raise _fail(Reason.TOKEN_JWKS_INVALID, f"key {kid!r} has only {public.key_size} bits")
    return public


def _under(url: str, base: str) -> bool:
    """Whether ``url`` is ``base`` or below it, on the same origin."""
    u, b = urlsplit(url), urlsplit(base)
    if (u.scheme, u.netloc.lower()) != (b.scheme, b.netloc.lower()):
        return False
    base_path = b.path.rstrip("/")
    return u.path == base_path or u.path.startswith(base_path + "/")


_Key = rsa.RSAPublicKey | AttestationError


class JwksCache:
    """Signing keys per issuer: ``{issuer: {kid: key}}``, thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, dict[str, _Key]] = {}
        self._fetched: dict[str, float] = {}

    def clear(self) -> None:
        with self._lock:
            self._keys.clear()
            self._fetched.clear()

    def key(self, issuer: str, kid: str, fetch: Fetch) -> rsa.RSAPublicKey:
        """The issuer's signing key ``kid``; raises if it is unknown or its JWK is unusable."""
        with self._lock:
            keys = self._keys.get(issuer)
            stale = time.monotonic() - self._fetched.get(issuer, -JWKS_REFRESH_S * 2)
        if keys is None or (kid not in keys and stale >= JWKS_REFRESH_S):
            keys = self._fetch(issuer, fetch)
            with self._lock:
                self._keys[issuer] = keys
                self._fetched[issuer] = time.monotonic()
        if kid not in keys:
            raise _fail(Reason.TOKEN_UNKNOWN_KID, f"issuer {issuer} has no signing key {kid!r}")
        found = keys[kid]
        if isinstance(found, AttestationError):
            raise found
        return found

    @staticmethod
    def _fetch(issuer: str, fetch: Fetch) -> dict[str, _Key]:
        metadata = fetch(f"{issuer}/.well-known/openid-configuration")
        if not isinstance(metadata, Mapping):
            raise _fail(Reason.TOKEN_JWKS_INVALID, "OpenID metadata is not a JSON object")
        stated = metadata.get("issuer")
        if stated is not None and (
            not isinstance(stated, str) or stated.rstrip("/") != issuer.rstrip("/")
        ):
            raise _fail(
                Reason.TOKEN_JWKS_INVALID, f"OpenID metadata names issuer {stated!r}, not {issuer}"
            )
        jwks_uri = metadata.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not _under(jwks_uri, issuer):
            raise _fail(
                Reason.TOKEN_JWKS_INVALID, f"jwks_uri {jwks_uri!r} is not under the issuer {issuer}"
            )
        jwks = fetch(jwks_uri)
        entries = jwks.get("keys") if isinstance(jwks, Mapping) else None
        if not isinstance(entries, list):
            raise _fail(Reason.TOKEN_JWKS_INVALID, f"{jwks_uri} is not a JWKS")
        keys: dict[str, _Key] = {}
        for entry in entries:
            if not isinstance(entry, Mapping) or not isinstance(entry.get("kid"), str):
                continue
            # One unusable entry must not take down the keys beside it: keep its error for a
            # token that names it.
            try:
                keys[entry["kid"]] = _jwk_key(entry)
            except AttestationError as exc:
                keys[entry["kid"]] = exc
        return keys


CACHE = JwksCache()


def verify_token(
    token: str,
    *,
    issuers: Sequence[str],
    fetch: Fetch,
    now: float | None = None,
    leeway_s: int = LEEWAY_S,
    cache: JwksCache | None = None,
) -> VerifiedToken:
    """Verify ``token`` against the allow-listed ``issuers``; return its header and claims."""
    try:
        jws = jose.parse(token)
    except jose.JoseError as exc:
        reason = (
            Reason.TOKEN_BAD_SIGNATURE
            if isinstance(exc, jose.AlgorithmError)
            else Reason.TOKEN_MALFORMED
        )
        raise _fail(reason, str(exc)) from None
    header, claims = jws.header, jws.payload

    iss = claims.get("iss")
    allowed = {i.rstrip("/"): i.rstrip("/") for i in issuers}
    if not isinstance(iss, str) or iss.rstrip("/") not in allowed:
        raise _fail(
            Reason.TOKEN_UNTRUSTED_ISSUER,
            f"issuer {iss!r} is not one of the trusted issuers "
            f"({', '.join(allowed) or 'none configured'})",
        )
    issuer = allowed[iss.rstrip("/")]  # build URLs from the configured spelling only
    jku = header.get("jku")
    if jku is not None and (not isinstance(jku, str) or jku.rstrip("/") != f"{issuer}/certs"):
        raise _fail(
            Reason.TOKEN_UNTRUSTED_ISSUER,
            f"jku {jku!r} is not {issuer}/certs; keys are only taken from the issuer",
        )
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise _fail(Reason.TOKEN_MALFORMED, "header has no kid")

    key = (cache or CACHE).key(issuer, kid, fetch)
    try:
        jose.verify(jws, key)
    except jose.JoseError:
        raise _fail(
            Reason.TOKEN_BAD_SIGNATURE, f"signature does not verify with {issuer} key {kid!r}"
        ) from None

    current = time.time() if now is None else now
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise _fail(Reason.TOKEN_MALFORMED, "exp is missing or not a number")
    if current > exp + leeway_s:
        raise _fail(Reason.TOKEN_EXPIRED, f"expired {int(current - exp)} s ago (exp {int(exp)})")
    nbf = claims.get("nbf")
    if nbf is not None:
        if not isinstance(nbf, int | float) or isinstance(nbf, bool):
            raise _fail(Reason.TOKEN_MALFORMED, "nbf is not a number")
        if current + leeway_s < nbf:
            raise _fail(
                Reason.TOKEN_NOT_YET_VALID,
                f"not valid for another {int(nbf - current)} s (nbf {int(nbf)})",
            )
    return VerifiedToken(token=token, header=header, claims=claims, issuer=issuer)


def http_fetch(http: Http) -> Fetch:
    """A :data:`Fetch` over HTTPS through the one HTTP layer (``ca_bundle`` or the system)."""

    def fetch(url: str) -> Any:
        if urlsplit(url).scheme != "https":
            raise _fail(Reason.TOKEN_JWKS_INVALID, f"{url} is not an https:// URL")
        reply = http.request("GET", url, service=JWKS, headers={"Accept": "application/json"})
        if reply.status != 200:
            raise ServiceError(
                f"{url} answered HTTP {reply.status}", reason=Reason.TOKEN_JWKS_UNAVAILABLE
            )
        try:
            return reply.json()
        except ValueError:
            raise _fail(Reason.TOKEN_JWKS_INVALID, f"{url} did not answer JSON") from None

    return fetch


def verify(
    token: str,
    cfg: Config,
    *,
    http: Http | None = None,
    fetch: Fetch | None = None,
    now: float | None = None,
) -> VerifiedToken:
    """Verify ``token`` against ``cfg.issuers``, fetching keys over HTTPS."""
    if fetch is not None:
        return verify_token(token, issuers=cfg.issuers, fetch=fetch, now=now)
    with contextlib.ExitStack() as stack:
        session = http if http is not None else stack.enter_context(Http(cfg))
        return verify_token(token, issuers=cfg.issuers, fetch=http_fetch(session), now=now)
