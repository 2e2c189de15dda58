"""Secure Key Release without services: the transfer blob, the KEK, the token and key-id checks.

Key Vault's side is played by a few lines that build the ``key_hsm`` blob as
shared/reference/azure-protocols.md §3 and §7.2 describe (RSA-OAEP to a software RSA key
standing in for the vTPM's ephemeral key, then RFC 5649 AES-KWP of the KEK's PKCS#8 DER).
The release JWS itself is tested in test_release_jws.py.
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
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

from confinfer import config, log, release
from confinfer.errors import AttestationError, KeyReleaseError, KeyUnwrapError, UsageError
from confinfer.keyvault import SKR_ALGORITHMS, KeyId, ReleasedKey, trust_anchors
from confinfer.release import KekPrivateKey, unwrap_transfer_blob
from loader.keywrap import checked_dek, unwrap_dek
from testbed.pki import issue, rsa_key

pytestmark = pytest.mark.unit

KID = "https://myvault.vault.azure.net/keys/model-kek/0123456789abcdef"
ALG = "RSA_AES_KEY_WRAP_256"
# CKM_RSA_AES_KEY_WRAP is RSA-OAEP with SHA-1 by definition.
HASHES = {"sha1": hashes.SHA1(), "sha256": hashes.SHA256(), "sha384": hashes.SHA384()}  # noqa: S303
OAEP256 = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class SoftTransferKey:
    """Software stand-in for the vTPM's ephemeral key: RSA-OAEP decrypt with MGF1 = hash."""

    key: rsa.RSAPrivateKey = field(default_factory=lambda: rsa_key(2048))
    calls: list[str] = field(default_factory=list)
    returned: list[bytearray] = field(default_factory=list)

    def decrypt_oaep(self, ciphertext: bytes, hash_name: str) -> bytearray:
        self.calls.append(hash_name)
        h = HASHES[hash_name]
        out = bytearray(self.key.decrypt(ciphertext, padding.OAEP(padding.MGF1(h), h, None)))
        self.returned.append(out)
        return out


def wrap_material(material: bytes, transfer: rsa.RSAPublicKey, algorithm: str) -> bytes:
    """``RSA-OAEP(transfer, K_aes) || AES-KWP(K_aes, material)``."""
    h = HASHES[SKR_ALGORITHMS[algorithm]]
    aes = os.urandom(32)
    return transfer.encrypt(aes, padding.OAEP(padding.MGF1(h), h, None)) + (
        aes_key_wrap_with_padding(aes, material)
    )


def blob(ciphertext: bytes, enc: str | None) -> str:
    """``key_hsm`` as Key Vault sends it (§7.2: schema 1.0, header kid/alg/enc, ciphertext)."""
    header: dict[str, str] = {"kid": "TpmEphemeralEncryptionKey", "alg": "dir"}
    if enc is not None:
        header["enc"] = enc
    doc = {"schema_version": "1.0", "header": header, "ciphertext": b64url(ciphertext)}
    return b64url(json.dumps(doc).encode())


def key_hsm(
    kek_der: bytes, transfer: rsa.RSAPublicKey, algorithm: str, *, enc: str | None = ""
) -> str:
    """The blob for ``kek_der`` wrapped with ``algorithm``; its header names ``enc`` (default:
    ``algorithm``; None: no enc)."""
    return blob(wrap_material(kek_der, transfer, algorithm), algorithm if enc == "" else enc)


def pkcs8(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def released(kek: rsa.RSAPrivateKey, hsm: str, *, kty: str | None = "RSA") -> ReleasedKey:
    """A release answer's payload (§7.2), as verify_release would hand it over."""
    numbers = kek.public_key().public_numbers()
    payload = {
        "request": {"api-version": "7.4", "enc": ALG, "kid": KID.rsplit("/", 1)[0]},
        "response": {
            "key": {
                "key": {
                    "kid": KID,
                    "kty": kty,
                    "key_ops": ["wrapKey", "unwrapKey", "encrypt", "decrypt"],
                    "n": b64url(numbers.n.to_bytes(256, "big")),
                    "e": b64url(numbers.e.to_bytes(3, "big")),
                    "key_hsm": hsm,
                },
                "attributes": {"enabled": True, "exportable": True},
            }
        },
    }
    return ReleasedKey(jws="unused", payload=payload)


def reason(exc: pytest.ExceptionInfo[KeyReleaseError]) -> str:
    return str(exc.value.reason)


@pytest.fixture(scope="module")
def kek() -> rsa.RSAPrivateKey:
    return rsa_key(2048)


@pytest.fixture
def transfer() -> SoftTransferKey:
    return SoftTransferKey(key=_TRANSFER_KEY)


_TRANSFER_KEY = rsa_key(2048)


def good(kek: rsa.RSAPrivateKey, transfer: SoftTransferKey, algorithm: str = ALG) -> ReleasedKey:
    return released(kek, key_hsm(pkcs8(kek), transfer.key.public_key(), algorithm))


# --- algorithms -------------------------------------------------------------------------------


def test_every_configurable_algorithm_has_an_oaep_hash() -> None:
    assert set(SKR_ALGORITHMS) == set(config.SKR_ALGORITHMS)
    assert dict(SKR_ALGORITHMS) == {
        "CKM_RSA_AES_KEY_WRAP": "sha1",
        "RSA_AES_KEY_WRAP_256": "sha256",
        "RSA_AES_KEY_WRAP_384": "sha384",
    }


# --- transfer blob -> KEK ---------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", list(SKR_ALGORITHMS))
@pytest.mark.parametrize("kty", ["RSA", "RSA-HSM"])
def test_transfer_blob_unwraps_to_the_kek(
    kek: rsa.RSAPrivateKey, transfer: SoftTransferKey, algorithm: str, kty: str
) -> None:
    answer = released(kek, key_hsm(pkcs8(kek), transfer.key.public_key(), algorithm), kty=kty)
    with log.recording() as steps, unwrap_transfer_blob(answer, algorithm, transfer) as got:
        assert got.public_key().public_numbers() == kek.public_key().public_numbers()
        assert got.private_key().private_numbers() == kek.private_numbers()
        assert got.kid == KID
    assert transfer.calls == [SKR_ALGORITHMS[algorithm]]
    assert [name for name, _ in steps.steps] == ["tpm-decrypt", "unwrap"]
    assert {"tpm-decrypt", "unwrap"} <= set(release.STEPS)


def test_blob_without_enc_uses_the_requested_algorithm(
    kek: rsa.RSAPrivateKey, transfer: SoftTransferKey
) -> None:
    # The header's enc is optional in the BYOK shape; when absent the request decides.
    answer = released(kek, key_hsm(pkcs8(kek), transfer.key.public_key(), ALG, enc=None))
    unwrap_transfer_blob(answer, ALG, transfer).close()
    assert transfer.calls == ["sha256"]


@pytest.mark.parametrize(
    ("wrapped_with", "asked"),
    [
        ("CKM_RSA_AES_KEY_WRAP", "RSA_AES_KEY_WRAP_256"),
        ("RSA_AES_KEY_WRAP_256", "CKM_RSA_AES_KEY_WRAP"),
        ("RSA_AES_KEY_WRAP_384", "RSA_AES_KEY_WRAP_256"),
    ],
)
def test_blob_enc_must_equal_the_requested_algorithm(
    kek: rsa.RSAPrivateKey, transfer: SoftTransferKey, wrapped_with: str, asked: str
) -> None:
    # The (signed) blob header naming another wrapping is refused, never followed.
    answer = good(kek, transfer, wrapped_with)
    with pytest.raises(KeyReleaseError) as err:
        unwrap_transfer_blob(answer, asked, transfer)
    assert reason(err) == "transfer-blob-invalid"
    assert transfer.calls == []  # refused before the TPM is asked


@pytest.mark.parametrize("enc", ["rsa_aes_key_wrap_256", "RSA_AES_KEY_WRAP_256 ", "dir"])
def test_blob_enc_is_compared_exactly(
    kek: rsa.RSAPrivateKey, transfer: SoftTransferKey, enc: str
) -> None:
    answer = released(kek, key_hsm(pkcs8(kek), transfer.key.public_key(), ALG, enc=enc))
    with pytest.raises(KeyReleaseError) as err:
        unwrap_transfer_blob(answer, ALG, transfer)
    assert reason(err) == "transfer-blob-invalid"


def test_transfer_key_size_is_the_callers(kek: rsa.RSAPrivateKey) -> None:
    big = SoftTransferKey(key=rsa_key(3072))
    answer = good(kek, big)
    with pytest.raises(ValueError):  # split at 256 bytes, the RSA part does not decrypt
        unwrap_transfer_blob(answer, ALG, big)
    with unwrap_transfer_blob(answer, ALG, big, transfer_key_bytes=384) as got:
        assert got.public_key().public_numbers() == kek.public_key().public_numbers()


def test_blob_wrapped_to_another_transfer_key_is_refused(
    kek: rsa.RSAPrivateKey, transfer: SoftTransferKey
) -> None:
    answer = good(kek, SoftTransferKey())
    with pytest.raises(ValueError):  # the TPM (here: software) refuses the RSA part
        unwrap_transfer_blob(answer, ALG, transfer)


@pytest.mark.parametrize(
    "hsm",
    [
        "not base64 !",
        b64url(b"not json"),
        b64url(b"[1, 2]"),
        b64url(json.dumps({"header": {"enc": ALG}}).encode()),
        b64url(json.dumps({"header": {"enc": ALG}, "ciphertext": 7}).encode()),
        b64url(json.dumps({"ciphertext": "***"}).encode()),
        b64url(json.dumps({"ciphertext": b64url(bytes(200))}).encode()),
        blob(bytes(256 + 8), ALG),  # an RSA part and no more than one KWP block
        b64url(b"[" * 100_000),
    ],
    ids=[
        "not-b64",
        "not-json",
        "array",
        "no-ciphertext",
        "ciphertext-not-str",
        "ciphertext-not-b64",
        "short",
        "rsa-part-only",
        "deep",
    ],
)
def test_malformed_key_hsm_is_refused(
    kek: rsa.RSAPrivateKey, transfer: SoftTransferKey, hsm: str
) -> None:
    with pytest.raises(KeyReleaseError) as err:
        unwrap_transfer_blob(released(kek, hsm), ALG, transfer)
    assert reason(err) == "transfer-blob-invalid"
    assert transfer.calls == []


def corrupt(hsm: str, change: Any) -> str:
    doc = json.loads(unb64url(hsm))
    ct = bytearray(unb64url(doc["ciphertext"]))
    change(ct)
    doc["ciphertext"] = b64url(bytes(ct))
    return b64url(json.dumps(doc).encode())


def _flip(index: int) -> Any:
    def change(ct: bytearray) -> None:
        ct[index] ^= 0x40

    return change


def _cut(count: int) -> Any:
    def change(ct: bytearray) -> None:
        del ct[-count:]

    return change


@pytest.mark.parametrize(
    "change",
    [_flip(256), _flip(300), _flip(-1), _cut(1), _cut(8)],
    ids=["first-kwp-byte", "middle", "last-byte", "one-byte-short", "one-block-short"],
)
def test_corrupt_wrapped_part_is_refused_opaquely(
    kek: rsa.RSAPrivateKey, transfer: SoftTransferKey, change: Any
) -> None:
    hsm = corrupt(good(kek, transfer).key_hsm, change)
    with pytest.raises(KeyReleaseError) as err:
        unwrap_transfer_blob(released(kek, hsm), ALG, transfer)
    assert reason(err) == "transfer-blob-invalid"
    # Opaque: no library detail, no key material, nothing about where it broke.
    assert err.value.message == (
        "the released key's transfer blob is invalid: the AES key-wrap integrity check failed"
    )
    assert err.value.__cause__ is None and err.value.__suppress_context__
    # The AES key from the TPM is zeroed on the failure path too.
    assert [len(b) for b in transfer.returned] == [32]
    assert not any(transfer.returned[0])


def test_wrapped_part_that_is_not_pkcs8_is_refused(
    kek: rsa.RSAPrivateKey, transfer: SoftTransferKey
) -> None:
    hsm = blob(
        wrap_material(b"\x30\x03\x02\x01\x00" + os.urandom(40), transfer.key.public_key(), ALG), ALG
    )
    with pytest.raises(KeyReleaseError) as err:
        unwrap_transfer_blob(released(kek, hsm), ALG, transfer)
    assert reason(err) == "transfer-blob-invalid"
    assert "not a PKCS#8 private key" in err.value.message


def test_non_rsa_kek_is_refused(kek: rsa.RSAPrivateKey, transfer: SoftTransferKey) -> None:
    hsm = key_hsm(pkcs8(ec.generate_private_key(ec.SECP256R1())), transfer.key.public_key(), ALG)
    with pytest.raises(KeyReleaseError) as err:
        unwrap_transfer_blob(released(kek, hsm), ALG, transfer)
    assert reason(err) == "kek-not-rsa"
    for kty in ("EC-HSM", "EC", "oct", None):
        transfer.calls.clear()
        with pytest.raises(KeyReleaseError) as err:
            unwrap_transfer_blob(released(kek, good(kek, transfer).key_hsm, kty=kty), ALG, transfer)
        assert reason(err) == "kek-not-rsa"
        assert transfer.calls == []


def test_private_key_must_match_the_released_public_key(
    kek: rsa.RSAPrivateKey, transfer: SoftTransferKey
) -> None:
    other = rsa_key(2048)
    hsm = key_hsm(pkcs8(other), transfer.key.public_key(), ALG)
    with pytest.raises(KeyReleaseError) as err:  # public n of `kek`, private key of `other`
        unwrap_transfer_blob(released(kek, hsm), ALG, transfer)
    assert reason(err) == "release-key-mismatch"


def test_aes_key_is_zeroed_after_use(kek: rsa.RSAPrivateKey, transfer: SoftTransferKey) -> None:
    unwrap_transfer_blob(good(kek, transfer), ALG, transfer).close()
    assert [len(b) for b in transfer.returned] == [32]
    assert not any(transfer.returned[0])


def test_zero_overwrites_in_place() -> None:
    buf = bytearray(b"secret")
    release.zero(buf)
    assert buf == bytearray(6)


# --- the KEK ----------------------------------------------------------------------------------


def test_kek_handle_gives_the_key_until_closed(kek: rsa.RSAPrivateKey) -> None:
    handle = KekPrivateKey(kek, KID)
    assert handle.private_key() is kek
    assert handle.public_key().public_numbers() == kek.public_key().public_numbers()
    with handle:
        pass
    for use in (handle.private_key, handle.public_key):
        with pytest.raises(KeyReleaseError) as err:
            use()
        assert reason(err) == "kek-closed"
    handle.close()  # twice is fine


def test_kek_unwraps_an_oaep256_wrapped_dek(kek: rsa.RSAPrivateKey) -> None:
    dek = os.urandom(32)
    wrapped = kek.public_key().encrypt(dek, OAEP256)
    with KekPrivateKey(kek, KID) as handle:
        got = unwrap_dek(handle.private_key(), wrapped, handle.kid)
    assert isinstance(got, bytearray)
    assert bytes(got) == dek


def test_kek_refuses_a_dek_wrapped_for_another_key(kek: rsa.RSAPrivateKey) -> None:
    wrapped = rsa_key(2048).public_key().encrypt(os.urandom(32), OAEP256)
    with pytest.raises(KeyUnwrapError) as err:
        unwrap_dek(KekPrivateKey(kek, KID).private_key(), wrapped, KID)
    assert err.value.reason == "key-unwrap"
    assert KID in err.value.message


def test_kek_refuses_a_dek_wrapped_with_sha1_oaep(kek: rsa.RSAPrivateKey) -> None:
    sha1 = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)  # noqa: S303
    wrapped = kek.public_key().encrypt(os.urandom(32), sha1)
    with pytest.raises(KeyUnwrapError) as err:
        unwrap_dek(kek, wrapped, KID)
    assert err.value.reason == "key-unwrap"


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_unwrapped_dek_must_be_aes256(kek: rsa.RSAPrivateKey, size: int) -> None:
    wrapped = kek.public_key().encrypt(b"\x5a" * size, OAEP256)
    with pytest.raises(KeyUnwrapError) as err:
        unwrap_dek(kek, wrapped, KID)
    assert err.value.reason == "dek-length"


def test_checked_dek_zeroes_what_it_refuses() -> None:
    short = bytearray(b"\x11" * 16)
    with pytest.raises(KeyUnwrapError) as err:
        checked_dek(short)
    assert err.value.reason == "dek-length"
    assert short == bytearray(16)
    fine = bytearray(b"\x22" * 32)
    assert checked_dek(fine) is fine


# --- token checks -----------------------------------------------------------------------------


def test_transfer_key_size_comes_from_the_token() -> None:
    n = b64url(bytes([0x80]) + bytes(383))
    claims = {
        "x-ms-runtime": {
            "keys": [
                {
                    "kid": "HCLAkPub",
                    "kty": "RSA",
                    "key_ops": ["sign"],
                    "n": b64url(bytes(256)),
                    "e": "AQAB",
                },
                {
                    "kid": "TpmEphemeralEncryptionKey",
                    "kty": "RSA",
                    "key_ops": ["encrypt"],
                    "n": n,
                    "e": "AQAB",
                },
            ]
        }
    }
    assert release.transfer_key_bytes(claims) == 384
    # The recorded release's target key has "use": "enc" and no key_ops (§7.2).
    by_use = {
        "x-ms-runtime": {
            "keys": [{"kid": "fake-release-key", "kty": "RSA", "use": "enc", "n": n, "e": "AQAB"}]
        }
    }
    assert release.transfer_key_bytes(by_use) == 384
    assert release.transfer_key_bytes({}) == release.DEFAULT_TRANSFER_KEY_BYTES == 256
    assert release.transfer_key_bytes({"x-ms-runtime": {"keys": "nope"}}) == 256


def test_expired_token_is_not_spent_on_a_release() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    release.check_token_fresh({"exp": now.timestamp() + 60}, now)
    release.check_token_fresh({"exp": int(now.timestamp()) + 1}, now)
    for exp in (now.timestamp() - 1, now.timestamp()):
        with pytest.raises(AttestationError) as err:
            release.check_token_fresh({"exp": exp}, now)
        assert err.value.reason == "token-expired"
    with pytest.raises(AttestationError) as err:
        release.check_token_fresh({"exp": now.timestamp() - 1}, now)
    assert "2025-12-31T23:59:59+00:00" in err.value.message


@pytest.mark.parametrize("claims", [{}, {"exp": None}, {"exp": "1767225600"}, {"exp": True}])
def test_token_without_a_numeric_exp_is_malformed(claims: dict[str, Any]) -> None:
    with pytest.raises(AttestationError) as err:
        release.check_token_fresh(claims, dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    assert err.value.reason == "token-malformed"


def test_nonces_are_fresh_and_urlsafe() -> None:
    nonces = {release.new_nonce() for _ in range(50)}
    assert len(nonces) == 50
    assert all(
        len(n) == 24
        and set(n) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        for n in nonces
    )


# --- key ids ----------------------------------------------------------------------------------


def test_key_id_parsing_and_version_aware_matching() -> None:
    versioned = KeyId.parse(KID)
    assert (versioned.vault_url, versioned.name, versioned.version) == (
        "https://myvault.vault.azure.net",
        "model-kek",
        "0123456789abcdef",
    )
    assert str(versioned) == KID
    assert versioned.host == "myvault.vault.azure.net"
    assert versioned.audience == "https://vault.azure.net"
    latest = KeyId.parse("https://MyVault.vault.azure.net/keys/model-kek/")
    assert latest.version is None
    assert latest.vault_url == "https://myvault.vault.azure.net"
    assert latest.accepts(versioned)
    assert latest.accepts(KeyId.parse("https://myvault.vault.azure.net/keys/model-kek"))
    assert versioned.accepts(KeyId.parse(KID))
    assert not versioned.accepts(latest)
    assert not versioned.accepts(KeyId.parse(KID.replace("0123", "9999")))
    assert not versioned.accepts(KeyId.parse(KID.replace("myvault", "other")))
    assert not versioned.accepts(KeyId.parse(KID.replace("model-kek", "other-kek")))
    assert not latest.accepts(KeyId.parse(KID.replace("myvault", "other")))
    ip = KeyId.parse("https://127.0.0.1:8443/keys/k/v")
    assert (ip.vault_url, ip.host) == ("https://127.0.0.1:8443", "127.0.0.1")
    assert KeyId.parse("https://h.managedhsm.azure.net/keys/k").audience == (
        "https://managedhsm.azure.net"
    )


@pytest.mark.parametrize(
    "kid",
    [
        "http://myvault.vault.azure.net/keys/k/v",
        "https://myvault.vault.azure.net/secrets/k/v",
        "https://myvault.vault.azure.net/keys",
        "https://myvault.vault.azure.net/keys/k/v/extra",
        "https://myvault.vault.azure.net/keys/k/v?x=1",
        "https://myvault.vault.azure.net/keys/k/v#f",
        "https://user@myvault.vault.azure.net/keys/k/v",
        "https://myvault.vault.azure.net/keys/k_1/v",
        "https://myvault.vault.azure.net/keys/k/v-1",
        "myvault/keys/k",
        "",
        None,
        42,
    ],
)
def test_bad_key_ids_are_usage_errors(kid: object) -> None:
    with pytest.raises(UsageError) as err:
        KeyId.parse(kid)
    assert err.value.reason == "key-id-invalid"


# --- trust anchors ----------------------------------------------------------------------------


def test_trust_anchors_from_a_bundle(tmp_path: Path) -> None:
    one, two = (issue(cn, rsa_key(), ca=True) for cn in ("root one", "root two"))
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(one.cert_pem + two.cert_pem)
    assert trust_anchors(bundle) == [one.cert, two.cert]
    for name, content in (("empty.pem", b""), ("junk.pem", b"not a certificate")):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(KeyReleaseError) as err:
            trust_anchors(path)
        assert reason(err) == "trust-anchor-invalid"
    with pytest.raises(KeyReleaseError) as err:
        trust_anchors(tmp_path / "missing.pem")
    assert reason(err) == "trust-anchor-invalid"
