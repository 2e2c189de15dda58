"""A forge for MAA AzureGuest evidence, built without a TPM, for testing the MAA stand-in.

Everything a guest sends is made here in software: an AK with a certificate from the testbed
vTPM CA, TPMS_ATTEST quote and certify structures (marshalled with tpm2-pytss, so that the
verifier's own parser is checked against an independent encoder), an SNP report signed by
the testbed VCEK, the HCL runtime JSON, and an ephemeral RSA key whose private half the test
keeps to open the encrypted answer. Every piece is a knob, so a test can break exactly one.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from tpm2_pytss.constants import TPM2_GENERATED, TPM2_ST
from tpm2_pytss.types import (
    TPM2B_DATA,
    TPM2B_DIGEST,
    TPM2B_NAME,
    TPM2B_PUBLIC,
    TPML_PCR_SELECTION,
    TPMS_ATTEST,
    TPMS_CERTIFY_INFO,
    TPMS_CLOCK_INFO,
    TPMS_QUOTE_INFO,
    TPMU_ATTEST,
)

from testbed import snp
from testbed.pki import Pair, Trust, issue, rsa_key

AK_ATTRS = "restricted|sign|fixedtpm|fixedparent|sensitivedataorigin|userwithauth"
ENC_ATTRS = "decrypt|fixedtpm|fixedparent|sensitivedataorigin|noda"
TPM_CC_POLICY_PCR = 0x0000017F


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk_int(value: int) -> str:
    return b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def tpm_public(
    key: rsa.RSAPrivateKey, template: str, attrs: str, auth_policy: bytes = b""
) -> TPM2B_PUBLIC:
    pub = TPM2B_PUBLIC.parse(template, objectAttributes=attrs)
    numbers = key.public_key().public_numbers()
    pub.publicArea.unique.rsa = numbers.n.to_bytes(key.key_size // 8, "big")
    pub.publicArea.parameters.rsaDetail.exponent = 0 if numbers.e == 65537 else numbers.e
    pub.publicArea.authPolicy = TPM2B_DIGEST(auth_policy)
    return pub


def tpm_name(pub: TPM2B_PUBLIC) -> bytes:
    return bytes(pub.get_name().marshal()[2:])


def policy_pcr(pcrs: dict[int, bytes]) -> bytes:
    """The trial-session digest of PolicyPCR(SHA-256, these PCRs) computed from first principles."""
    selection = TPML_PCR_SELECTION.parse("sha256:" + ",".join(str(i) for i in sorted(pcrs)))
    pcr_digest = hashlib.sha256(b"".join(pcrs[i] for i in sorted(pcrs))).digest()
    return hashlib.sha256(
        bytes(32) + TPM_CC_POLICY_PCR.to_bytes(4, "big") + selection.marshal() + pcr_digest
    ).digest()


def rsassa(key: rsa.RSAPrivateKey, data: bytes) -> bytes:
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def attest(att_type: int, attested: TPMU_ATTEST, signer_name: bytes) -> bytes:
    return bytes(
        TPMS_ATTEST(
            magic=TPM2_GENERATED.VALUE,
            type=att_type,
            qualifiedSigner=TPM2B_NAME(signer_name),
            extraData=TPM2B_DATA(b""),
            clockInfo=TPMS_CLOCK_INFO(clock=987654, resetCount=3, restartCount=0, safe=1),
            firmwareVersion=0x0002000100000000,
            attested=attested,
        ).marshal()
    )


@dataclass(frozen=True)
class Chip:
    """An AMD chain and VCEK: the testbed's, or a foreign one."""

    ark: Pair
    ask: Pair
    vcek: Pair

    @classmethod
    def of(cls, trust: Trust) -> Chip:
        return cls(trust.ark, trust.ask, trust.vcek)

    @classmethod
    def foreign(cls) -> Chip:
        ark = issue("foreign ARK", ec.generate_private_key(ec.SECP384R1()), ca=True)
        ask = issue("foreign ASK", ec.generate_private_key(ec.SECP384R1()), ark, ca=True)
        return cls(ark, ask, issue("foreign VCEK", ec.generate_private_key(ec.SECP384R1()), ask))

    def chain_pem(self) -> str:
        return b"".join(p.cert_pem for p in (self.vcek, self.ask, self.ark)).decode("ascii")


@dataclass
class GuestForge:
    """The knobs of one guest's evidence; :meth:`info` assembles the AttestationInfo document."""

    trust: Trust
    ak_key: rsa.RSAPrivateKey
    ak_cert: x509.Certificate
    enc_key: rsa.RSAPrivateKey
    chip: Chip
    pcrs: dict[int, bytes]
    vm_id: str = field(default_factory=lambda: str(uuid.uuid4()).upper())
    style: str = "cpp"  # "cpp" (AzureAttestSKR encodings) or "python" (cvm-attestation-tools)
    client_payload: dict[str, str] | None = field(default_factory=lambda: {"nonce": "1234"})
    # Knobs that break one thing each (None: the honest value).
    quote_signer: rsa.RSAPrivateKey | None = None
    quote_pcrs: dict[int, bytes] | None = None  # what the quote's pcrDigest is computed over
    certify_signer: rsa.RSAPrivateKey | None = None
    certify_name: bytes | None = None
    enc_attrs: str = ENC_ATTRS
    enc_auth_policy: bytes | None = None
    hcl_ak: rsa.RSAPublicKey | None = None
    report_changes: dict[str, Any] = field(default_factory=dict)
    report_data: bytes | None = None
    report_signer: ec.EllipticCurvePrivateKey | None = None

    @classmethod
    def create(cls, trust: Trust) -> GuestForge:
        ak_key = rsa_key()
        ak_cert = issue("testbed vTPM AK", ak_key, trust.vtpm_ca).cert
        pcrs = {i: hashlib.sha256(b"pcr %d" % i).digest() for i in range(8)}
        return cls(trust, ak_key, ak_cert, rsa_key(), Chip.of(trust), pcrs)

    def copy(self, **changes: Any) -> GuestForge:
        return replace(
            self, pcrs=dict(self.pcrs), report_changes=dict(self.report_changes), **changes
        )

    # --- pieces -----------------------------------------------------------------------------

    def ak_public(self) -> TPM2B_PUBLIC:
        return tpm_public(self.ak_key, "rsa2048:rsassa-sha256:null", AK_ATTRS)

    def enc_public(self) -> TPM2B_PUBLIC:
        auth_policy = self.enc_auth_policy
        if auth_policy is None:
            auth_policy = policy_pcr(self.pcrs)
        return tpm_public(self.enc_key, "rsa2048:null:null", self.enc_attrs, auth_policy)

    def quote(self) -> bytes:
        values = self.quote_pcrs if self.quote_pcrs is not None else self.pcrs
        selection = TPML_PCR_SELECTION.parse("sha256:" + ",".join(str(i) for i in sorted(values)))
        digest = hashlib.sha256(b"".join(values[i] for i in sorted(values))).digest()
        info = TPMU_ATTEST(
            quote=TPMS_QUOTE_INFO(pcrSelect=selection, pcrDigest=TPM2B_DIGEST(digest))
        )
        return attest(TPM2_ST.ATTEST_QUOTE, info, tpm_name(self.ak_public()))

    def certify_info(self) -> bytes:
        name = self.certify_name if self.certify_name is not None else tpm_name(self.enc_public())
        info = TPMU_ATTEST(
            certify=TPMS_CERTIFY_INFO(name=TPM2B_NAME(name), qualifiedName=TPM2B_NAME(name))
        )
        return attest(TPM2_ST.ATTEST_CERTIFY, info, tpm_name(self.ak_public()))

    def runtime(self) -> bytes:
        ak = (self.hcl_ak or self.ak_key.public_key()).public_numbers()
        doc = {
            "keys": [
                {
                    "kid": "HCLAkPub",
                    "key_ops": ["sign"],
                    "kty": "RSA",
                    "e": jwk_int(ak.e),
                    "n": jwk_int(ak.n),
                }
            ],
            "vm-configuration": {
                "console-enabled": False,
                "secure-boot": True,
                "tpm-enabled": True,
                "vmUniqueId": self.vm_id,
            },
            "user-data": "00" * 64,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    def snp_report(self, runtime: bytes) -> bytes:
        report_data = self.report_data
        if report_data is None:
            report_data = hashlib.sha256(runtime).digest() + bytes(32)
        vcek_public = self.chip.vcek.cert.public_key()
        assert isinstance(vcek_public, ec.EllipticCurvePublicKey)
        report = replace(
            snp.testbed_guest_report(self.vm_id, vcek_public),
            report_data=report_data,
            **self.report_changes,
        )
        signer = self.report_signer or self.chip.vcek.key
        assert isinstance(signer, ec.EllipticCurvePrivateKey)
        return report.signed(signer).encode()

    # --- the document -----------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        quote, certify = self.quote(), self.certify_info()
        runtime = self.runtime()
        python = self.style == "python"
        chain = self.chip.chain_pem()
        proof = {
            "SnpReport": b64url(self.snp_report(runtime)),
            "VcekCertChain": b64url(chain.encode()) if python else chain,
        }
        proof_raw = json.dumps(proof).encode()
        payload: dict[str, str] | None = None
        if self.client_payload is not None:
            payload = dict(self.client_payload)
        doc: dict[str, Any] = {
            "AttestationProtocolVersion": "2.0",
            "OSType": b64(b"Linux"),
            "OSDistro": b64(b"Ubuntu"),
            "OSVersionMajor": "22" if python else 22,
            "OSVersionMinor": "04" if python else 4,
            "OSBuild": b64(b"NotApplication"),
            "TcgLogs": b64(b"\x00" * 64),
            "TpmInfo": {
                "AikCert": b64(self.ak_cert.public_bytes(serialization.Encoding.DER)),
                "AikPub": b64(bytes(self.ak_public().marshal())),
                "PcrQuote": b64(quote),
                "PcrSignature": b64(rsassa(self.quote_signer or self.ak_key, quote)),
                "EncKeyPub": b64(bytes(self.enc_public().marshal())),
                "EncKeyCertifyInfo": b64(certify),
                "EncKeyCertifyInfoSignature": b64(
                    rsassa(self.certify_signer or self.ak_key, certify)
                ),
                "PcrSet": sorted(self.pcrs),
                "PCRs": [{"Index": i, "Digest": b64(v)} for i, v in sorted(self.pcrs.items())],
            },
            "IsolationInfo": {
                "Type": "SevSnp",
                "Evidence": {
                    "Proof": b64url(proof_raw) if python else b64(proof_raw),
                    "RunTimeData": b64url(runtime) if python else b64(runtime),
                },
            },
        }
        if payload is not None:
            doc["ClientPayload"] = payload
        return doc


def body(info: dict[str, Any]) -> dict[str, str]:
    """The request body for an AttestationInfo document."""
    return {"AttestationInfo": b64url(json.dumps(info).encode())}


def edited(info: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``info`` with the member at ``a.b.c`` set (or removed when value is ...)."""
    out = copy.deepcopy(info)
    *parents, last = path.split(".")
    node = out
    for part in parents:
        node = node[part]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return out
