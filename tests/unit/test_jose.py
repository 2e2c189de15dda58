"""The one JOSE layer: strict base64url, compact JWS parsing and its refusals, RS256 verify."""

from __future__ import annotations

import base64
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from confinfer import jose
from confinfer.jose import JoseError

pytestmark = pytest.mark.unit

_KEYS: dict[str, rsa.RSAPrivateKey] = {}


def key(name: str) -> rsa.RSAPrivateKey:
    if name not in _KEYS:
        _KEYS[name] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _KEYS[name]


def enc(value: Any) -> str:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def signed(
    payload: dict[str, Any] | None = None,
    *,
    signer: str = "a",
    headers: dict[str, Any] | None = None,
) -> str:
    """A real RS256 JWS from PyJWT."""
    return jwt.encode(
        payload if payload is not None else {"iss": "https://maa.example"},
        key(signer),
        algorithm="RS256",
        headers=headers or {"kid": "k1"},
    )


def compact(header: Any, payload: Any, signature: str = "c2ln") -> str:
    return f"{enc(header)}.{enc(payload)}.{signature}"


# --- base64url ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", b""),
        ("YQ", b"a"),
        ("YQ==", b"a"),  # padded is accepted too
        ("YWI", b"ab"),
        ("YWJj", b"abc"),
        ("-_8", b"\xfb\xff"),
    ],
)
def test_b64url_decodes(text: str, expected: bytes) -> None:
    assert jose.b64url_decode(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "YQ==YQ",  # padding in the middle
        "Y=Q",
        "=YQ",
        "YQ+/",  # standard-alphabet characters
        "Y/Q",
        "YQ\n",  # whitespace and control characters
        " YQ",
        "YQ\x00",
        "Y.Q",
        "YQ%3D",
        "\uff39Q",  # a fullwidth letter
        "YWJjZ",  # length % 4 == 1 cannot be base64
        "Y",
    ],
)
def test_b64url_is_strict(text: str) -> None:
    with pytest.raises(JoseError):
        jose.b64url_decode(text)


@pytest.mark.parametrize("value", [None, b"YQ", 1, ["YQ"]])
def test_b64url_wants_a_string(value: object) -> None:
    with pytest.raises(JoseError):
        jose.b64url_decode(value)


def test_b64url_round_trips() -> None:
    for n in range(0, 70):
        data = bytes(range(256))[:n]
        text = jose.b64url_encode(data)
        assert "=" not in text
        assert jose.b64url_decode(text) == data


@pytest.mark.parametrize("text", ["YQ", "YQ=", "YQ==\n", "Y-_=", "YQ==YQ==", "===="])
def test_standard_b64_is_strict(text: str) -> None:
    with pytest.raises(JoseError):
        jose.b64_decode(text)
    assert jose.b64_decode("YQ==") == b"a"


# --- parse ---------------------------------------------------------------------------------


def test_parse_decodes_without_verifying() -> None:
    token = signed({"iss": "https://maa.example", "n": 1})
    jws = jose.parse(token)
    assert jws.header == {"alg": "RS256", "kid": "k1", "typ": "JWT"}
    assert jws.payload == {"iss": "https://maa.example", "n": 1}
    assert jws.compact == token
    # Parsing alone does not check the signature: a forged one still parses.
    head, body, _ = token.split(".")
    assert jose.parse(f"{head}.{body}.{enc(b'forged')}").payload["n"] == 1


@pytest.mark.parametrize(
    "alg", ["none", "None", "HS256", "RS512", "PS256", "ES256", "", 256, None, ["RS256"]]
)
def test_parse_refuses_every_algorithm_but_rs256(alg: object) -> None:
    with pytest.raises(JoseError, match="algorithm"):
        jose.parse(compact({"alg": alg, "kid": "k1"}, {"iss": "x"}))


def test_parse_refuses_a_missing_alg() -> None:
    with pytest.raises(JoseError, match="algorithm"):
        jose.parse(compact({"kid": "k1"}, {"iss": "x"}))


def test_parse_refuses_unsigned_tokens() -> None:
    with pytest.raises(JoseError):
        jose.parse(compact({"alg": "none"}, {"iss": "x"}, signature=""))
    with pytest.raises(JoseError):
        jose.parse(compact({"alg": "RS256"}, {"iss": "x"}, signature=""))


@pytest.mark.parametrize("crit", [["exp"], [], "b64"])
def test_parse_refuses_critical_extensions(crit: object) -> None:
    with pytest.raises(JoseError, match="critical"):
        jose.parse(compact({"alg": "RS256", "crit": crit, "exp": 1}, {"iss": "x"}))


@pytest.mark.parametrize("payload", [[1, 2], "text", 42, None, True])
def test_parse_refuses_a_payload_that_is_not_an_object(payload: object) -> None:
    with pytest.raises(JoseError, match="payload"):
        jose.parse(compact({"alg": "RS256"}, payload))


@pytest.mark.parametrize("header", [[1], "RS256", None])
def test_parse_refuses_a_header_that_is_not_an_object(header: object) -> None:
    with pytest.raises(JoseError, match="header"):
        jose.parse(compact(header, {"iss": "x"}))


@pytest.mark.parametrize(
    "token",
    [
        "",
        "a",
        "a.b",
        "a.b.c.d",
        ".e30.c2ln",
        "e30..c2ln",
        "!!!.e30.c2ln",  # header not base64url
        "eyJhbGciOiJSUzI1NiJ9.e30.%%%",  # signature not base64url
        "eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln",  # payload not JSON
        enc(b"\xff\xfe") + ".e30.c2ln",  # header not UTF-8
    ],
)
def test_parse_refuses_malformed_compact_forms(token: str) -> None:
    with pytest.raises(JoseError):
        jose.parse(token)


@pytest.mark.parametrize("value", [None, b"a.b.c", 3])
def test_parse_wants_a_string(value: object) -> None:
    with pytest.raises(JoseError):
        jose.parse(value)


@pytest.mark.parametrize("where", ["header", "payload"])
def test_deep_nesting_is_a_jose_error_not_a_recursion_error(where: str) -> None:
    depth = 100_000
    nested = b'{"a":' * depth + b"1" + b"}" * depth
    arrays = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
    for deep in (nested, arrays):
        head = enc(deep) if where == "header" else enc({"alg": "RS256"})
        body = enc(deep) if where == "payload" else enc({"iss": "x"})
        with pytest.raises(JoseError):
            jose.parse(f"{head}.{body}.c2ln")


# --- verify --------------------------------------------------------------------------------


def test_a_good_signature_verifies() -> None:
    jose.verify(jose.parse(signed()), key("a").public_key())


def test_another_key_does_not_verify() -> None:
    with pytest.raises(JoseError, match="does not verify"):
        jose.verify(jose.parse(signed()), key("b").public_key())


def test_a_tampered_payload_does_not_verify() -> None:
    head, _, sig = signed({"iss": "https://maa.example", "ok": False}).split(".")
    forged = jose.parse(f"{head}.{enc({'iss': 'https://maa.example', 'ok': True})}.{sig}")
    with pytest.raises(JoseError, match="does not verify"):
        jose.verify(forged, key("a").public_key())


def test_a_tampered_header_does_not_verify() -> None:
    _, body, sig = signed().split(".")
    forged = jose.parse(f"{enc({'alg': 'RS256', 'kid': 'other'})}.{body}.{sig}")
    with pytest.raises(JoseError, match="does not verify"):
        jose.verify(forged, key("a").public_key())


def test_a_signature_from_another_token_does_not_verify() -> None:
    one, other = signed({"iss": "one"}).split("."), signed({"iss": "other"}).split(".")
    spliced = jose.parse(".".join([one[0], one[1], other[2]]))
    with pytest.raises(JoseError):
        jose.verify(spliced, key("a").public_key())


def test_a_truncated_signature_does_not_verify() -> None:
    head, body, sig = signed().split(".")
    with pytest.raises(JoseError):
        jose.verify(jose.parse(f"{head}.{body}.{sig[:-8]}"), key("a").public_key())


# --- JWK keys ------------------------------------------------------------------------------


def test_rsa_public_key_from_a_jwk() -> None:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key("a").public_key()))
    public = jose.rsa_public_key(jwk)
    assert public.public_numbers() == key("a").public_key().public_numbers()
    numbers = key("a").public_key().public_numbers()
    assert jose.rsa_numbers(jwk) == (numbers.n, numbers.e)
    jose.verify(jose.parse(signed()), public)


@pytest.mark.parametrize(
    "jwk",
    [
        {},
        {"n": "", "e": "AQAB"},
        {"n": "AQAB"},
        {"n": 5, "e": "AQAB"},
        {"n": "not base64url!", "e": "AQAB"},
        {"n": "AQAB", "e": "AA"},
    ],
)
def test_a_jwk_without_a_usable_rsa_key_is_refused(jwk: dict[str, Any]) -> None:
    with pytest.raises(JoseError):
        jose.rsa_public_key(jwk)
    assert jose.rsa_numbers(jwk) is None
