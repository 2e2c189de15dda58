"""The MAA stand-in: guest attestation end to end over real TLS, and each refusal's exact reason."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from tpm2_pytss.constants import TPM2_ALG
from tpm2_pytss.types import (
    TPM2B_PUBLIC_KEY_RSA,
    TPMS_SIGNATURE_RSA,
    TPMT_SIGNATURE,
    TPMU_SIGNATURE,
)

from testbed import maa, snp
from testbed.faults import Fault, Faults
from testbed.guestevidence import EvidenceError, MaaPolicy, verify_guest
from testbed.pki import Trust, issue, rsa_key
from tests.maa_evidence import Chip, GuestForge, body, edited, tpm_name, tpm_public

pytestmark = pytest.mark.unit

GUEST = "/attest/AzureGuest?api-version=2020-10-01"


class ServedApp:
    """An aiohttp app served over TLS on a free loopback port from a thread of its own."""

    def __init__(self, trust: Trust, faults: Faults, tmp: Path) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self.sock.getsockname()[1]}"
        (tmp / "tls.pem").write_bytes(trust.chain_pem("tls"))  # leaf, then the issuing CA
        (tmp / "tls.key").write_bytes(trust.tls.key_pem)
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(tmp / "tls.pem", tmp / "tls.key")
        self.app = maa.make_app(trust, faults, issuer=self.url)
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(self.app)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ServedApp:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)
        return self

    async def _start(self) -> None:
        await self.runner.setup()
        await web.SockSite(self.runner, self.sock, ssl_context=self.ctx).start()

    async def _stop(self) -> None:
        # Drop connections a client still holds (a failed test's traceback keeps its response
        # alive): a TLS close would wait for the peer's close_notify after the loop is gone.
        if self.runner.server is not None:
            for conn in self.runner.server.connections:
                if conn.transport is not None:
                    conn.transport.abort()
        await self.runner.cleanup()

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()
        self.sock.close()


@pytest.fixture(scope="module")
def trust() -> Trust:
    return Trust.create()


@pytest.fixture(scope="module")
def ca_bundle(trust: Trust, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("pki") / "ca.pem"
    path.write_bytes(trust.ca.cert_pem)
    return str(path)


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Faults:
    return Faults(tmp_path_factory.mktemp("faults") / "faults.json")


@pytest.fixture(scope="module")
def server(
    trust: Trust, faults: Faults, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedApp]:
    with ServedApp(trust, faults, tmp_path_factory.mktemp("tls")) as served:
        yield served


@pytest.fixture(scope="module")
def base_forge(trust: Trust) -> GuestForge:
    return GuestForge.create(trust)


@pytest.fixture
def forge(base_forge: GuestForge) -> GuestForge:
    return base_forge.copy()


@pytest.fixture
def post(server: ServedApp, ca_bundle: str, faults: Faults) -> Iterator[Any]:
    def send(payload: Any, path: str = GUEST, **kwargs: Any) -> requests.Response:
        timeout = kwargs.pop("timeout", 10)
        if isinstance(payload, bytes):
            return requests.post(
                server.url + path,
                data=payload,
                verify=ca_bundle,
                headers={"Content-Type": "application/json"},
                timeout=timeout,
            )
        return requests.post(server.url + path, json=payload, verify=ca_bundle, timeout=timeout)

    yield send
    faults.clear()


def refusal(resp: requests.Response) -> tuple[int, str, str]:
    err = resp.json()["error"]
    return resp.status_code, err["code"], err["message"]


def open_token(resp: requests.Response, forge: GuestForge) -> str:
    assert resp.status_code == 200, resp.text
    return maa.decrypt_response(resp.json()["token"], forge.enc_key)


def verified_claims(token: str, server: ServedApp, ca_bundle: str, trust: Trust) -> dict[str, Any]:
    """Verify a token as a relying party would: OpenID metadata, JWKS, x5c, RS256."""
    meta = requests.get(
        server.url + "/.well-known/openid-configuration", verify=ca_bundle, timeout=10
    ).json()
    assert meta["issuer"] == server.url
    assert meta["jwks_uri"] == server.url + "/certs"
    assert meta["id_token_signing_alg_values_supported"] == ["RS256"]
    keyset = requests.get(meta["jwks_uri"], verify=ca_bundle, timeout=10).json()
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "RS256"
    assert header["typ"] == "JWT"
    assert header["jku"] == meta["jwks_uri"]
    (entry,) = [k for k in keyset["keys"] if k["kid"] == header["kid"]]
    chain = [x509.load_der_x509_certificate(base64.b64decode(c)) for c in entry["x5c"]]
    chain[0].verify_directly_issued_by(chain[1])
    assert chain[1] == trust.ca.cert
    jwk_key = jwt.PyJWK(entry).key
    assert isinstance(jwk_key, rsa.RSAPublicKey)
    cert_key = chain[0].public_key()
    assert isinstance(cert_key, rsa.RSAPublicKey)
    assert jwk_key.public_numbers() == cert_key.public_numbers()
    return dict(jwt.decode(token, jwk_key, algorithms=["RS256"], issuer=server.url))


# --- success --------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["cpp", "python"])
def test_valid_evidence_yields_encrypted_token_with_real_claims(
    style: str, forge: GuestForge, post: Any, server: ServedApp, ca_bundle: str, trust: Trust
) -> None:
    forge.style = style
    resp = post(body(forge.info()))
    claims = verified_claims(open_token(resp, forge), server, ca_bundle, trust)

    assert claims["exp"] - claims["iat"] == 8 * 3600
    assert claims["nbf"] == claims["iat"]
    assert claims["x-ms-attestation-type"] == "azurevm"
    assert claims["x-ms-azurevm-attested-pcrs"] == list(range(8))
    assert claims["x-ms-azurevm-ostype"] == "Linux"
    assert claims["x-ms-azurevm-osdistro"] == "Ubuntu"
    assert claims["x-ms-azurevm-osversion-major"] == 22
    assert claims["x-ms-azurevm-osversion-minor"] == 4
    assert claims["x-ms-azurevm-vmid"] == forge.vm_id
    assert claims["x-ms-azurevm-is-windows"] is False
    assert claims["x-ms-azurevm-kerneldebug-enabled"] is False
    assert claims["secureboot"] is True
    assert claims["x-ms-ver"] == "1.0"
    assert claims["x-ms-policy-hash"] == server.app[maa.SERVICE_KEY].policy_hash

    tee = claims["x-ms-isolation-tee"]
    assert tee["x-ms-attestation-type"] == "sevsnpvm"
    assert tee["x-ms-compliance-status"] == "azure-compliant-cvm"
    assert tee["x-ms-runtime"] == json.loads(forge.runtime())
    runtime_hash = hashlib.sha256(forge.runtime()).digest()
    assert tee["x-ms-sevsnpvm-reportdata"] == (runtime_hash + bytes(32)).hex()
    assert tee["x-ms-sevsnpvm-launchmeasurement"] == snp.TESTBED_MEASUREMENT.hex()
    assert tee["x-ms-sevsnpvm-is-debuggable"] is False
    assert tee["x-ms-sevsnpvm-vmpl"] == 0
    assert tee["x-ms-sevsnpvm-guestsvn"] == 1
    assert tee["x-ms-sevsnpvm-snpfw-svn"] == snp.TESTBED_TCB.snp
    assert tee["x-ms-sevsnpvm-microcode-svn"] == snp.TESTBED_TCB.microcode

    runtime = claims["x-ms-runtime"]
    assert runtime["client-payload"] == {"nonce": "1234"}  # echoed as sent
    (ephemeral,) = runtime["keys"]
    numbers = forge.enc_key.public_key().public_numbers()
    assert ephemeral["kid"] == "TpmEphemeralEncryptionKey"
    assert ephemeral["key_ops"] == ["encrypt"]
    ephemeral_key = jwt.PyJWK({"kty": "RSA", **ephemeral}).key
    assert isinstance(ephemeral_key, rsa.RSAPublicKey)
    assert ephemeral_key.public_numbers() == numbers


def test_response_envelope_has_maa_shape(forge: GuestForge, post: Any) -> None:
    resp = post(body(forge.info()))
    assert resp.status_code == 200
    envelope = json.loads(base64.urlsafe_b64decode(resp.json()["token"] + "=="))
    assert set(envelope) == {"Jwt", "EncryptedInnerKey", "EncryptionParams", "AuthenticationData"}
    assert envelope["EncryptionParams"] == {
        "BlockMode": "ChainingModeGCM",
        "BlockPadding": "PKCS7",
        "Cipher": "AES",
        "KeySizeInBits": 256,
        "Iv": envelope["EncryptionParams"]["Iv"],
    }
    assert len(base64.b64decode(envelope["EncryptionParams"]["Iv"])) == 12
    assert len(base64.b64decode(envelope["AuthenticationData"])) == 16
    assert len(base64.b64decode(envelope["EncryptedInnerKey"])) == 256


def test_token_cannot_be_opened_without_the_ephemeral_key(forge: GuestForge, post: Any) -> None:
    resp = post(body(forge.info()))
    with pytest.raises(ValueError, match="the token does not open with this key"):
        maa.decrypt_response(resp.json()["token"], rsa_key())


def test_signatures_as_tpmt_signature_are_accepted(forge: GuestForge, post: Any) -> None:
    info = forge.info()
    for field in ("PcrSignature", "EncKeyCertifyInfoSignature"):
        raw = base64.b64decode(info["TpmInfo"][field])
        marshalled = TPMT_SIGNATURE(
            sigAlg=TPM2_ALG.RSASSA,
            signature=TPMU_SIGNATURE(
                rsassa=TPMS_SIGNATURE_RSA(hash=TPM2_ALG.SHA256, sig=TPM2B_PUBLIC_KEY_RSA(raw))
            ),
        ).marshal()
        info = edited(info, f"TpmInfo.{field}", base64.b64encode(bytes(marshalled)).decode())
    assert open_token(post(body(info)), forge)


def test_client_payload_is_optional(forge: GuestForge, post: Any) -> None:
    forge.client_payload = None
    resp = post(body(forge.info()))
    assert (
        "client-payload"
        not in jwt.decode(open_token(resp, forge), options={"verify_signature": False})[
            "x-ms-runtime"
        ]
    )


def test_client_payload_is_echoed_exactly_as_sent(forge: GuestForge, post: Any) -> None:
    # The C++ client base64-encodes each value itself; MAA adds no layer of its own.
    forge.client_payload = {"nonce": "MTIzNA=="}
    claims = jwt.decode(
        open_token(post(body(forge.info())), forge), options={"verify_signature": False}
    )
    assert claims["x-ms-runtime"]["client-payload"] == {"nonce": "MTIzNA=="}


def test_client_payload_may_hold_any_json(forge: GuestForge, post: Any) -> None:
    # Microsoft's Python client sends its claims raw, nested objects included.
    payload = {
        "user-claims": {"nonce": "Hello from the testbed", "n": [1, 2.5, None]},
        "count": 3,
        "ok": True,
        "nothing": None,
    }
    info = edited(forge.info(), "ClientPayload", payload)
    claims = jwt.decode(open_token(post(body(info)), forge), options={"verify_signature": False})
    echoed = claims["x-ms-runtime"]["client-payload"]
    assert echoed == payload
    assert json.dumps(echoed) == json.dumps(payload)  # members in the order sent


def test_client_payload_serialised_as_a_string_is_echoed_as_the_object(
    forge: GuestForge, post: Any
) -> None:
    info = edited(forge.info(), "ClientPayload", json.dumps({"nonce": {"a": 1}}))
    claims = jwt.decode(open_token(post(body(info)), forge), options={"verify_signature": False})
    assert claims["x-ms-runtime"]["client-payload"] == {"nonce": {"a": 1}}


@pytest.mark.parametrize("payload", [[1, 2], "[1, 2]", "not json", 7, True])
def test_client_payload_that_is_not_an_object_is_refused(
    forge: GuestForge, post: Any, payload: Any
) -> None:
    info = edited(forge.info(), "ClientPayload", payload)
    assert refusal(post(body(info))) == (
        400,
        "InvalidParameter",
        "ClientPayload is not a JSON object",
    )


def test_aik_pub_as_a_whole_read_public_response(forge: GuestForge, post: Any) -> None:
    # cvm-attestation-tools sends ReadPublicResponse.toBytes(): TPM2B_PUBLIC, then
    # TPM2B_NAME name and TPM2B_NAME qualifiedName.
    public = forge.ak_public()
    name = bytes(public.get_name().marshal())
    trailer = name + name
    aik = bytes(public.marshal()) + trailer
    info = edited(forge.info(), "TpmInfo.AikPub", base64.b64encode(aik).decode())
    assert open_token(post(body(info)), forge)
    # Whatever follows the TPM2B_PUBLIC is not looked at.
    info = edited(
        forge.info(),
        "TpmInfo.AikPub",
        base64.b64encode(bytes(public.marshal()) + b"\xff" * 7).decode(),
    )
    assert open_token(post(body(info)), forge)


def test_aik_pub_with_a_trailer_is_still_verified(forge: GuestForge, post: Any) -> None:
    other = tpm_public(
        rsa_key(),
        "rsa2048:rsassa-sha256:null",
        "restricted|sign|fixedtpm|fixedparent|sensitivedataorigin|userwithauth",
    )
    name = bytes(other.get_name().marshal())
    aik = bytes(other.marshal()) + name + name
    info = edited(forge.info(), "TpmInfo.AikPub", base64.b64encode(aik).decode())
    assert refusal(post(body(info))) == (
        400,
        "EvidenceVerificationFailed",
        "TpmInfo.AikPub is not the key certified by TpmInfo.AikCert",
    )
    decrypting = tpm_public(
        forge.ak_key,
        "rsa2048:null:null",
        "decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth",
    )
    aik = bytes(decrypting.marshal()) + name
    info = edited(forge.info(), "TpmInfo.AikPub", base64.b64encode(aik).decode())
    assert refusal(post(body(info))) == (
        400,
        "EvidenceVerificationFailed",
        "TpmInfo.AikPub is not a restricted signing key",
    )


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        (b"", "TPM2B_PUBLIC is truncated: publicArea.size needs 2 bytes at offset 0, 0 left"),
        (b"\x00\x00" + b"\x00" * 40, "TPM2B_PUBLIC is empty (size 0)"),
        (
            b"\x01\x40" + b"\x00" * 40,
            "TPM2B_PUBLIC is truncated: publicArea needs 320 bytes at offset 2, 40 left",
        ),
        (b"\x00\x04\x00\x23\x00\x0b" + b"\x00" * 60, "TPMT_PUBLIC type is ECC, not RSA"),
    ],
)
def test_aik_pub_that_does_not_begin_with_a_tpm2b_public_is_refused(
    forge: GuestForge, post: Any, raw: bytes, detail: str
) -> None:
    info = edited(forge.info(), "TpmInfo.AikPub", base64.b64encode(raw).decode())
    assert refusal(post(body(info))) == (
        400,
        "InvalidParameter",
        f"TpmInfo.AikPub does not begin with a valid RSA TPM2B_PUBLIC: {detail}",
    )


def test_enc_key_pub_with_trailing_bytes_is_still_refused(forge: GuestForge, post: Any) -> None:
    marshalled = bytes(forge.enc_public().marshal())
    info = edited(
        forge.info(), "TpmInfo.EncKeyPub", base64.b64encode(marshalled + b"\x00\x00").decode()
    )
    assert refusal(post(body(info))) == (
        400,
        "InvalidParameter",
        "TpmInfo.EncKeyPub is not a valid RSA TPM2B_PUBLIC: TPM2B_PUBLIC has 2 trailing bytes "
        f"after offset {len(marshalled)}",
    )


def test_certs_carry_the_signing_chain(server: ServedApp, ca_bundle: str, trust: Trust) -> None:
    keys = requests.get(server.url + "/certs", verify=ca_bundle, timeout=10).json()["keys"]
    (entry,) = keys
    assert entry["kty"] == "RSA"
    assert entry["use"] == "sig"
    assert [base64.b64decode(c) for c in entry["x5c"]] == [
        trust.maa_signing.cert_der,
        trust.ca.cert_der,
    ]


# --- refusals: request shape ----------------------------------------------------------------


def test_missing_api_version(forge: GuestForge, post: Any) -> None:
    assert refusal(post(body(forge.info()), "/attest/AzureGuest")) == (
        400,
        "MissingApiVersionParameter",
        "the api-version query parameter is required",
    )


def test_unsupported_api_version(forge: GuestForge, post: Any) -> None:
    assert refusal(post(body(forge.info()), "/attest/AzureGuest?api-version=2018-09-01")) == (
        400,
        "UnsupportedApiVersion",
        "api-version '2018-09-01' is not supported for AzureGuest; supported: 2020-10-01",
    )


def test_body_not_json(post: Any) -> None:
    assert refusal(post(b"{not json")) == (400, "InvalidParameter", "request body is not JSON")


def test_attestation_info_not_base64(post: Any) -> None:
    assert refusal(post({"AttestationInfo": "***"})) == (
        400,
        "InvalidParameter",
        "AttestationInfo is not valid base64 or base64url",
    )


def test_attestation_info_not_a_json_object(post: Any) -> None:
    assert refusal(post({"AttestationInfo": base64.b64encode(b"[1,2]").decode()})) == (
        400,
        "InvalidParameter",
        "AttestationInfo does not decode to a JSON object",
    )


def test_missing_field(forge: GuestForge, post: Any) -> None:
    info = edited(forge.info(), "TpmInfo.EncKeyCertifyInfo", ...)
    assert refusal(post(body(info))) == (
        400,
        "InvalidParameter",
        "TpmInfo.EncKeyCertifyInfo is missing",
    )


def test_field_of_wrong_type(forge: GuestForge, post: Any) -> None:
    info = edited(forge.info(), "TpmInfo.PcrSet", "0-7")
    assert refusal(post(body(info))) == (400, "InvalidParameter", "TpmInfo.PcrSet must be an array")


def test_tpm_field_in_base64url_is_refused(forge: GuestForge, post: Any) -> None:
    info = forge.info()
    aik = base64.b64decode(info["TpmInfo"]["AikCert"])
    info = edited(info, "TpmInfo.AikCert", base64.urlsafe_b64encode(aik).decode().rstrip("="))
    assert refusal(post(body(info))) == (
        400,
        "InvalidParameter",
        "TpmInfo.AikCert is not valid base64",
    )


def test_unknown_protocol_version(forge: GuestForge, post: Any) -> None:
    info = edited(forge.info(), "AttestationProtocolVersion", "1.0")
    assert refusal(post(body(info))) == (
        400,
        "InvalidParameter",
        "AttestationProtocolVersion '1.0' is not supported (want 2.0)",
    )


def test_unknown_attestation_type(post: Any) -> None:
    assert refusal(post({}, "/attest/SgxEnclave?api-version=2020-10-01")) == (
        400,
        "InvalidParameter",
        "attestation type 'SgxEnclave' is not supported here",
    )


# --- refusals: TPM evidence -----------------------------------------------------------------


def test_tampered_quote(forge: GuestForge, post: Any) -> None:
    info = forge.info()
    quote = bytearray(base64.b64decode(info["TpmInfo"]["PcrQuote"]))
    quote[50] ^= 1  # inside clockInfo.clock: still parses, no longer what the AK signed
    info = edited(info, "TpmInfo.PcrQuote", base64.b64encode(quote).decode())
    assert refusal(post(body(info))) == (
        400,
        "EvidenceVerificationFailed",
        "TpmInfo.PcrSignature is not a valid RSASSA-SHA256 signature by AikPub over "
        "TpmInfo.PcrQuote",
    )


def test_quote_signed_by_another_key(forge: GuestForge, post: Any) -> None:
    forge.quote_signer = rsa_key()
    assert refusal(post(body(forge.info()))) == (
        400,
        "EvidenceVerificationFailed",
        "TpmInfo.PcrSignature is not a valid RSASSA-SHA256 signature by AikPub over "
        "TpmInfo.PcrQuote",
    )


def test_wrong_pcr_values(forge: GuestForge, post: Any) -> None:
    info = edited(
        forge.info(),
        "TpmInfo.PCRs",
        [{"Index": i, "Digest": base64.b64encode(bytes([i]) * 32).decode()} for i in range(8)],
    )
    assert refusal(post(body(info))) == (
        400,
        "EvidenceVerificationFailed",
        "TpmInfo.PcrQuote pcrDigest does not match the values in TpmInfo.PCRs",
    )


def test_pcr_list_incomplete(forge: GuestForge, post: Any) -> None:
    info = forge.info()
    info = edited(info, "TpmInfo.PCRs", info["TpmInfo"]["PCRs"][:-1])
    assert refusal(post(body(info))) == (
        400,
        "InvalidParameter",
        "TpmInfo.PCRs lacks PCR 7 named in TpmInfo.PcrSet",
    )


def test_quote_selection_differs_from_pcr_set(forge: GuestForge, post: Any) -> None:
    forge.quote_pcrs = {i: v for i, v in forge.pcrs.items() if i != 5}
    assert refusal(post(body(forge.info()))) == (
        400,
        "EvidenceVerificationFailed",
        "TpmInfo.PcrQuote selects SHA256:[0, 1, 2, 3, 4, 6, 7], "
        "not SHA256:[0, 1, 2, 3, 4, 5, 6, 7] from TpmInfo.PcrSet",
    )


def test_pcr_set_lacks_a_required_pcr(forge: GuestForge, post: Any) -> None:
    del forge.pcrs[7]
    assert refusal(post(body(forge.info()))) == (
        400,
        "PolicyEvaluationError",
        "TpmInfo.PcrSet lacks PCR 7, which the policy requires",
    )


def test_unknown_ak_ca(forge: GuestForge, post: Any) -> None:
    rogue = issue("rogue vTPM CA", rsa_key(), ca=True)
    forge.ak_cert = issue("AK", forge.ak_key, rogue).cert
    assert refusal(post(body(forge.info()))) == (
        400,
        "EvidenceVerificationFailed",
        "TpmInfo.AikCert is not issued by a trusted vTPM CA "
        "(issuer CN=rogue vTPM CA,O=confinfer testbed)",
    )


def test_expired_ak_cert(forge: GuestForge, post: Any, trust: Trust) -> None:
    start = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    forge.ak_cert = issue("AK", forge.ak_key, trust.vtpm_ca, not_before=start, days=30).cert
    assert refusal(post(body(forge.info()))) == (
        400,
        "EvidenceVerificationFailed",
        "TpmInfo.AikCert expired at 2020-01-31T00:00:00Z",
    )


def test_aik_pub_is_not_the_certified_key(forge: GuestForge, post: Any) -> None:
    info = forge.info()
    other = tpm_public(
        rsa_key(),
        "rsa2048:rsassa-sha256:null",
        "restricted|sign|fixedtpm|fixedparent|sensitivedataorigin|userwithauth",
    )
    info = edited(info, "TpmInfo.AikPub", base64.b64encode(bytes(other.marshal())).decode())
    assert refusal(post(body(info))) == (
        400,
        "EvidenceVerificationFailed",
        "TpmInfo.AikPub is not the key certified by TpmInfo.AikCert",
    )


def test_certify_info_for_another_key(forge: GuestForge, post: Any) -> None:
    forge.certify_name = tpm_name(tpm_public(rsa_key(), "rsa2048:null:null", forge.enc_attrs))
    assert refusal(post(body(forge.info()))) == (
        400,
        "EvidenceVerificationFailed",
        "TpmInfo.EncKeyCertifyInfo certifies another object, not TpmInfo.EncKeyPub",
    )


def test_certify_info_signed_by_another_key(forge: GuestForge, post: Any) -> None:
    forge.certify_signer = rsa_key()
    assert refusal(post(body(forge.info()))) == (
        400,
        "EvidenceVerificationFailed",
        "TpmInfo.EncKeyCertifyInfoSignature is not a valid RSASSA-SHA256 signature by AikPub "
        "over TpmInfo.EncKeyCertifyInfo",
    )


def test_quote_sent_as_certify(forge: GuestForge, post: Any) -> None:
    info = forge.info()
    info = edited(info, "TpmInfo.PcrQuote", info["TpmInfo"]["EncKeyCertifyInfo"])
    assert refusal(post(body(info))) == (
        400,
        "EvidenceVerificationFailed",
        "TpmInfo.PcrQuote is of type TPM_ST_ATTEST_CERTIFY, not TPM_ST_ATTEST_QUOTE",
    )


def test_enc_key_that_can_sign(forge: GuestForge, post: Any) -> None:
    forge.enc_attrs = "decrypt|sign|fixedtpm|fixedparent|sensitivedataorigin|noda"
    assert refusal(post(body(forge.info()))) == (
        400,
        "EvidenceVerificationFailed",
        "TpmInfo.EncKeyPub is not an unrestricted decrypt-only key",
    )


def test_enc_key_without_da_protection_flag(forge: GuestForge, post: Any) -> None:
    forge.enc_attrs = "decrypt|fixedtpm|fixedparent|sensitivedataorigin"
    assert refusal(post(body(forge.info()))) == (
        400,
        "EvidenceVerificationFailed",
        "TpmInfo.EncKeyPub is not noDA",
    )


def test_enc_key_usable_by_password(forge: GuestForge, post: Any) -> None:
    forge.enc_attrs = "decrypt|fixedtpm|fixedparent|sensitivedataorigin|noda|userwithauth"
    assert refusal(post(body(forge.info()))) == (
        400,
        "EvidenceVerificationFailed",
        "TpmInfo.EncKeyPub is userWithAuth: its authValue bypasses its policy",
    )


def test_enc_key_policy_not_bound_to_quoted_pcrs(forge: GuestForge, post: Any) -> None:
    forge.enc_auth_policy = hashlib.sha256(b"some other policy").digest()
    assert refusal(post(body(forge.info()))) == (
        400,
        "EvidenceVerificationFailed",
        "TpmInfo.EncKeyPub authPolicy is not PolicyPCR over the quoted PCR values",
    )


def test_enc_key_without_auth_policy(forge: GuestForge, post: Any) -> None:
    forge.enc_auth_policy = b""
    assert refusal(post(body(forge.info()))) == (
        400,
        "EvidenceVerificationFailed",
        "TpmInfo.EncKeyPub has no authPolicy",
    )


# --- refusals: SEV-SNP evidence -------------------------------------------------------------


def test_report_data_mismatch(forge: GuestForge, post: Any) -> None:
    forge.report_data = hashlib.sha256(b"other runtime data").digest() + bytes(32)
    assert refusal(post(body(forge.info()))) == (
        400,
        "EvidenceVerificationFailed",
        "SnpReport REPORT_DATA[0:32] is not the SHA-256 of RunTimeData",
    )


def test_report_data_upper_half_not_zero(forge: GuestForge, post: Any) -> None:
    forge.report_data = hashlib.sha256(forge.runtime()).digest() + b"\x01" * 32
    assert refusal(post(body(forge.info()))) == (
        400,
        "EvidenceVerificationFailed",
        "SnpReport REPORT_DATA[32:64] is not zero",
    )


def test_snp_signature_bad(forge: GuestForge, post: Any) -> None:
    forge.report_signer = Chip.foreign().vcek.key  # type: ignore[assignment]
    assert refusal(post(body(forge.info()))) == (
        400,
        "EvidenceVerificationFailed",
        "SnpReport signature does not verify with the VCEK",
    )


def test_vcek_chain_to_foreign_ark(forge: GuestForge, post: Any) -> None:
    forge.chip = Chip.foreign()
    assert refusal(post(body(forge.info()))) == (
        400,
        "EvidenceVerificationFailed",
        "VcekCertChain ends in an ARK that is not the trusted AMD root",
    )


def test_debuggable_report(forge: GuestForge, post: Any) -> None:
    forge.report_changes["policy"] = snp.TESTBED_POLICY | snp.POLICY_DEBUG
    assert refusal(post(body(forge.info()))) == (
        400,
        "PolicyEvaluationError",
        "SnpReport guest policy allows debugging (policy bit 19)",
    )


def test_report_from_a_lower_privilege_level(forge: GuestForge, post: Any) -> None:
    forge.report_changes["vmpl"] = 2
    assert refusal(post(body(forge.info()))) == (
        400,
        "PolicyEvaluationError",
        "SnpReport was produced at VMPL 2, not VMPL 0",
    )


def test_hcl_ak_pub_is_not_the_ak(forge: GuestForge, post: Any) -> None:
    forge.hcl_ak = rsa_key().public_key()
    assert refusal(post(body(forge.info()))) == (
        400,
        "EvidenceVerificationFailed",
        "RunTimeData HCLAkPub is not TpmInfo.AikPub",
    )


def test_short_snp_report(forge: GuestForge, post: Any) -> None:
    info = forge.info()
    proof = json.loads(base64.b64decode(info["IsolationInfo"]["Evidence"]["Proof"]))
    proof["SnpReport"] = base64.urlsafe_b64encode(bytes(1000)).decode()
    info = edited(
        info, "IsolationInfo.Evidence.Proof", base64.b64encode(json.dumps(proof).encode()).decode()
    )
    assert refusal(post(body(info))) == (
        400,
        "InvalidParameter",
        "SnpReport is 1000 bytes, not 1184",
    )


def test_launch_measurement_outside_policy(base_forge: GuestForge, trust: Trust) -> None:
    policy = MaaPolicy.for_trust(trust, launch_measurements=frozenset({bytes(48)}))
    with pytest.raises(EvidenceError) as caught:
        verify_guest(base_forge.info(), policy, dt.datetime.now(dt.UTC))
    assert (caught.value.code, caught.value.message) == (
        "PolicyEvaluationError",
        f"SnpReport launch measurement {snp.TESTBED_MEASUREMENT.hex()} is not accepted by policy",
    )
    accepting = MaaPolicy.for_trust(trust, launch_measurements=frozenset({snp.TESTBED_MEASUREMENT}))
    assert verify_guest(base_forge.info(), accepting, dt.datetime.now(dt.UTC)).pcrs.keys() == set(
        range(8)
    )


# --- the platform endpoint ------------------------------------------------------------------


def _snp_body(forge: GuestForge) -> dict[str, Any]:
    runtime = forge.runtime()
    proof = {
        "SnpReport": base64.urlsafe_b64encode(forge.snp_report(runtime)).decode(),
        "VcekCertChain": forge.chip.chain_pem(),
    }
    return {
        "report": base64.urlsafe_b64encode(json.dumps(proof).encode()).decode(),
        "runtimeData": {"data": base64.urlsafe_b64encode(runtime).decode(), "dataType": "JSON"},
    }


def test_sevsnpvm_platform_token(
    forge: GuestForge, post: Any, server: ServedApp, ca_bundle: str, trust: Trust
) -> None:
    resp = post(_snp_body(forge), "/attest/SevSnpVm?api-version=2022-08-01")
    assert resp.status_code == 200, resp.text
    claims = verified_claims(resp.json()["token"], server, ca_bundle, trust)
    assert claims["x-ms-attestation-type"] == "sevsnpvm"
    assert claims["x-ms-runtime"]["vm-configuration"]["vmUniqueId"] == forge.vm_id
    assert claims["x-ms-sevsnpvm-launchmeasurement"] == snp.TESTBED_MEASUREMENT.hex()


def test_sevsnpvm_refuses_unbound_runtime_data(forge: GuestForge, post: Any) -> None:
    payload = _snp_body(forge)
    payload["runtimeData"]["data"] = base64.urlsafe_b64encode(b'{"keys":[]}').decode()
    assert refusal(post(payload, "/attest/SevSnpVm?api-version=2022-08-01")) == (
        400,
        "EvidenceVerificationFailed",
        "SnpReport REPORT_DATA[0:32] is not the SHA-256 of RunTimeData",
    )


# --- faults ---------------------------------------------------------------------------------


def test_throttled_with_retry_after(forge: GuestForge, post: Any, faults: Faults) -> None:
    faults.arm("maa", Fault(status=429, retry_after=7, count=1))
    resp = post(body(forge.info()))
    assert resp.status_code == 429
    assert resp.headers["Retry-After"] == "7"
    assert resp.json()["error"]["code"] == "TooManyRequests"
    assert post(body(forge.info())).status_code == 200  # the fault was for one request


def test_server_error_fault(forge: GuestForge, post: Any, faults: Faults) -> None:
    faults.arm("maa", Fault(status=503, count=1))
    assert refusal(post(body(forge.info()))) == (
        503,
        "ServiceUnavailable",
        "injected fault: HTTP 503",
    )


def test_faults_spare_the_metadata_routes(
    server: ServedApp, ca_bundle: str, faults: Faults
) -> None:
    faults.arm("maa", Fault(status=500, count=-1))
    try:
        resp = requests.get(server.url + "/certs", verify=ca_bundle, timeout=10)
    finally:
        faults.clear()
    assert resp.status_code == 200


def test_down_fault_drops_the_connection(forge: GuestForge, post: Any, faults: Faults) -> None:
    faults.arm("maa", Fault(down=True, count=1))
    with pytest.raises(requests.ConnectionError):
        post(body(forge.info()))


def test_latency_fault_delays_then_answers(
    forge: GuestForge, post: Any, faults: Faults, monkeypatch: pytest.MonkeyPatch
) -> None:
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(delay: float, *args: Any) -> Any:
        delays.append(delay)
        return await real_sleep(0, *args)

    monkeypatch.setattr(asyncio, "sleep", recording_sleep)  # the fault middleware's sleep
    faults.arm("maa", Fault(latency_s=2.5, count=1))
    resp = post(body(forge.info()))
    assert resp.status_code == 200
    assert 2.5 in delays
