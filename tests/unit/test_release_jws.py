"""The Secure Key Release answer: a JWS verified as Key Vault signs it, or refused with a reason.

The JWSs here are shaped like a real release (shared/reference/azure-protocols.md §7.1, §7.2):
RS256, signed by the vault's TLS service certificate (SAN ``*.vault.azure.net``, EKU serverAuth
and clientAuth) issued by a "TLS issuing CA" under a root; header ``alg, kid (uppercase SHA-1
hex), x5t, typ, x5t#S256, x5c [leaf, intermediate, root]``; payload ``request`` (the echo: api
version, enc, kid as requested, nonce) and ``response.key`` (the versioned key, its attributes
and release policy).
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from confinfer.errors import KeyReleaseError, Reason
from confinfer.keyvault import KeyId, ReleasedKey, verify_release
from testbed.pki import Pair, Trust, issue, rsa_key, tls_server

pytestmark = pytest.mark.unit

HOST = "myvault.vault.azure.net"
VERSIONLESS = f"https://{HOST}/keys/model-kek"
VERSION = "0123456789abcdef0123456789abcdef"
KID = f"{VERSIONLESS}/{VERSION}"
ALG = "RSA_AES_KEY_WRAP_256"
NONCE = "bm9uY2Utb2YtdGhpcy1yZXF1ZXN0"
HSM = "eyJjaXBoZXJ0ZXh0IjogIkFBQUEifQ"  # opaque here: the blob is test_release.py's business
# Key Vault's shared TLS certificate (§7.1) covers the service name and every vault under it.
VAULT_SANS = ("vault.azure.net", "*.vault.azure.net", "*.vaultcore.azure.net")
SIGNATURE_INVALID = Reason.RELEASE_SIGNATURE_INVALID


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def der(pair: Pair | x509.Certificate) -> bytes:
    cert = pair.cert if isinstance(pair, Pair) else pair
    return cert.public_bytes(serialization.Encoding.DER)


def header_for(chain: Sequence[Pair | x509.Certificate]) -> dict[str, Any]:
    """The release JWS header exactly as Key Vault sends it (§7.1)."""
    leaf = der(chain[0])
    return {
        "alg": "RS256",
        "kid": hashlib.sha1(leaf).hexdigest().upper(),  # noqa: S324
        "x5t": b64url(hashlib.sha1(leaf).digest()),  # noqa: S324
        "typ": "JWT",
        "x5t#S256": b64url(hashlib.sha256(leaf).digest()),
        "x5c": [base64.b64encode(der(c)).decode("ascii") for c in chain],
    }


def payload_for(
    *,
    kid: str | None = VERSIONLESS,
    released_kid: str = KID,
    enc: str | None = ALG,
    nonce: str | None = NONCE,
) -> dict[str, Any]:
    """The release JWS payload (§7.2): the request echo and the released key."""
    request: dict[str, Any] = {"api-version": "7.4"}
    if enc is not None:
        request["enc"] = enc
    if kid is not None:
        request["kid"] = kid
    if nonce is not None:
        request["nonce"] = nonce
    numbers = _KEK.public_key().public_numbers()
    return {
        "request": request,
        "response": {
            "key": {
                "key": {
                    "kid": released_kid,
                    "kty": "RSA",
                    "key_ops": ["wrapKey", "unwrapKey", "encrypt", "decrypt", "sign", "verify"],
                    "n": b64url(numbers.n.to_bytes(256, "big")),
                    "e": "AQAB",
                    "key_hsm": HSM,
                },
                "attributes": {
                    "enabled": True,
                    "created": 1722600000,
                    "updated": 1722600000,
                    "recoveryLevel": "CustomizedRecoverable+Purgeable",
                    "recoverableDays": 7,
                    "exportable": True,
                    "hsmPlatform": "2",
                },
                "release_policy": {"data": b64url(b'{"version":"1.0.0"}'), "immutable": False},
            }
        },
    }


def compact(header: dict[str, Any], payload: dict[str, Any], key: rsa.RSAPrivateKey) -> str:
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    signature = key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


def sign(
    payload: dict[str, Any],
    chain: Sequence[Pair | x509.Certificate],
    *,
    key: rsa.RSAPrivateKey | None = None,
    header: dict[str, Any] | None = None,
) -> str:
    """``payload`` signed by ``key`` (default: the chain leaf's) with the header for ``chain``."""
    if key is None:
        first = chain[0]
        assert isinstance(first, Pair) and isinstance(first.key, rsa.RSAPrivateKey)
        key = first.key
    return compact(header if header is not None else header_for(chain), payload, key)


_KEK = rsa_key(2048)


@dataclass(frozen=True)
class Pki:
    """The testbed's TLS root and issuing CA, and Key Vault's TLS certificate under them."""

    trust: Trust
    leaf: Pair

    @property
    def root(self) -> Pair:
        return self.trust.ca

    @property
    def intermediate(self) -> Pair:
        return self.trust.tls_issuing

    @property
    def chain(self) -> tuple[Pair, Pair, Pair]:
        return (self.leaf, self.intermediate, self.root)

    @property
    def roots(self) -> list[x509.Certificate]:
        return [self.root.cert]

    def server(self, *, dns: tuple[str, ...] = (), ips: tuple[str, ...] = ()) -> Pair:
        """Another TLS certificate from the same issuing CA (so the same roots)."""
        return tls_server("another service", self.intermediate, dns=dns, ips=ips)


@pytest.fixture(scope="module")
def pki() -> Pki:
    trust = Trust.create()
    return Pki(trust, tls_server("vault.azure.net", trust.tls_issuing, dns=VAULT_SANS, ips=()))


def verify(
    jws: str,
    pki: Pki,
    *,
    key_id: str = VERSIONLESS,
    roots: list[x509.Certificate] | None = None,
    algorithm: str = ALG,
    nonce: str | None = NONCE,
    now: dt.datetime | None = None,
) -> ReleasedKey:
    return verify_release(
        jws,
        KeyId.parse(key_id),
        roots=pki.roots if roots is None else roots,
        algorithm=algorithm,
        nonce=nonce,
        now=now,
    )


def refusal(jws: str, pki: Pki, **kw: Any) -> KeyReleaseError:
    with pytest.raises(KeyReleaseError) as err:
        verify(jws, pki, **kw)
    return err.value


def reason_of(jws: str, pki: Pki, **kw: Any) -> str:
    return str(refusal(jws, pki, **kw).reason)


# --- what verifies ----------------------------------------------------------------------------


def test_the_test_pki_is_shaped_like_key_vaults(pki: Pki) -> None:
    leaf = pki.leaf.cert
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "*.vault.azure.net" in san.get_values_for_type(x509.DNSName)
    assert leaf.issuer == pki.intermediate.cert.subject
    assert pki.intermediate.cert.issuer == pki.root.cert.subject == pki.root.cert.issuer
    header = header_for(pki.chain)
    assert list(header) == ["alg", "kid", "x5t", "typ", "x5t#S256", "x5c"]
    assert len(header["kid"]) == 40 and header["kid"] == header["kid"].upper()
    assert len(header["x5c"]) == 3


def test_a_release_like_key_vaults_verifies(pki: Pki) -> None:
    jws = sign(payload_for(), pki.chain)
    released = verify(jws, pki)
    assert released.kid == KID
    assert released.key_hsm == HSM
    assert released.jws == jws
    assert released.key["kty"] == "RSA"
    assert released.payload["request"]["kid"] == VERSIONLESS


def test_a_versioned_request_verifies(pki: Pki) -> None:
    jws = sign(payload_for(kid=KID), pki.chain)
    assert verify(jws, pki, key_id=KID).kid == KID


@pytest.mark.parametrize("algorithm", ["CKM_RSA_AES_KEY_WRAP", "RSA_AES_KEY_WRAP_384"])
def test_each_wrapping_verifies_when_echoed(pki: Pki, algorithm: str) -> None:
    jws = sign(payload_for(enc=algorithm), pki.chain)
    assert verify(jws, pki, algorithm=algorithm).kid == KID


def test_x5c_without_the_root_verifies(pki: Pki) -> None:
    jws = sign(payload_for(), [pki.leaf, pki.intermediate])
    assert verify(jws, pki).kid == KID


def test_the_request_kid_is_compared_as_a_key_id(pki: Pki) -> None:
    # Key Vault echoes the URL as requested; host case and a trailing slash do not matter.
    for kid in (VERSIONLESS.replace("myvault", "MyVault"), VERSIONLESS + "/"):
        assert verify(sign(payload_for(kid=kid), pki.chain), pki).kid == KID


def test_nonce_is_optional_when_none_was_sent(pki: Pki) -> None:
    assert verify(sign(payload_for(nonce=None), pki.chain), pki, nonce=None).kid == KID
    assert verify(sign(payload_for(nonce="other"), pki.chain), pki, nonce=None).kid == KID


@pytest.mark.parametrize(
    ("host", "sans"),
    [
        ("127.0.0.1", {"ips": ("127.0.0.1",)}),
        ("[::1]", {"ips": ("::1",)}),
        ("localhost", {"dns": ("localhost",)}),
        (
            "h-1.managedhsm.azure.net",
            {"dns": ("*.h-1.managedhsm.azure.net", "h-1.managedhsm.azure.net")},
        ),
    ],
)
def test_the_leaf_san_may_name_the_host_or_its_ip(
    pki: Pki, host: str, sans: dict[str, tuple[str, ...]]
) -> None:
    leaf = pki.server(**sans)
    base = f"https://{host}:8443/keys/k"
    jws = sign(payload_for(kid=base, released_kid=f"{base}/v1"), [leaf, pki.intermediate])
    assert verify(jws, pki, key_id=base).kid == f"{base}/v1"


def test_testbed_key_vault_certificate_verifies_for_loopback(pki: Pki) -> None:
    base = "https://127.0.0.1:8443/keys/k"
    chain = pki.trust.chain("kv_tls")
    jws = sign(payload_for(kid=base, released_kid=f"{base}/v1"), chain)
    assert verify(jws, pki, key_id=base).kid == f"{base}/v1"


# --- the signature and the signer -------------------------------------------------------------


def test_tampered_payload_is_refused(pki: Pki) -> None:
    head, _, sig = sign(payload_for(), pki.chain).split(".")
    forged = payload_for()
    forged["response"]["key"]["key"]["key_hsm"] = b64url(b"attacker's blob")
    jws = f"{head}.{b64url(json.dumps(forged).encode())}.{sig}"
    assert reason_of(jws, pki) == SIGNATURE_INVALID


def test_tampered_signature_is_refused(pki: Pki) -> None:
    head, body, sig = sign(payload_for(), pki.chain).split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=="))
    raw[-1] ^= 1
    assert reason_of(f"{head}.{body}.{b64url(bytes(raw))}", pki) == SIGNATURE_INVALID


@pytest.mark.parametrize("alg", ["none", "HS256", "RS512", "PS256", "ES256", None])
def test_only_rs256_is_accepted(pki: Pki, alg: str | None) -> None:
    header = header_for(pki.chain) | {"alg": alg}
    err = refusal(sign(payload_for(), pki.chain, header=header), pki)
    assert err.reason == SIGNATURE_INVALID
    assert f"algorithm {alg!r} refused" in err.message


def test_unsigned_answer_is_refused(pki: Pki) -> None:
    head, body, _ = sign(payload_for(), pki.chain, header=header_for(pki.chain)).split(".")
    assert reason_of(f"{head}.{body}.", pki) == SIGNATURE_INVALID
    none = b64url(json.dumps(header_for(pki.chain) | {"alg": "none"}).encode())
    assert reason_of(f"{none}.{body}.", pki) == SIGNATURE_INVALID


def test_critical_header_extensions_are_refused(pki: Pki) -> None:
    header = header_for(pki.chain) | {"crit": ["exp"], "exp": 1}
    assert reason_of(sign(payload_for(), pki.chain, header=header), pki) == SIGNATURE_INVALID


@pytest.mark.parametrize(
    "jws", ["", "a.b", "a.b.c.d", "!!.@@.##", "e30.e30.", ".e30.c2ln", "W10.e30.c2ln"]
)
def test_malformed_jws_is_refused(pki: Pki, jws: str) -> None:
    assert reason_of(jws, pki) == SIGNATURE_INVALID


@pytest.mark.parametrize(
    "x5c",
    [
        None,
        [],
        "MIIB",
        [7],
        ["not base64!"],
        [b64url(b"\xff" * 40)],
        [base64.b64encode(b"not a certificate").decode()],
    ],
    ids=["missing", "empty", "string", "number", "not-b64", "b64url", "not-der"],
)
def test_x5c_that_does_not_decode_is_refused(pki: Pki, x5c: Any) -> None:
    header = header_for(pki.chain)
    if x5c is None:
        del header["x5c"]
    else:
        header["x5c"] = x5c
    assert reason_of(sign(payload_for(), pki.chain, header=header), pki) == SIGNATURE_INVALID


@pytest.mark.parametrize("change", ["missing", "intermediate", "sha1", "padded", "number"])
def test_x5t_s256_must_be_the_leafs_thumbprint(pki: Pki, change: str) -> None:
    header = header_for(pki.chain)
    if change == "missing":
        del header["x5t#S256"]
    elif change == "intermediate":
        header["x5t#S256"] = header_for([pki.intermediate])["x5t#S256"]
    elif change == "sha1":
        header["x5t#S256"] = header["x5t"]
    elif change == "padded":
        header["x5t#S256"] += "="
    else:
        header["x5t#S256"] = 0
    err = refusal(sign(payload_for(), pki.chain, header=header), pki)
    assert err.reason == SIGNATURE_INVALID
    assert "x5t#S256" in err.message


def test_x5c_leaf_must_be_the_signer(pki: Pki) -> None:
    # Signed by a key the CA never certified, presented with the genuine chain.
    jws = sign(payload_for(), pki.chain, key=rsa_key())
    err = refusal(jws, pki)
    assert err.reason == SIGNATURE_INVALID
    assert "signature" in err.message
    # Signed by the intermediate's key: still not the x5c leaf.
    intermediate_key = pki.intermediate.key
    assert isinstance(intermediate_key, rsa.RSAPrivateKey)
    assert reason_of(sign(payload_for(), pki.chain, key=intermediate_key), pki) == (
        SIGNATURE_INVALID
    )


def test_signer_for_another_host_is_refused(pki: Pki) -> None:
    # Valid certificates from the very same chain, for hosts other than the vault asked.
    for leaf in (
        pki.trust.kv_tls_foreign,  # evil.example
        pki.trust.kv_tls,  # 127.0.0.1, ::1, localhost
        pki.server(dns=("othervault.vault.azure.net",)),
        pki.server(dns=("*.vault.azure.net.evil.example", "myvault.vault.azure.net.evil")),
        pki.server(dns=("*.azure.net",)),  # a wildcard covers one label only
    ):
        err = refusal(sign(payload_for(), [leaf, pki.intermediate, pki.root]), pki)
        assert err.reason == SIGNATURE_INVALID
        assert HOST in err.message


def test_signer_for_an_ip_is_not_valid_for_a_name_and_back(pki: Pki) -> None:
    by_ip = pki.server(ips=("127.0.0.1",))
    base = "https://localhost:8443/keys/k"
    jws = sign(payload_for(kid=base, released_kid=f"{base}/v"), [by_ip, pki.intermediate])
    assert reason_of(jws, pki, key_id=base) == SIGNATURE_INVALID
    by_name = pki.server(dns=("127.0.0.1", "localhost"))
    base = "https://127.0.0.1:8443/keys/k"
    jws = sign(payload_for(kid=base, released_kid=f"{base}/v"), [by_name, pki.intermediate])
    assert reason_of(jws, pki, key_id=base) == SIGNATURE_INVALID


@pytest.mark.parametrize(
    "usages",
    [(), (ExtendedKeyUsageOID.CLIENT_AUTH,), (ExtendedKeyUsageOID.CODE_SIGNING,)],
    ids=["no-eku", "client-auth-only", "code-signing"],
)
def test_signer_without_server_auth_is_refused(
    pki: Pki, usages: tuple[x509.ObjectIdentifier, ...]
) -> None:
    leaf = issue(
        "vault.azure.net", rsa_key(), pki.intermediate, dns=VAULT_SANS, extended_key_usage=usages
    )
    err = refusal(sign(payload_for(), [leaf, pki.intermediate, pki.root]), pki)
    assert err.reason == SIGNATURE_INVALID
    assert "TLS server certificate" in err.message


def test_signer_without_a_san_is_refused(pki: Pki) -> None:
    leaf = issue(
        HOST, rsa_key(), pki.intermediate, extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH,)
    )
    assert reason_of(sign(payload_for(), [leaf, pki.intermediate]), pki) == SIGNATURE_INVALID


def test_signer_from_another_ca_is_refused(pki: Pki) -> None:
    rogue = Trust.create()
    leaf = tls_server("vault.azure.net", rogue.tls_issuing, dns=VAULT_SANS, ips=())
    # The rogue root rides along in x5c: being there does not make it trusted.
    chain = [leaf, rogue.tls_issuing, rogue.ca]
    err = refusal(sign(payload_for(), chain), pki)
    assert err.reason == SIGNATURE_INVALID
    assert "under the trusted roots" in err.message
    assert reason_of(sign(payload_for(), chain[:2]), pki) == SIGNATURE_INVALID
    # With that root configured, the same answer verifies: the roots decide, nothing else.
    assert verify(sign(payload_for(), chain), pki, roots=[rogue.ca.cert]).kid == KID


def test_a_root_in_x5c_is_not_trusted_for_being_there(pki: Pki) -> None:
    # A rogue root that copies the trusted root's name, signing an intermediate of the same name.
    rogue_root = issue("testbed TLS root CA", rsa_key(), ca=True, days=3650)
    rogue_issuing = issue(
        "testbed RSA TLS Issuing CA 01", rsa_key(), rogue_root, ca=True, path_length=0, days=1825
    )
    leaf = tls_server("vault.azure.net", rogue_issuing, dns=VAULT_SANS, ips=())
    assert rogue_root.cert.subject == pki.root.cert.subject
    jws = sign(payload_for(), [leaf, rogue_issuing, rogue_root])
    assert reason_of(jws, pki) == SIGNATURE_INVALID


def test_a_self_signed_signer_that_is_not_a_root_is_refused(pki: Pki) -> None:
    key = rsa_key()
    self_signed = issue(
        "vault.azure.net",
        key,
        dns=VAULT_SANS,
        extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
    )
    assert self_signed.cert.issuer == self_signed.cert.subject
    err = refusal(sign(payload_for(), [self_signed]), pki)
    assert err.reason == SIGNATURE_INVALID
    assert "under the trusted roots" in err.message


def test_the_intermediate_must_be_in_x5c(pki: Pki) -> None:
    assert reason_of(sign(payload_for(), [pki.leaf]), pki) == SIGNATURE_INVALID
    assert reason_of(sign(payload_for(), [pki.leaf, pki.root]), pki) == SIGNATURE_INVALID


def test_the_leaf_must_come_first(pki: Pki) -> None:
    # Signed by the leaf, but x5c[0] is the intermediate: x5t#S256 and the signature are
    # checked against x5c[0], which neither fits.
    chain = [pki.intermediate, pki.leaf, pki.root]
    header = header_for([pki.leaf, pki.intermediate, pki.root])
    header["x5c"] = header_for(chain)["x5c"]
    assert reason_of(sign(payload_for(), pki.chain, header=header), pki) == SIGNATURE_INVALID
    assert reason_of(sign(payload_for(), chain, key=_rsa(pki.leaf)), pki) == SIGNATURE_INVALID


def _rsa(pair: Pair) -> rsa.RSAPrivateKey:
    assert isinstance(pair.key, rsa.RSAPrivateKey)
    return pair.key


def test_a_ca_certificate_cannot_sign_a_release(pki: Pki) -> None:
    # A CA certificate under the roots, with serverAuth and the vault's SAN, is still no TLS
    # server certificate (§7.1: the signer is CA:FALSE).
    ca = issue(
        "vault.azure.net",
        rsa_key(),
        pki.root,
        ca=True,
        path_length=0,
        dns=VAULT_SANS,
        extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH,),
    )
    assert reason_of(sign(payload_for(), [ca, pki.root]), pki) == SIGNATURE_INVALID


def test_signing_certificate_must_be_valid_now(pki: Pki) -> None:
    old = issue(
        "vault.azure.net",
        rsa_key(),
        pki.intermediate,
        dns=VAULT_SANS,
        not_before=dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
        days=30,
        extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH,),
    )
    assert reason_of(sign(payload_for(), [old, pki.intermediate]), pki) == SIGNATURE_INVALID
    jws = sign(payload_for(), pki.chain)
    leaf = pki.leaf.cert
    assert verify(jws, pki, now=leaf.not_valid_before_utc + dt.timedelta(minutes=1)).kid == KID
    for now in (
        leaf.not_valid_before_utc - dt.timedelta(minutes=1),
        leaf.not_valid_after_utc + dt.timedelta(minutes=1),
    ):
        assert reason_of(jws, pki, now=now) == SIGNATURE_INVALID


def test_no_roots_trust_nothing(pki: Pki) -> None:
    jws = sign(payload_for(), pki.chain)
    assert reason_of(jws, pki, roots=[pki.trust.vtpm_ca.cert]) == SIGNATURE_INVALID


def test_the_signature_is_checked_before_the_payload(pki: Pki) -> None:
    # Everything wrong with the payload too: the signer is what is reported.
    wrong = payload_for(kid=VERSIONLESS.replace("model-kek", "x"), enc="x", nonce="x")
    jws = sign(wrong, [pki.trust.kv_tls_foreign, pki.intermediate, pki.root])
    assert reason_of(jws, pki) == SIGNATURE_INVALID


# --- the request echo -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key_id", "echoed"),
    [
        (VERSIONLESS, VERSIONLESS.replace("model-kek", "other-kek")),  # another key
        (VERSIONLESS, VERSIONLESS.replace("myvault", "othervault")),  # another host
        (VERSIONLESS, f"https://{HOST}:8443/keys/model-kek"),  # another port
        (KID, KID.replace("0123", "ffff")),  # another version
        (KID, VERSIONLESS),  # no version where one was asked
        (VERSIONLESS, KID),  # a version where none was asked
        (VERSIONLESS, None),  # no kid
        (VERSIONLESS, "model-kek"),  # not a key id
        (VERSIONLESS, VERSIONLESS.replace("/keys/", "/secrets/")),
    ],
)
def test_request_kid_must_be_the_key_asked(pki: Pki, key_id: str, echoed: str | None) -> None:
    # The leaf covers *.vault.azure.net, so the signature verifies for every host here.
    jws = sign(payload_for(kid=echoed, released_kid=KID), pki.chain)
    err = refusal(jws, pki, key_id=key_id)
    assert err.reason == Reason.RELEASE_KEY_MISMATCH
    assert key_id in err.message


@pytest.mark.parametrize("request_value", [None, "kid", ["kid"], {}])
def test_missing_request_echo_is_refused(pki: Pki, request_value: Any) -> None:
    payload = payload_for()
    if request_value is None:
        del payload["request"]
    else:
        payload["request"] = request_value
    assert reason_of(sign(payload, pki.chain), pki) == Reason.RELEASE_KEY_MISMATCH


@pytest.mark.parametrize(
    ("asked", "echoed"),
    [
        (ALG, None),
        (ALG, "CKM_RSA_AES_KEY_WRAP"),  # the service default when enc is not sent
        (ALG, "RSA_AES_KEY_WRAP_384"),
        (ALG, "rsa_aes_key_wrap_256"),
        ("CKM_RSA_AES_KEY_WRAP", ALG),
    ],
)
def test_request_enc_must_be_the_wrapping_asked(pki: Pki, asked: str, echoed: str | None) -> None:
    err = refusal(sign(payload_for(enc=echoed), pki.chain), pki, algorithm=asked)
    assert err.reason == Reason.RELEASE_ANSWER_INVALID
    assert asked in err.message


@pytest.mark.parametrize("echoed", [None, "old-nonce", NONCE + "x", ""])
def test_nonce_must_be_echoed(pki: Pki, echoed: str | None) -> None:
    jws = sign(payload_for(nonce=echoed), pki.chain)
    assert reason_of(jws, pki) == Reason.RELEASE_NONCE_MISMATCH


def test_the_kid_is_checked_before_enc_and_nonce(pki: Pki) -> None:
    wrong = payload_for(kid=VERSIONLESS.replace("model-kek", "x"), enc=None, nonce=None)
    assert reason_of(sign(wrong, pki.chain), pki) == Reason.RELEASE_KEY_MISMATCH
    assert reason_of(sign(payload_for(enc=None, nonce=None), pki.chain), pki) == (
        Reason.RELEASE_ANSWER_INVALID
    )


# --- the released key -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key_id", "released_kid"),
    [
        (VERSIONLESS, VERSIONLESS),  # a release is always of a version
        (VERSIONLESS, KID.replace("model-kek", "other-kek")),
        (VERSIONLESS, KID.replace("myvault", "othervault")),
        (KID, KID.replace("0123", "ffff")),
        (VERSIONLESS, "not a key id"),
        (VERSIONLESS, KID.replace("https://", "http://")),
    ],
)
def test_released_kid_must_be_a_version_of_the_key_asked(
    pki: Pki, key_id: str, released_kid: str
) -> None:
    jws = sign(payload_for(kid=key_id, released_kid=released_kid), pki.chain)
    assert reason_of(jws, pki, key_id=key_id) == Reason.RELEASE_KEY_MISMATCH


@pytest.mark.parametrize(
    "change",
    [
        "no-response",
        "no-key",
        "no-inner-key",
        "no-kid",
        "no-key-hsm",
        "kid-not-str",
        "key-hsm-not-str",
        "response-list",
    ],
)
def test_answer_without_a_released_key_is_refused(pki: Pki, change: str) -> None:
    payload = payload_for()
    response = payload["response"]
    key = response["key"]["key"]
    if change == "no-response":
        del payload["response"]
    elif change == "no-key":
        del response["key"]
    elif change == "no-inner-key":
        del response["key"]["key"]
    elif change == "no-kid":
        del key["kid"]
    elif change == "no-key-hsm":
        del key["key_hsm"]
    elif change == "kid-not-str":
        key["kid"] = ["https://x"]
    elif change == "key-hsm-not-str":
        key["key_hsm"] = {"ciphertext": "AAAA"}
    else:
        payload["response"] = [copy.deepcopy(response)]
    assert reason_of(sign(payload, pki.chain), pki) == Reason.RELEASE_ANSWER_INVALID
