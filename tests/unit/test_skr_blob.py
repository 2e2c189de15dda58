"""Secure Key Release pieces without services: the release JWS, the transfer blob, the KEK.

Key Vault's side is played here by a few lines that build what azure-protocols §3 describes
(a JWS signed by a certificate from the testbed PKI, a key_hsm blob wrapped to a software RSA
key standing in for the vTPM's ephemeral key).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from confinfer import skr
from confinfer.config import SKR_ALGORITHMS
from confinfer.errors import AttestationError, KeyReleaseError, KeyUnwrapError, UsageError
from confinfer.keyvault import KeyId, ReleasedKey, _retry_delay, trust_anchors, verify_release
from testbed.pki import Pair, Trust, issue, rsa_key

pytestmark = pytest.mark.unit

KID = "https://myvault.vault.azure.net/keys/model-kek/0123456789abcdef"
# CKM_RSA_AES_KEY_WRAP is RSA-OAEP with SHA-1 by definition.
HASHES = {"sha1": hashes.SHA1(), "sha256": hashes.SHA256(), "sha384": hashes.SHA384()}  # noqa: S303


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class SoftTransferKey:
    """Software stand-in for the vTPM's ephemeral key: RSA-OAEP decrypt with MGF1 = hash."""

    key: rsa.RSAPrivateKey = field(default_factory=lambda: rsa_key(2048))
    calls: list[str] = field(default_factory=list)

    def decrypt_oaep(self, ciphertext: bytes, hash_name: str) -> bytearray:
        self.calls.append(hash_name)
        h = HASHES[hash_name]
        return bytearray(
            self.key.decrypt(ciphertext, padding.OAEP(padding.MGF1(h), h, None))
        )


def key_hsm(
    kek_der: bytes, transfer: rsa.RSAPublicKey, algorithm: str, *, echo_enc: bool = True
) -> str:
    h = HASHES[skr.OAEP_HASHES[algorithm]]
    aes = os.urandom(32)
    ct = transfer.encrypt(aes, padding.OAEP(padding.MGF1(h), h, None))
    ct += aes_key_wrap_with_padding(aes, kek_der)
    header: dict[str, str] = {"kid": "transfer", "alg": "dir"}
    if echo_enc:
        header["enc"] = algorithm
    blob = {"schema_version": "1.0.0", "header": header, "ciphertext": b64url(ct)}
    return b64url(json.dumps(blob).encode())


def pkcs8(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def payload_for(
    kek: rsa.RSAPrivateKey, hsm: str, *, kid: str = KID, nonce: str | None = "n0nce",
    enc: str = "RSA_AES_KEY_WRAP_256",
) -> dict[str, Any]:
    numbers = kek.public_key().public_numbers()
    request: dict[str, Any] = {"api-version": "7.3", "enc": enc, "kid": kid}
    if nonce is not None:
        request["nonce"] = nonce
    return {
        "request": request,
        "response": {
            "key": {
                "key": {
                    "kid": kid,
                    "kty": "RSA-HSM",
                    "key_ops": ["wrapKey", "unwrapKey"],
                    "n": b64url(numbers.n.to_bytes(256, "big")),
                    "e": b64url(numbers.e.to_bytes(3, "big")),
                    "key_hsm": hsm,
                },
                "attributes": {"exportable": True},
            }
        },
    }


def sign_jws(
    payload: dict[str, Any], signer: Pair, chain: list[Pair] | None = None,
    header: dict[str, Any] | None = None,
) -> str:
    x5c = [base64.b64encode(p.cert_der).decode() for p in (chain or [signer])]
    head = header if header is not None else {"alg": "RS256", "x5c": x5c}
    signing_input = f"{b64url(json.dumps(head).encode())}.{b64url(json.dumps(payload).encode())}"
    assert isinstance(signer.key, rsa.RSAPrivateKey)
    sig = signer.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(sig)}"


@pytest.fixture(scope="module")
def trust() -> Trust:
    return Trust.create()


@pytest.fixture(scope="module")
def kek() -> rsa.RSAPrivateKey:
    return rsa_key(2048)


@pytest.fixture(scope="module")
def transfer() -> SoftTransferKey:
    return SoftTransferKey()


def released_for(
    kek: rsa.RSAPrivateKey, transfer: SoftTransferKey, algorithm: str, **kw: Any
) -> ReleasedKey:
    hsm = key_hsm(pkcs8(kek), transfer.key.public_key(), algorithm, **kw)
    return ReleasedKey(jws="unused", payload=payload_for(kek, hsm, enc=algorithm))


# --- RFC 5649 unwrap -----------------------------------------------------------------------


def test_kwp_known_answers_from_rfc5649() -> None:
    kek = bytes.fromhex("5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8")
    wrapped20 = bytes.fromhex("138bdeaa9b8fa7fc61f97742e72248ee5ae6ae5360d1ae6a5f54f373fa543b6a")
    wrapped7 = bytes.fromhex("afbeb0f07dfbf5419200f2ccb50bb24f")
    assert skr.aes_kwp_unwrap(kek, wrapped20) == bytes.fromhex(
        "c37b7e6492584340bed12207808941155068f738"
    )
    assert skr.aes_kwp_unwrap(kek, wrapped7) == bytes.fromhex("466f7250617369")


@settings(max_examples=60, deadline=None)
@given(
    key=st.binary(min_size=32, max_size=32) | st.binary(min_size=16, max_size=16),
    data=st.binary(min_size=1, max_size=300),
)
def test_kwp_matches_the_library(key: bytes, data: bytes) -> None:
    wrapped = aes_key_wrap_with_padding(key, data)
    assert skr.aes_kwp_unwrap(bytearray(key), wrapped) == aes_key_unwrap_with_padding(key, wrapped)


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=1, max_size=100), flip=st.integers(min_value=0))
def test_kwp_refuses_any_flipped_bit(data: bytes, flip: int) -> None:
    key = bytes(range(32))
    wrapped = bytearray(aes_key_wrap_with_padding(key, data))
    bit = flip % (len(wrapped) * 8)
    wrapped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(InvalidUnwrap):
        aes_key_unwrap_with_padding(key, bytes(wrapped))
    with pytest.raises(KeyReleaseError) as err:
        skr.aes_kwp_unwrap(key, bytes(wrapped))
    assert err.value.reason == "transfer-blob-invalid"


@pytest.mark.parametrize("length", [0, 8, 15, 17, 23])
def test_kwp_refuses_impossible_lengths(length: int) -> None:
    with pytest.raises(KeyReleaseError) as err:
        skr.aes_kwp_unwrap(bytes(32), bytes(length))
    assert err.value.reason == "transfer-blob-invalid"


# --- transfer blob -> KEK ------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", SKR_ALGORITHMS)
@pytest.mark.parametrize("echo_enc", [True, False])
def test_transfer_blob_unwraps_to_the_kek(
    kek: rsa.RSAPrivateKey, algorithm: str, echo_enc: bool
) -> None:
    transfer = SoftTransferKey()
    released = released_for(kek, transfer, algorithm, echo_enc=echo_enc)
    timings = skr.Timings()
    with skr.unwrap_transfer_blob(released, algorithm, transfer, timings=timings) as got:
        assert got.public_key().public_numbers() == kek.public_key().public_numbers()
        assert got.kid == KID
    assert transfer.calls == [skr.OAEP_HASHES[algorithm]]
    assert [name for name, _ in timings.steps] == ["tpm-decrypt", "unwrap"]


def test_blob_header_names_the_oaep_hash(kek: rsa.RSAPrivateKey, transfer: SoftTransferKey) -> None:
    # Asked for RSA_AES_KEY_WRAP_256, the (signed) blob says CKM_RSA_AES_KEY_WRAP: SHA-1 it is.
    transfer.calls.clear()
    released = released_for(kek, transfer, "CKM_RSA_AES_KEY_WRAP")
    skr.unwrap_transfer_blob(released, "RSA_AES_KEY_WRAP_256", transfer).close()
    assert transfer.calls == ["sha1"]


def test_every_algorithm_has_an_oaep_hash() -> None:
    assert set(skr.OAEP_HASHES) == set(SKR_ALGORITHMS)


def test_blob_wrapped_to_another_transfer_key_is_refused(
    kek: rsa.RSAPrivateKey, transfer: SoftTransferKey
) -> None:
    released = released_for(kek, SoftTransferKey(), "RSA_AES_KEY_WRAP_256")
    with pytest.raises(ValueError):  # the TPM (here: software) refuses the RSA part
        skr.unwrap_transfer_blob(released, "RSA_AES_KEY_WRAP_256", transfer)


@pytest.mark.parametrize(
    "hsm",
    [
        "not base64 !",
        b64url(b"[1, 2]"),
        b64url(json.dumps({"header": {}}).encode()),
        b64url(json.dumps({"ciphertext": "***"}).encode()),
        b64url(json.dumps({"ciphertext": b64url(bytes(200))}).encode()),
    ],
)
def test_malformed_key_hsm_is_refused(
    kek: rsa.RSAPrivateKey, transfer: SoftTransferKey, hsm: str
) -> None:
    released = ReleasedKey(jws="", payload=payload_for(kek, hsm))
    with pytest.raises(KeyReleaseError) as err:
        skr.unwrap_transfer_blob(released, "RSA_AES_KEY_WRAP_256", transfer)
    assert err.value.reason == "transfer-blob-invalid"


def test_corrupt_wrapped_part_is_refused_opaquely(
    kek: rsa.RSAPrivateKey, transfer: SoftTransferKey
) -> None:
    released = released_for(kek, transfer, "RSA_AES_KEY_WRAP_256")
    blob = json.loads(base64.urlsafe_b64decode(released.key_hsm + "=="))
    ct = bytearray(base64.urlsafe_b64decode(blob["ciphertext"] + "=="))
    ct[300] ^= 0x40
    blob["ciphertext"] = b64url(bytes(ct))
    payload = payload_for(kek, b64url(json.dumps(blob).encode()))
    with pytest.raises(KeyReleaseError) as err:
        skr.unwrap_transfer_blob(ReleasedKey("", payload), "RSA_AES_KEY_WRAP_256", transfer)
    assert err.value.reason == "transfer-blob-invalid"
    assert err.value.message == (
        "the released key's transfer blob is invalid: the AES key-wrap integrity check failed"
    )


def test_non_rsa_kek_is_refused(kek: rsa.RSAPrivateKey, transfer: SoftTransferKey) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    hsm = key_hsm(pkcs8(ec_key), transfer.key.public_key(), "RSA_AES_KEY_WRAP_256")
    payload = payload_for(kek, hsm)
    with pytest.raises(KeyReleaseError) as err:
        skr.unwrap_transfer_blob(ReleasedKey("", payload), "RSA_AES_KEY_WRAP_256", transfer)
    assert err.value.reason == "kek-not-rsa"
    payload["response"]["key"]["key"]["kty"] = "EC-HSM"
    with pytest.raises(KeyReleaseError) as err:
        skr.unwrap_transfer_blob(ReleasedKey("", payload), "RSA_AES_KEY_WRAP_256", transfer)
    assert err.value.reason == "kek-not-rsa"


def test_private_key_must_match_the_released_public_key(
    kek: rsa.RSAPrivateKey, transfer: SoftTransferKey
) -> None:
    other = rsa_key(2048)
    hsm = key_hsm(pkcs8(other), transfer.key.public_key(), "RSA_AES_KEY_WRAP_256")
    payload = payload_for(kek, hsm)  # public n of `kek`, private key of `other`
    with pytest.raises(KeyReleaseError) as err:
        skr.unwrap_transfer_blob(ReleasedKey("", payload), "RSA_AES_KEY_WRAP_256", transfer)
    assert err.value.reason == "release-key-mismatch"


def test_aes_key_and_der_are_zeroed(
    kek: rsa.RSAPrivateKey, transfer: SoftTransferKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bytearray] = []

    class Keeping(SoftTransferKey):
        def decrypt_oaep(self, ciphertext: bytes, hash_name: str) -> bytearray:
            out = super().decrypt_oaep(ciphertext, hash_name)
            seen.append(out)
            return out

    real_unwrap = skr.aes_kwp_unwrap

    def keeping_unwrap(key: bytearray | bytes, wrapped: bytes) -> bytearray:
        out = real_unwrap(key, wrapped)
        seen.append(out)
        return out

    monkeypatch.setattr(skr, "aes_kwp_unwrap", keeping_unwrap)
    keeper = Keeping(key=transfer.key)
    released = released_for(kek, keeper, "RSA_AES_KEY_WRAP_256")
    skr.unwrap_transfer_blob(released, "RSA_AES_KEY_WRAP_256", keeper).close()
    assert [len(b) for b in seen] == [32, len(pkcs8(kek))]
    assert all(not any(b) for b in seen)


# --- the KEK -------------------------------------------------------------------------------


def test_kek_unwraps_an_oaep256_wrapped_dek(kek: rsa.RSAPrivateKey) -> None:
    dek = os.urandom(32)
    wrapped = kek.public_key().encrypt(
        dek, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
    )
    handle = skr.KekPrivateKey(kek, KID)
    assert skr.unwrap_dek(handle, wrapped) == dek
    handle.close()
    with pytest.raises(KeyUnwrapError) as err:
        handle.unwrap_dek(wrapped)
    assert err.value.reason == "kek-closed"


def test_kek_refuses_a_dek_wrapped_for_another_key(kek: rsa.RSAPrivateKey) -> None:
    other = rsa_key(2048)
    wrapped = other.public_key().encrypt(
        os.urandom(32), padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
    )
    with pytest.raises(KeyUnwrapError) as err:
        skr.KekPrivateKey(kek, KID).unwrap_dek(wrapped)
    assert err.value.reason == "key-unwrap"


# --- token checks --------------------------------------------------------------------------


def test_transfer_key_size_comes_from_the_token() -> None:
    n = b64url(bytes([0x80]) + bytes(383))
    claims = {
        "x-ms-runtime": {
            "keys": [
                {"kid": "HCLAkPub", "kty": "RSA", "key_ops": ["sign"], "n": b64url(bytes(256))},
                {"kid": "TpmEphemeralEncryptionKey", "kty": "RSA", "key_ops": ["encrypt"],
                 "n": n},
            ]
        }
    }
    assert skr.transfer_key_bytes(claims) == 384
    assert skr.transfer_key_bytes({}) == 256


def test_expired_token_is_not_spent_on_a_release() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    skr.check_token_fresh({"exp": now.timestamp() + 60}, now)
    with pytest.raises(AttestationError) as err:
        skr.check_token_fresh({"exp": now.timestamp() - 1}, now)
    assert err.value.reason == "maa-token-expired"
    assert "2025-12-31T23:59:59+00:00" in err.value.message
    with pytest.raises(AttestationError) as err:
        skr.check_token_fresh({}, now)
    assert err.value.reason == "maa-token-invalid"


# --- key ids -------------------------------------------------------------------------------


def test_key_id_parsing_and_version_aware_matching() -> None:
    versioned = KeyId.parse(KID)
    assert (versioned.vault_url, versioned.name, versioned.version) == (
        "https://myvault.vault.azure.net", "model-kek", "0123456789abcdef"
    )
    assert str(versioned) == KID
    latest = KeyId.parse("https://MyVault.vault.azure.net/keys/model-kek/")
    assert latest.version is None
    assert latest.accepts(KID)
    assert not latest.accepts("https://myvault.vault.azure.net/keys/model-kek")
    assert versioned.accepts(KID)
    assert not versioned.accepts(KID.replace("0123", "9999"))
    assert not versioned.accepts("https://other.vault.azure.net/keys/model-kek/0123456789abcdef")
    assert KeyId.parse("https://127.0.0.1:8443/keys/k/v").vault_url == "https://127.0.0.1:8443"


@pytest.mark.parametrize(
    "kid",
    [
        "http://myvault.vault.azure.net/keys/k/v",
        "https://myvault.vault.azure.net/secrets/k/v",
        "https://myvault.vault.azure.net/keys",
        "https://myvault.vault.azure.net/keys/k/v/extra",
        "myvault/keys/k",
    ],
)
def test_bad_key_ids_are_usage_errors(kid: str) -> None:
    with pytest.raises(UsageError) as err:
        KeyId.parse(kid)
    assert err.value.reason == "key-id-invalid"


# --- the release JWS -----------------------------------------------------------------------


def good_jws(trust: Trust, kek: rsa.RSAPrivateKey, **kw: Any) -> str:
    return sign_jws(payload_for(kek, "aGVsbG8", **kw), trust.kv_signing)


def test_good_release_verifies(trust: Trust, kek: rsa.RSAPrivateKey) -> None:
    jws = good_jws(trust, kek)
    released = verify_release(
        jws, KeyId.parse(KID), roots=[trust.ca.cert], nonce="n0nce",
        algorithm="RSA_AES_KEY_WRAP_256",
    )
    assert released.kid == KID
    assert released.key_hsm == "aGVsbG8"
    # No version asked for: any version of that key is the key.
    verify_release(jws, KeyId.parse(KID.rsplit("/", 1)[0]), roots=[trust.ca.cert])


def test_chain_through_an_intermediate_verifies(trust: Trust, kek: rsa.RSAPrivateKey) -> None:
    intermediate = issue("KV intermediate", rsa_key(), trust.ca, ca=True)
    leaf = issue("KV signer", rsa_key(), intermediate)
    jws = sign_jws(payload_for(kek, "aGVsbG8"), leaf, chain=[leaf, intermediate])
    verify_release(jws, KeyId.parse(KID), roots=[trust.ca.cert], nonce="n0nce")


def reason_of(jws: str, trust: Trust, **kw: Any) -> str:
    with pytest.raises(KeyReleaseError) as err:
        verify_release(jws, KeyId.parse(KID), roots=[trust.ca.cert], **kw)
    return err.value.reason


def test_tampered_payload_is_refused(trust: Trust, kek: rsa.RSAPrivateKey) -> None:
    head, _, sig = good_jws(trust, kek).split(".")
    forged = payload_for(kek, b64url(b"attacker's blob"))
    jws = f"{head}.{b64url(json.dumps(forged).encode())}.{sig}"
    assert reason_of(jws, trust) == "release-signature-invalid"


def test_tampered_signature_is_refused(trust: Trust, kek: rsa.RSAPrivateKey) -> None:
    head, body, sig = good_jws(trust, kek).split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=="))
    raw[-1] ^= 1
    assert reason_of(f"{head}.{body}.{b64url(bytes(raw))}", trust) == "release-signature-invalid"


def test_unsigned_and_hmac_answers_are_refused(trust: Trust, kek: rsa.RSAPrivateKey) -> None:
    body = b64url(json.dumps(payload_for(kek, "aGVsbG8")).encode())
    for alg in ("none", "HS256", "RS512", None):
        head = b64url(json.dumps({"alg": alg}).encode())
        with pytest.raises(KeyReleaseError) as err:
            verify_release(f"{head}.{body}.c2ln", KeyId.parse(KID), roots=[trust.ca.cert])
        assert err.value.reason == "release-signature-invalid"
        assert f"JWS algorithm {alg!r} refused" in err.value.message
    unsigned = b64url(json.dumps({"alg": "none"}).encode())
    assert reason_of(f"{unsigned}.{body}.", trust) == "release-signature-invalid"


def test_signer_from_another_ca_is_refused(trust: Trust, kek: rsa.RSAPrivateKey) -> None:
    rogue = Trust.create()
    jws = sign_jws(payload_for(kek, "aGVsbG8"), rogue.kv_signing)
    with pytest.raises(KeyReleaseError) as err:
        verify_release(jws, KeyId.parse(KID), roots=[trust.ca.cert])
    assert err.value.reason == "release-signature-invalid"
    assert "does not lead to a trusted root" in err.value.message


def test_expired_signing_certificate_is_refused(trust: Trust, kek: rsa.RSAPrivateKey) -> None:
    old = issue("old KV signer", rsa_key(), trust.ca,
                not_before=dt.datetime(2020, 1, 1, tzinfo=dt.UTC), days=30)
    jws = sign_jws(payload_for(kek, "aGVsbG8"), old)
    assert reason_of(jws, trust) == "release-signature-invalid"


def test_x5c_leaf_must_be_the_signer(trust: Trust, kek: rsa.RSAPrivateKey) -> None:
    # Signed by a key the CA never certified, presented with the genuine signer's certificate.
    impostor = Pair(rsa_key(), trust.kv_signing.cert)
    jws = sign_jws(payload_for(kek, "aGVsbG8"), impostor)
    assert reason_of(jws, trust) == "release-signature-invalid"
    no_chain = sign_jws(payload_for(kek, "aGVsbG8"), trust.kv_signing, header={"alg": "RS256"})
    assert reason_of(no_chain, trust) == "release-signature-invalid"


@pytest.mark.parametrize("jws", ["", "a.b", "a.b.c.d", "!!.@@.##"])
def test_malformed_jws_is_refused(trust: Trust, jws: str) -> None:
    assert reason_of(jws, trust) == "release-signature-invalid"


def test_other_key_released_is_refused(trust: Trust, kek: rsa.RSAPrivateKey) -> None:
    jws = good_jws(trust, kek, kid=KID.replace("model-kek", "other-kek"))
    assert reason_of(jws, trust) == "release-key-mismatch"
    jws = good_jws(trust, kek, kid=KID.replace("0123", "ffff"))
    assert reason_of(jws, trust) == "release-key-mismatch"


def test_nonce_must_be_echoed(trust: Trust, kek: rsa.RSAPrivateKey) -> None:
    assert reason_of(good_jws(trust, kek, nonce=None), trust, nonce="n0nce") == (
        "release-nonce-mismatch"
    )
    assert reason_of(good_jws(trust, kek, nonce="old"), trust, nonce="n0nce") == (
        "release-nonce-mismatch"
    )
    # Without a nonce sent, none is required.
    verify_release(good_jws(trust, kek, nonce=None), KeyId.parse(KID), roots=[trust.ca.cert])


def test_answer_without_key_hsm_is_refused(trust: Trust, kek: rsa.RSAPrivateKey) -> None:
    payload = payload_for(kek, "aGVsbG8")
    del payload["response"]["key"]["key"]["key_hsm"]
    assert reason_of(sign_jws(payload, trust.kv_signing), trust) == "release-answer-invalid"


def test_trust_anchors_from_bundle_and_system(trust: Trust, tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(trust.ca.cert_pem + trust.vtpm_ca.cert_pem)
    assert [c.subject for c in trust_anchors(bundle)] == [
        trust.ca.cert.subject, trust.vtpm_ca.cert.subject
    ]
    empty = tmp_path / "empty.pem"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(KeyReleaseError) as err:
        trust_anchors(empty)
    assert err.value.reason == "trust-anchor-invalid"


def test_retry_delays_are_bounded() -> None:
    assert [_retry_delay(i, None) for i in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert _retry_delay(0, "3") == 3.0
    assert _retry_delay(0, "31") is None  # beyond the cap: give up rather than hang
    assert _retry_delay(1, "soon") == 1.0
