"""MAA ``AzureGuest`` evidence: decoding the AttestationInfo document and verifying it.

What is checked is what Azure Attestation checks for an SEV-SNP confidential VM with a vTPM
(shared/reference/azure-protocols.md §1-2): the AK certificate chains to the vTPM CA and names
the AK; the PCR quote is an AK-signed TPMS_ATTEST over exactly the PCRs sent; the SNP report is
signed by a VCEK that chains to the AMD root and binds the HCL runtime data, which names the AK;
the ephemeral encryption key is a PCR-bound TPM decrypt key certified by the AK.

Every failure raises :class:`EvidenceError` with a code and a one-line message naming the field
and what is wrong with it, as the service returns it.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from testbed import snp as snpreport
from testbed import tpmstruct
from testbed.pki import Trust
from testbed.tpmstruct import Alg, ObjectAttr, RsaPublic, StAttest

MALFORMED = "InvalidParameter"  # the request or a field is not what the protocol says
REJECTED = "EvidenceVerificationFailed"  # well-formed evidence that does not verify
POLICY = "PolicyEvaluationError"  # verified evidence that the attestation policy refuses

PROTOCOL_VERSION = "2.0"
ENC_KEY_ATTRS = (
    ObjectAttr.DECRYPT | ObjectAttr.FIXED_TPM | ObjectAttr.FIXED_PARENT | (ObjectAttr.NO_DA)
)


class EvidenceError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class MaaPolicy:
    """What the attestation provider accepts, and how long its tokens live."""

    ak_roots: tuple[x509.Certificate, ...]
    amd_root: x509.Certificate
    launch_measurements: frozenset[bytes] | None = None  # None: accept any, report it
    allow_debug: bool = False
    required_pcrs: tuple[int, ...] = tuple(range(8))
    pcr_bound_enc_key: bool = True  # EncKeyPub.authPolicy must be PolicyPCR over the quote
    token_lifetime: dt.timedelta = dt.timedelta(hours=8)

    @classmethod
    def for_trust(cls, trust: Trust, **overrides: Any) -> MaaPolicy:
        """The default policy of a testbed: its vTPM CA and AMD root, any launch measurement."""
        return cls(ak_roots=(trust.vtpm_ca.cert,), amd_root=trust.ark.cert, **overrides)

    def text(self) -> str:
        """A canonical statement of the policy; its hash is the token's x-ms-policy-hash."""
        doc = {
            "ak-roots": sorted(c.fingerprint(hashes.SHA256()).hex() for c in self.ak_roots),
            "amd-root": self.amd_root.fingerprint(hashes.SHA256()).hex(),
            "launch-measurements": None
            if self.launch_measurements is None
            else sorted(m.hex() for m in self.launch_measurements),
            "allow-debug": self.allow_debug,
            "required-pcrs": list(self.required_pcrs),
            "pcr-bound-enc-key": self.pcr_bound_enc_key,
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class SnpEvidence:
    report: snpreport.SnpReport
    runtime: dict[str, Any]  # the HCL runtime JSON, as sent


@dataclass(frozen=True)
class GuestEvidence:
    """Verified AzureGuest evidence: what the token is made from."""

    protocol_version: str
    os_type: str
    os_distro: str
    os_version_major: int
    os_version_minor: int
    os_build: str
    pcrs: dict[int, bytes]
    ak: RsaPublic
    enc_key: RsaPublic
    snp: SnpEvidence
    client_payload: dict[str, Any] = field(default_factory=dict)  # as sent


# --- decoding -------------------------------------------------------------------------------

_STD = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")


def _malformed(message: str) -> EvidenceError:
    return EvidenceError(MALFORMED, message)


def b64_std(value: object, name: str) -> bytes:
    """Standard base64 with padding, as both MAA clients send TPM fields."""
    if not isinstance(value, str):
        raise _malformed(f"{name} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise _malformed(f"{name} is not valid base64") from None


def b64_any(value: object, name: str) -> bytes:
    """Base64 or base64url, padded or not: the fields where the two MAA clients differ."""
    if not isinstance(value, str):
        raise _malformed(f"{name} must be a base64 or base64url string")
    if _STD.fullmatch(value):
        text = value
    elif _URL.fullmatch(value):
        text = value.replace("-", "+").replace("_", "/")
    else:
        raise _malformed(f"{name} is not valid base64 or base64url")
    text = text.rstrip("=")
    if len(text) % 4 == 1:
        raise _malformed(f"{name} is not valid base64 or base64url")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        raise _malformed(f"{name} is not valid base64 or base64url") from None


def _json_object(data: bytes, name: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise _malformed(f"{name} does not decode to JSON") from None
    if not isinstance(doc, dict):
        raise _malformed(f"{name} does not decode to a JSON object")
    return doc


def _member(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], name: str) -> Any:
    if key not in obj:
        raise _malformed(f"{name}.{key} is missing")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        want = " or ".join(_JSON_NAMES[k] for k in kinds)
        raise _malformed(f"{name}.{key} must be {want}")
    return value


_JSON_NAMES: dict[type, str] = {
    str: "a string",
    int: "an integer",
    dict: "an object",
    list: "an array",
    bool: "a boolean",
}


def _text(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed(f"{name} is not base64 of UTF-8 text") from None


def _version_number(value: int | str, name: str) -> int:
    if isinstance(value, int):
        number = value
    elif value.isdecimal():
        number = int(value)
    else:
        raise _malformed(f"{name} must be an integer or a decimal string")
    if number < 0:
        raise _malformed(f"{name} must not be negative")
    return number


def decode_attestation_info(body: object) -> dict[str, Any]:
    """The AttestationInfo document inside a request body."""
    if not isinstance(body, dict):
        raise _malformed("request body is not a JSON object")
    if "AttestationInfo" not in body:
        raise _malformed("request body lacks AttestationInfo")
    raw = b64_any(body["AttestationInfo"], "AttestationInfo")
    return _json_object(raw, "AttestationInfo")


# --- TPM evidence ---------------------------------------------------------------------------


def _parse_public(raw: bytes, name: str) -> RsaPublic:
    try:
        return tpmstruct.parse_public(raw)
    except tpmstruct.TpmFormatError as exc:
        raise _malformed(f"{name} is not a valid RSA TPM2B_PUBLIC: {exc}") from None


def _parse_aik_pub(raw: bytes) -> RsaPublic:
    """``TpmInfo.AikPub``: a TPM2B_PUBLIC, possibly followed by more bytes.

    The C++ client sends the TPM2B_PUBLIC alone; Microsoft's Python client sends the whole
    TPM2_ReadPublic response (``TPM2B_PUBLIC || TPM2B_NAME name || TPM2B_NAME qualifiedName``),
    which MAA accepts. The leading TPM2B_PUBLIC is what is verified; the rest is ignored.
    """
    try:
        public, _ = tpmstruct.parse_public_prefix(raw)
    except tpmstruct.TpmFormatError as exc:
        message = f"TpmInfo.AikPub does not begin with a valid RSA TPM2B_PUBLIC: {exc}"
        raise _malformed(message) from None
    return public


def _parse_attest(raw: bytes, name: str, want: StAttest) -> tpmstruct.Attest:
    try:
        attest = tpmstruct.parse_attest(raw)
    except tpmstruct.TpmFormatError as exc:
        raise _malformed(f"{name} is not a valid TPMS_ATTEST: {exc}") from None
    if attest.type != want:
        raise EvidenceError(
            REJECTED,
            f"{name} is of type {tpmstruct.attest_type_name(attest.type)}, "
            f"not {tpmstruct.attest_type_name(want)}",
        )
    return attest


def _verify_ak_signature(
    ak: RsaPublic, signed: bytes, sig: bytes, sig_name: str, signed_name: str
) -> None:
    """An RSASSA-SHA256 signature by the AK, sent raw or as a TPMT_SIGNATURE."""
    if len(sig) != len(ak.modulus):
        try:
            parsed = tpmstruct.parse_signature(sig)
        except tpmstruct.TpmFormatError as exc:
            raise _malformed(
                f"{sig_name} is neither a raw {ak.key_bits}-bit RSA signature nor a "
                f"TPMT_SIGNATURE: {exc}"
            ) from None
        if parsed.sig_alg != Alg.RSASSA or parsed.hash_alg != Alg.SHA256:
            raise EvidenceError(
                REJECTED,
                f"{sig_name} is a {tpmstruct.alg_name(parsed.sig_alg)}/"
                f"{tpmstruct.alg_name(parsed.hash_alg)} signature, not RSASSA/SHA256",
            )
        sig = parsed.sig
    try:
        ak.public_key().verify(sig, signed, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise EvidenceError(
            REJECTED,
            f"{sig_name} is not a valid RSASSA-SHA256 signature by AikPub over {signed_name}",
        ) from None


def _verify_ak(tpm: dict[str, Any], policy: MaaPolicy, now: dt.datetime) -> RsaPublic:
    where = "TpmInfo"
    der = b64_std(_member(tpm, "AikCert", str, where), "TpmInfo.AikCert")
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        raise _malformed("TpmInfo.AikCert is not a DER X.509 certificate") from None
    for root in policy.ak_roots:
        try:
            cert.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        break
    else:
        raise EvidenceError(
            REJECTED,
            f"TpmInfo.AikCert is not issued by a trusted vTPM CA "
            f"(issuer {cert.issuer.rfc4514_string()})",
        )
    if now < cert.not_valid_before_utc:
        raise EvidenceError(
            REJECTED,
            f"TpmInfo.AikCert is not valid before {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}",
        )
    if now > cert.not_valid_after_utc:
        raise EvidenceError(
            REJECTED, f"TpmInfo.AikCert expired at {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
        )

    ak = _parse_aik_pub(b64_std(_member(tpm, "AikPub", str, where), "TpmInfo.AikPub"))
    cert_key = cert.public_key()
    if not isinstance(cert_key, rsa.RSAPublicKey) or (
        cert_key.public_numbers() != ak.public_key().public_numbers()
    ):
        raise EvidenceError(REJECTED, "TpmInfo.AikPub is not the key certified by TpmInfo.AikCert")
    if not ak.has(ObjectAttr.RESTRICTED | ObjectAttr.SIGN_ENCRYPT) or ak.has(ObjectAttr.DECRYPT):
        raise EvidenceError(REJECTED, "TpmInfo.AikPub is not a restricted signing key")
    if not ak.has(ObjectAttr.FIXED_TPM):
        raise EvidenceError(REJECTED, "TpmInfo.AikPub is not fixedTPM")
    return ak


def _pcr_set(tpm: dict[str, Any], policy: MaaPolicy) -> tuple[int, ...]:
    raw = _member(tpm, "PcrSet", list, "TpmInfo")
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 24 for i in raw):
        raise _malformed("TpmInfo.PcrSet must list PCR indices 0-23")
    if len(set(raw)) != len(raw):
        raise _malformed("TpmInfo.PcrSet lists a PCR twice")
    pcr_set = tuple(sorted(raw))
    missing = [i for i in policy.required_pcrs if i not in pcr_set]
    if missing:
        raise EvidenceError(
            POLICY, f"TpmInfo.PcrSet lacks PCR {missing[0]}, which the policy requires"
        )
    return pcr_set


def _pcr_values(tpm: dict[str, Any], pcr_set: tuple[int, ...]) -> dict[int, bytes]:
    entries = _member(tpm, "PCRs", list, "TpmInfo")
    values: dict[int, bytes] = {}
    for i, entry in enumerate(entries):
        name = f"TpmInfo.PCRs[{i}]"
        if not isinstance(entry, dict):
            raise _malformed(f"{name} must be an object")
        index = _member(entry, "Index", int, name)
        value = b64_std(_member(entry, "Digest", str, name), f"{name}.Digest")
        if len(value) != 32:
            raise _malformed(f"{name}.Digest is {len(value)} bytes, not a SHA-256 PCR value")
        if index in values:
            raise _malformed(f"TpmInfo.PCRs lists PCR {index} twice")
        if index not in pcr_set:
            raise _malformed(f"TpmInfo.PCRs has PCR {index}, which TpmInfo.PcrSet does not name")
        values[index] = value
    for index in pcr_set:
        if index not in values:
            raise _malformed(f"TpmInfo.PCRs lacks PCR {index} named in TpmInfo.PcrSet")
    return dict(sorted(values.items()))


def _verify_quote(
    tpm: dict[str, Any], ak: RsaPublic, policy: MaaPolicy
) -> tuple[dict[int, bytes], tpmstruct.PcrSelection]:
    quote_raw = b64_std(_member(tpm, "PcrQuote", str, "TpmInfo"), "TpmInfo.PcrQuote")
    sig = b64_std(_member(tpm, "PcrSignature", str, "TpmInfo"), "TpmInfo.PcrSignature")
    quote = _parse_attest(quote_raw, "TpmInfo.PcrQuote", StAttest.QUOTE)
    _verify_ak_signature(ak, quote_raw, sig, "TpmInfo.PcrSignature", "TpmInfo.PcrQuote")
    if quote.quote is None:  # parse_attest fills it for every QUOTE
        raise _malformed("TpmInfo.PcrQuote carries no TPMS_QUOTE_INFO")

    pcr_set = _pcr_set(tpm, policy)
    selected = [s for s in quote.quote.selections if s.pcrs]
    if len(selected) != 1 or selected[0].hash_alg != Alg.SHA256 or selected[0].pcrs != pcr_set:
        shown = (
            ", ".join(f"{tpmstruct.alg_name(s.hash_alg)}:{list(s.pcrs)}" for s in selected)
            or "nothing"
        )
        raise EvidenceError(
            REJECTED,
            f"TpmInfo.PcrQuote selects {shown}, not SHA256:{list(pcr_set)} from TpmInfo.PcrSet",
        )
    values = _pcr_values(tpm, pcr_set)
    if hashlib.sha256(b"".join(values.values())).digest() != quote.quote.pcr_digest:
        raise EvidenceError(
            REJECTED, "TpmInfo.PcrQuote pcrDigest does not match the values in TpmInfo.PCRs"
        )
    return values, selected[0]


def _verify_enc_key(
    tpm: dict[str, Any],
    ak: RsaPublic,
    policy: MaaPolicy,
    pcrs: dict[int, bytes],
    selection: tpmstruct.PcrSelection,
) -> RsaPublic:
    enc = _parse_public(
        b64_std(_member(tpm, "EncKeyPub", str, "TpmInfo"), "TpmInfo.EncKeyPub"), "TpmInfo.EncKeyPub"
    )
    if enc.key_bits != 2048:
        raise EvidenceError(REJECTED, f"TpmInfo.EncKeyPub is RSA-{enc.key_bits}, not RSA-2048")
    if not enc.has(ObjectAttr.DECRYPT) or enc.attributes & (
        ObjectAttr.SIGN_ENCRYPT | ObjectAttr.RESTRICTED
    ):
        raise EvidenceError(REJECTED, "TpmInfo.EncKeyPub is not an unrestricted decrypt-only key")
    if not enc.has(ObjectAttr.FIXED_TPM | ObjectAttr.FIXED_PARENT):
        raise EvidenceError(REJECTED, "TpmInfo.EncKeyPub is not fixedTPM and fixedParent")
    if not enc.has(ObjectAttr.NO_DA):
        raise EvidenceError(REJECTED, "TpmInfo.EncKeyPub is not noDA")
    if enc.scheme not in (Alg.NULL, Alg.RSAES):
        raise EvidenceError(
            REJECTED,
            f"TpmInfo.EncKeyPub scheme {tpmstruct.alg_name(enc.scheme)} does not allow RSAES",
        )
    if not enc.auth_policy:
        raise EvidenceError(REJECTED, "TpmInfo.EncKeyPub has no authPolicy")
    if policy.pcr_bound_enc_key:
        if enc.has(ObjectAttr.USER_WITH_AUTH):
            raise EvidenceError(
                REJECTED, "TpmInfo.EncKeyPub is userWithAuth: its authValue bypasses its policy"
            )
        expected = tpmstruct.policy_pcr_digest(
            enc.name_alg, tuple(pcrs), list(pcrs.values()), selection.size_of_select
        )
        if enc.auth_policy != expected:
            raise EvidenceError(
                REJECTED,
                "TpmInfo.EncKeyPub authPolicy is not PolicyPCR over the quoted PCR values",
            )

    info_raw = b64_std(
        _member(tpm, "EncKeyCertifyInfo", str, "TpmInfo"), "TpmInfo.EncKeyCertifyInfo"
    )
    sig = b64_std(
        _member(tpm, "EncKeyCertifyInfoSignature", str, "TpmInfo"),
        "TpmInfo.EncKeyCertifyInfoSignature",
    )
    info = _parse_attest(info_raw, "TpmInfo.EncKeyCertifyInfo", StAttest.CERTIFY)
    _verify_ak_signature(
        ak, info_raw, sig, "TpmInfo.EncKeyCertifyInfoSignature", "TpmInfo.EncKeyCertifyInfo"
    )
    if info.certify is None:  # parse_attest fills it for every CERTIFY
        raise _malformed("TpmInfo.EncKeyCertifyInfo carries no TPMS_CERTIFY_INFO")
    if info.certify.name != enc.name:
        raise EvidenceError(
            REJECTED, "TpmInfo.EncKeyCertifyInfo certifies another object, not TpmInfo.EncKeyPub"
        )
    return enc


# --- SEV-SNP evidence -----------------------------------------------------------------------


def _vcek_chain(value: object) -> list[x509.Certificate]:
    name = "VcekCertChain"
    if not isinstance(value, str):
        raise _malformed(f"{name} must be a PEM string or base64url of one")
    pem = value.encode() if "-----BEGIN" in value else b64_any(value, name)
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise _malformed(f"{name} does not hold PEM certificates") from None


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _check_validity(cert: x509.Certificate, what: str, now: dt.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise EvidenceError(
            REJECTED, f"{what} is not valid before {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}"
        )
    if now > cert.not_valid_after_utc:
        raise EvidenceError(
            REJECTED, f"{what} expired at {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
        )


def _verify_vcek_chain(
    chain: list[x509.Certificate], ark: x509.Certificate, now: dt.datetime
) -> ec.EllipticCurvePublicKey:
    """Check ``[VCEK, ASK]`` or ``[VCEK, ASK, ARK]`` against the trusted ARK; the VCEK key."""
    if len(chain) not in (2, 3):
        raise _malformed(
            f"VcekCertChain holds {len(chain)} certificates; want VCEK, ASK and optionally ARK"
        )
    vcek, ask = chain[0], chain[1]
    if len(chain) == 3 and chain[2].public_key() != ark.public_key():
        raise EvidenceError(
            REJECTED, "VcekCertChain ends in an ARK that is not the trusted AMD root"
        )
    if not _issued_by(ask, ark):
        raise EvidenceError(REJECTED, "ASK in VcekCertChain is not signed by the trusted AMD root")
    if not _issued_by(vcek, ask):
        raise EvidenceError(REJECTED, "VCEK in VcekCertChain is not signed by the ASK")
    _check_validity(ask, "ASK in VcekCertChain", now)
    _check_validity(vcek, "VCEK in VcekCertChain", now)
    key = vcek.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise EvidenceError(REJECTED, "VCEK in VcekCertChain does not hold a P-384 key")
    return key


def verify_snp(
    proof: dict[str, Any], runtime_raw: bytes, policy: MaaPolicy, now: dt.datetime
) -> SnpEvidence:
    """Verify an SNP report, its VCEK chain and its binding to the HCL runtime data."""
    where = "IsolationInfo.Evidence.Proof"
    report_raw = b64_any(_member(proof, "SnpReport", str, where), "SnpReport")
    if len(report_raw) != snpreport.REPORT_SIZE:
        raise _malformed(f"SnpReport is {len(report_raw)} bytes, not {snpreport.REPORT_SIZE}")
    vcek = _verify_vcek_chain(
        _vcek_chain(_member(proof, "VcekCertChain", str, where)), policy.amd_root, now
    )
    report = snpreport.parse_report(report_raw)
    if report.signature_algo != snpreport.SIG_ALGO_ECDSA_P384_SHA384:
        raise EvidenceError(
            REJECTED,
            f"SnpReport signature algorithm {report.signature_algo} is not ECDSA P-384 SHA-384",
        )
    try:
        snpreport.verify_report_signature(report_raw, vcek)
    except snpreport.SnpReportError:
        raise EvidenceError(REJECTED, "SnpReport signature does not verify with the VCEK") from None

    if report.is_debuggable and not policy.allow_debug:
        raise EvidenceError(POLICY, "SnpReport guest policy allows debugging (policy bit 19)")
    if report.vmpl != 0:
        raise EvidenceError(POLICY, f"SnpReport was produced at VMPL {report.vmpl}, not VMPL 0")
    if policy.launch_measurements is not None and (
        report.measurement not in policy.launch_measurements
    ):
        raise EvidenceError(
            POLICY,
            f"SnpReport launch measurement {report.measurement.hex()} is not accepted by policy",
        )

    if report.report_data[:32] != hashlib.sha256(runtime_raw).digest():
        raise EvidenceError(
            REJECTED, "SnpReport REPORT_DATA[0:32] is not the SHA-256 of RunTimeData"
        )
    if any(report.report_data[32:]):
        raise EvidenceError(REJECTED, "SnpReport REPORT_DATA[32:64] is not zero")
    runtime = _json_object(runtime_raw, "RunTimeData")
    if not isinstance(runtime.get("vm-configuration", {}), dict):
        raise _malformed("RunTimeData.vm-configuration must be an object")
    return SnpEvidence(report, runtime)


def _jwk_int(value: object, name: str) -> int:
    return int.from_bytes(b64_any(value, name), "big")


def _check_hcl_ak(runtime: dict[str, Any], ak: RsaPublic) -> None:
    keys = _member(runtime, "keys", list, "RunTimeData")
    hcl = [k for k in keys if isinstance(k, dict) and k.get("kid") == "HCLAkPub"]
    if len(hcl) != 1:
        raise EvidenceError(REJECTED, "RunTimeData.keys has no single HCLAkPub key")
    jwk = hcl[0]
    n = _jwk_int(_member(jwk, "n", str, "RunTimeData HCLAkPub"), "RunTimeData HCLAkPub.n")
    e = _jwk_int(_member(jwk, "e", str, "RunTimeData HCLAkPub"), "RunTimeData HCLAkPub.e")
    if n != int.from_bytes(ak.modulus, "big") or e != ak.exponent:
        raise EvidenceError(REJECTED, "RunTimeData HCLAkPub is not TpmInfo.AikPub")


def _client_payload(info: dict[str, Any]) -> dict[str, Any]:
    """``ClientPayload``: a JSON object whose values may be any JSON (the C++ client sends
    base64 strings, Microsoft's Python client sends its claims raw, nested objects included).
    It is echoed into the token as sent."""
    value = info.get("ClientPayload")
    if value is None:
        return {}
    if isinstance(value, str):  # some clients send the object serialised
        try:
            value = json.loads(value) if value else {}
        except ValueError:
            raise _malformed("ClientPayload is not a JSON object") from None
    if not isinstance(value, dict):
        raise _malformed("ClientPayload is not a JSON object")
    return dict(value)


# --- the whole document ---------------------------------------------------------------------


def verify_guest(info: dict[str, Any], policy: MaaPolicy, now: dt.datetime) -> GuestEvidence:
    """Verify a decoded AttestationInfo document."""
    top = "AttestationInfo"
    version = _member(info, "AttestationProtocolVersion", str, top)
    if version != PROTOCOL_VERSION:
        raise _malformed(
            f"AttestationProtocolVersion {version!r} is not supported (want {PROTOCOL_VERSION})"
        )
    os_type = _text(b64_std(_member(info, "OSType", str, top), "OSType"), "OSType")
    os_distro = _text(b64_std(_member(info, "OSDistro", str, top), "OSDistro"), "OSDistro")
    os_build = _text(b64_std(_member(info, "OSBuild", str, top), "OSBuild"), "OSBuild")
    major = _version_number(_member(info, "OSVersionMajor", (int, str), top), "OSVersionMajor")
    minor = _version_number(_member(info, "OSVersionMinor", (int, str), top), "OSVersionMinor")
    b64_std(_member(info, "TcgLogs", str, top), "TcgLogs")
    client_payload = _client_payload(info)

    tpm = _member(info, "TpmInfo", dict, top)
    ak = _verify_ak(tpm, policy, now)
    pcrs, selection = _verify_quote(tpm, ak, policy)
    enc_key = _verify_enc_key(tpm, ak, policy, pcrs, selection)

    isolation = _member(info, "IsolationInfo", dict, top)
    kind = _member(isolation, "Type", str, "IsolationInfo")
    if kind != "SevSnp":
        raise _malformed(f"IsolationInfo.Type {kind!r} is not supported (want 'SevSnp')")
    evidence = _member(isolation, "Evidence", dict, "IsolationInfo")
    proof_raw = b64_any(
        _member(evidence, "Proof", str, "IsolationInfo.Evidence"), "IsolationInfo.Evidence.Proof"
    )
    proof = _json_object(proof_raw, "IsolationInfo.Evidence.Proof")
    runtime_raw = b64_any(
        _member(evidence, "RunTimeData", str, "IsolationInfo.Evidence"),
        "IsolationInfo.Evidence.RunTimeData",
    )
    snp = verify_snp(proof, runtime_raw, policy, now)
    _check_hcl_ak(snp.runtime, ak)

    return GuestEvidence(
        protocol_version=version,
        os_type=os_type,
        os_distro=os_distro,
        os_version_major=major,
        os_version_minor=minor,
        os_build=os_build,
        pcrs=pcrs,
        ak=ak,
        enc_key=enc_key,
        snp=snp,
        client_payload=client_payload,
    )
