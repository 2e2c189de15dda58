"""Token verification: RS256 against the issuer's JWKS, and every way a token must be refused."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from confinfer import token
from confinfer.config import Config
from confinfer.errors import AttestationError, Reason, ServiceError
from confinfer.http import Http, Reply, Service
from confinfer.token import JwksCache, verify_token

pytestmark = pytest.mark.unit

ISS = "https://maa.test.example"
NOW = 1_800_000_000.0


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def uint(value: int) -> str:
    return b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


_KEYS: dict[str, rsa.RSAPrivateKey] = {}


def key(name: str, bits: int = 2048) -> rsa.RSAPrivateKey:
    if name not in _KEYS:
        _KEYS[name] = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return _KEYS[name]


def cert_der(k: rsa.RSAPrivateKey) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "maa signing")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(k.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(k, hashes.SHA256())
    )
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


def jwk(kid: str, k: rsa.RSAPrivateKey, *, form: str = "x5c") -> dict[str, Any]:
    """A JWK as MAA publishes it (x5c only), or with n/e, or both."""
    entry: dict[str, Any] = {"kid": kid, "kty": "RSA"}
    numbers = k.public_key().public_numbers()
    if form in ("x5c", "both"):
        entry["x5c"] = [cert_der(k)]
    if form in ("ne", "both"):
        entry.update(n=uint(numbers.n), e=uint(numbers.e))
    return entry


def sign(
    claims: dict[str, Any],
    k: rsa.RSAPrivateKey,
    *,
    kid: str = "k1",
    header: dict[str, Any] | None = None,
) -> str:
    head = {"alg": "RS256", "jku": f"{ISS}/certs", "kid": kid, "typ": "JWT"}
    if header is not None:
        head = header
    signing_input = f"{b64url(json.dumps(head).encode())}.{b64url(json.dumps(claims).encode())}"
    sig = k.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(sig)}"


def claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISS,
        "iat": NOW - 10,
        "nbf": NOW - 10,
        "exp": NOW + 3600,
        "x-ms-attestation-type": "azurevm",
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


class Issuer:
    """The issuer's two documents, served from memory, counting fetches."""

    def __init__(
        self,
        keys: list[dict[str, Any]],
        *,
        jwks_uri: str = f"{ISS}/certs",
        issuer: str | None = ISS,
    ) -> None:
        self.docs: dict[str, Any] = {
            f"{ISS}/.well-known/openid-configuration": {
                "jwks_uri": jwks_uri,
                "id_token_signing_alg_values_supported": ["RS256"],
                **({"issuer": issuer} if issuer else {}),
            },
            jwks_uri: {"keys": keys},
        }
        self.fetched: list[str] = []

    def __call__(self, url: str) -> Any:
        self.fetched.append(url)
        if url not in self.docs:
            raise ServiceError(f"{url} answered HTTP 404", reason=Reason.TOKEN_JWKS_UNAVAILABLE)
        return self.docs[url]


def verify(token: str, fetch: Callable[[str], Any], **kw: Any) -> Any:
    kw.setdefault("now", NOW)
    return verify_token(token, issuers=[ISS], fetch=fetch, cache=JwksCache(), **kw)


def reason(token: str, fetch: Callable[[str], Any], **kw: Any) -> str:
    with pytest.raises(AttestationError) as err:
        verify(token, fetch, **kw)
    return err.value.reason


@pytest.mark.parametrize("form", ["x5c", "ne", "both"])
def test_valid_token_verifies(form: str) -> None:
    issuer = Issuer([jwk("k1", key("a"), form=form)])
    result = verify(sign(claims(), key("a")), issuer)
    assert result.claims["x-ms-attestation-type"] == "azurevm"
    assert result.header["kid"] == "k1"
    assert result.issuer == ISS
    assert issuer.fetched == [f"{ISS}/.well-known/openid-configuration", f"{ISS}/certs"]


def test_trailing_slash_issuer_and_allow_list() -> None:
    issuer = Issuer([jwk("k1", key("a"))])
    token = sign(claims(iss=ISS + "/"), key("a"))
    result = verify_token(token, issuers=[ISS + "/"], fetch=issuer, now=NOW, cache=JwksCache())
    assert result.issuer == ISS


def test_expired_and_not_yet_valid_respect_leeway() -> None:
    issuer = Issuer([jwk("k1", key("a"))])
    assert reason(sign(claims(exp=NOW - 61), key("a")), issuer) == "token-expired"
    verify(sign(claims(exp=NOW - 30), key("a")), issuer)  # inside the skew
    assert reason(sign(claims(nbf=NOW + 61), key("a")), issuer) == "token-not-yet-valid"
    verify(sign(claims(nbf=NOW + 30), key("a")), issuer)
    assert reason(sign(claims(exp=None), key("a")), issuer) == "token-malformed"
    assert reason(sign(claims(exp="soon"), key("a")), issuer) == "token-malformed"


def test_foreign_key_with_a_known_kid_is_a_bad_signature() -> None:
    issuer = Issuer([jwk("k1", key("a"))])
    assert reason(sign(claims(), key("mallory")), issuer) == "token-bad-signature"


def test_tampered_payload_is_a_bad_signature() -> None:
    issuer = Issuer([jwk("k1", key("a"))])
    head, _, sig = sign(claims(), key("a")).split(".")
    forged = b64url(json.dumps(claims(**{"x-ms-attestation-type": "sevsnpvm"})).encode())
    assert reason(f"{head}.{forged}.{sig}", issuer) == "token-bad-signature"


def test_unknown_kid_refetches_once_then_refuses() -> None:
    issuer = Issuer([jwk("k1", key("a"))])
    cache = JwksCache()
    verify_token(sign(claims(), key("a")), issuers=[ISS], fetch=issuer, now=NOW, cache=cache)
    verify_token(sign(claims(), key("a")), issuers=[ISS], fetch=issuer, now=NOW, cache=cache)
    assert len(issuer.fetched) == 2  # cached
    with pytest.raises(AttestationError) as err:
        verify_token(
            sign(claims(), key("b"), kid="k2"), issuers=[ISS], fetch=issuer, now=NOW, cache=cache
        )
    assert err.value.reason == "token-unknown-kid"
    assert "'k2'" in err.value.message


def test_rotated_key_is_picked_up() -> None:
    issuer = Issuer([jwk("k1", key("a"))])
    # A cache that fetched long ago refetches when a new kid appears.
    cache = JwksCache()
    verify_token(sign(claims(), key("a")), issuers=[ISS], fetch=issuer, now=NOW, cache=cache)
    cache._fetched[ISS] -= 3600
    issuer.docs[f"{ISS}/certs"] = {"keys": [jwk("k1", key("a")), jwk("k2", key("b"))]}
    verify_token(
        sign(claims(), key("b"), kid="k2"), issuers=[ISS], fetch=issuer, now=NOW, cache=cache
    )


def test_jku_elsewhere_is_refused_without_fetching_it() -> None:
    issuer = Issuer([jwk("k1", key("a"))])
    head = {"alg": "RS256", "kid": "k1", "jku": "https://evil.example/certs"}
    assert reason(sign(claims(), key("a"), header=head), issuer) == "token-untrusted-issuer"
    assert issuer.fetched == []
    # No jku at all is fine; the keys come from the issuer's metadata.
    verify(sign(claims(), key("a"), header={"alg": "RS256", "kid": "k1"}), issuer)


def test_untrusted_issuer_is_refused_before_any_fetch() -> None:
    issuer = Issuer([jwk("k1", key("a"))])
    for iss in ("https://evil.example", ISS + ".evil.example", None, 42):
        assert reason(sign(claims(iss=iss), key("a")), issuer) == "token-untrusted-issuer"
    assert issuer.fetched == []


@pytest.mark.parametrize("alg", ["none", "HS256", "RS512", "PS256", None])
def test_only_rs256_is_accepted(alg: str | None) -> None:
    issuer = Issuer([jwk("k1", key("a"))])
    head = {"alg": alg, "kid": "k1"}
    if alg == "HS256":
        # The classic confusion: an HMAC keyed with the issuer's public key.
        pub = (
            key("a")
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
        )
        body = b64url(json.dumps(claims()).encode())
        signing_input = f"{b64url(json.dumps(head).encode())}.{body}"
        mac = hmac.new(pub, signing_input.encode(), hashlib.sha256).digest()
        token = f"{signing_input}.{b64url(mac)}"
    elif alg == "none":
        token = sign(claims(), key("a"), header=head).rsplit(".", 1)[0] + "."
    else:
        token = sign(claims(), key("a"), header=head)
    assert reason(token, issuer) == "token-bad-signature"
    assert issuer.fetched == []


@pytest.mark.parametrize(
    "token",
    [
        "",
        "a.b",
        "a.b.c.d",
        "!!!.e30.",
        "e30.e30.e30",
        "bnVsbA.e30.",
        "e30.W10.",
        "eyJhbGciOiJSUzI1NiJ9.e30.%%%",
    ],
)
def test_malformed_tokens(token: str) -> None:
    issuer = Issuer([jwk("k1", key("a"))])
    assert reason(token, issuer) in ("token-malformed", "token-bad-signature")


def test_missing_kid_is_malformed() -> None:
    issuer = Issuer([jwk("k1", key("a"))])
    assert reason(sign(claims(), key("a"), header={"alg": "RS256"}), issuer) == "token-malformed"


def test_jwks_uri_outside_the_issuer_is_refused() -> None:
    for uri in (
        "https://evil.example/certs",
        f"{ISS}.evil.example/certs",
        "http://maa.test.example/certs",
    ):
        issuer = Issuer([jwk("k1", key("a"))], jwks_uri=uri)
        assert reason(sign(claims(), key("a")), issuer) == "token-jwks-invalid"
        assert uri not in issuer.fetched


def test_metadata_naming_another_issuer_is_refused() -> None:
    issuer = Issuer([jwk("k1", key("a"))], issuer="https://other.example")
    assert reason(sign(claims(), key("a")), issuer) == "token-jwks-invalid"


def test_x5c_that_does_not_match_n_e_is_refused() -> None:
    entry = jwk("k1", key("a"), form="ne")
    entry["x5c"] = [cert_der(key("b"))]
    assert reason(sign(claims(), key("a")), Issuer([entry])) == "token-jwks-invalid"


def test_small_keys_are_refused() -> None:
    small = key("small", 1024)
    assert reason(sign(claims(), small), Issuer([jwk("k1", small)])) == "token-jwks-invalid"


def test_unreachable_issuer_is_a_service_error() -> None:
    def down(url: str) -> Any:
        raise ServiceError(f"cannot fetch {url}", reason=Reason.TOKEN_JWKS_UNAVAILABLE)

    with pytest.raises(ServiceError) as err:
        verify(sign(claims(), key("a")), down)
    assert err.value.reason == "token-jwks-unavailable"


def test_an_unusable_jwk_does_not_hide_the_others() -> None:
    broken = {"kid": "old", "kty": "RSA", "x5c": ["not base64!"]}
    issuer = Issuer([broken, {"kid": "ec", "kty": "EC", "crv": "P-256"}, jwk("k1", key("a"))])
    verify(sign(claims(), key("a")), issuer)
    assert reason(sign(claims(), key("a"), kid="old"), issuer) == "token-jwks-invalid"
    assert reason(sign(claims(), key("a"), kid="ec"), issuer) == "token-jwks-invalid"


# --- fetching over the one HTTP layer (token.verify, token.http_fetch) ----------------------


class CannedHttp(Http):
    """An Http that answers from memory (no socket), recording what was asked."""

    def __init__(self, replies: dict[str, tuple[int, bytes]]) -> None:
        super().__init__(Config(max_retries=0))
        self.replies = replies
        self.asked: list[tuple[str, str]] = []

    def request(
        self,
        method: str,
        url: str,
        *,
        service: Service,
        headers: Any = None,
        body: bytes | None = None,
    ) -> Reply:
        self.asked.append((url, service.name))
        status, data = self.replies.get(url, (404, b'{"error": "not here"}'))
        return Reply(url, status, {"Content-Type": "application/json"}, data)


def issuer_replies(keys: list[dict[str, Any]]) -> dict[str, tuple[int, bytes]]:
    metadata = {"issuer": ISS, "jwks_uri": f"{ISS}/certs"}
    return {
        f"{ISS}/.well-known/openid-configuration": (200, json.dumps(metadata).encode()),
        f"{ISS}/certs": (200, json.dumps({"keys": keys}).encode()),
    }


@pytest.fixture(autouse=True)
def _fresh_jwks_cache() -> Any:
    token.CACHE.clear()
    yield
    token.CACHE.clear()


def test_verify_fetches_keys_through_the_http_layer() -> None:
    http = CannedHttp(issuer_replies([jwk("k1", key("a"))]))
    result = token.verify(sign(claims(), key("a")), Config(maa_url=ISS), http=http, now=NOW)
    assert result.issuer == ISS
    assert http.asked == [
        (f"{ISS}/.well-known/openid-configuration", "jwks"),
        (f"{ISS}/certs", "jwks"),
    ]


def test_verify_with_an_injected_fetch_uses_no_http() -> None:
    issuer = Issuer([jwk("k1", key("a"))])
    result = token.verify(sign(claims(), key("a")), Config(maa_url=ISS), fetch=issuer, now=NOW)
    assert result.claims["iss"] == ISS
    assert len(issuer.fetched) == 2


def test_jwks_answering_an_error_is_jwks_unavailable() -> None:
    replies = issuer_replies([jwk("k1", key("a"))])
    replies[f"{ISS}/certs"] = (500, b"oops")
    with pytest.raises(ServiceError) as err:
        token.verify(
            sign(claims(), key("a")), Config(maa_url=ISS), http=CannedHttp(replies), now=NOW
        )
    assert err.value.reason == Reason.TOKEN_JWKS_UNAVAILABLE
    assert "HTTP 500" in err.value.message


def test_jwks_that_is_not_json_is_jwks_invalid() -> None:
    replies = issuer_replies([jwk("k1", key("a"))])
    replies[f"{ISS}/certs"] = (200, b"<html>")
    with pytest.raises(AttestationError) as err:
        token.verify(
            sign(claims(), key("a")), Config(maa_url=ISS), http=CannedHttp(replies), now=NOW
        )
    assert err.value.reason == Reason.TOKEN_JWKS_INVALID


def test_http_fetch_refuses_plain_http() -> None:
    http = CannedHttp({})
    with pytest.raises(AttestationError) as err:
        token.http_fetch(http)("http://maa.test.example/certs")
    assert err.value.reason == Reason.TOKEN_JWKS_INVALID
    assert http.asked == []


def test_unreachable_jwks_endpoint_is_jwks_unavailable() -> None:
    """A real Http to a loopback port nobody listens on: the JWKS service's own reason."""
    down = "https://127.0.0.1:1"
    with pytest.raises(ServiceError) as err:
        token.verify(
            sign(claims(iss=down), key("a"), header={"alg": "RS256", "kid": "k1"}),
            Config(maa_url=down, max_retries=0),
            now=NOW,
        )
    assert err.value.reason == Reason.TOKEN_JWKS_UNAVAILABLE
