"""Microsoft Azure Attestation guest attestation (``AzureGuest``) of this CVM's vTPM.

One call to :func:`attest` does what Azure's guest-attestation client does
(shared/reference/azure-protocols.md §2), and trusts nothing it has not checked:

1. Evidence from the vTPM: the HCL report (whose REPORT_DATA must bind its runtime claims, and
   whose ``HCLAkPub`` must be the AK), the AK certificate and public key, a quote of PCRs 0-7,
   and a fresh PCR-bound ephemeral key certified by the AK. The VCEK chain comes from IMDS
   (THIM), the TCG log from securityfs.
2. ``AttestationInfo`` posted to ``{maa_url}/attest/AzureGuest?api-version=2020-10-01`` over
   TLS, with bounded retries: 429 waits for Retry-After (capped), 5xx and connection failures
   back off, 400 is a refusal carrying MAA's message.
3. The answer is sealed to the ephemeral key: the TPM decrypts the AES inner key (RSAES), then
   AES-GCM with AAD ``"Transport Key"`` opens the JWT (:func:`_open_envelope`, the one place that
   handles that key; it is zeroed after use).
4. The JWT must verify against the issuer's JWKS (confinfer.token), name our ephemeral key in
   ``x-ms-runtime.keys`` and echo our client payload (the nonce and any bound data).
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from confinfer import hcl, imds, jose, log, token
from confinfer.errors import AttestationError, Reason, UsageError
from confinfer.http import MAA, Http, error_text
from confinfer.tpm import ATTESTATION_PCRS, EphemeralKey, rsa_numbers

if TYPE_CHECKING:
    from confinfer.config import Config
    from confinfer.tpm import Vtpm

LOG = logging.getLogger(__name__)

API_VERSION = "2020-10-01"
PROTOCOL_VERSION = "2.0"
TRANSPORT_KEY_AAD = b"Transport Key"
TCG_LOG = Path("/sys/kernel/security/tpm0/binary_bios_measurements")
OS_RELEASE = (Path("/etc/os-release"), Path("/usr/lib/os-release"))
OS_BUILD = "NotApplicable"  # what Azure's Linux client sends


@dataclass(frozen=True)
class AttestationResult:
    token: str
    claims: dict[str, Any]
    header: dict[str, Any]


b64 = jose.b64_encode
b64url = jose.b64url_encode


def b64_any(text: Any, what: str) -> bytes:
    """Decode base64 or base64url, padded or not (MAA's answers use either)."""
    try:
        return jose.b64_any_decode(text)
    except jose.JoseError:
        raise _bad_response(f"{what} is not base64") from None


def _bad_response(message: str) -> AttestationError:
    return AttestationError(f"MAA answer: {message}", reason=Reason.MAA_BAD_RESPONSE)


# --- evidence -------------------------------------------------------------------------------


def os_info() -> tuple[str, int, int]:
    """(distro NAME, VERSION_ID major, minor) from os-release."""
    fields: dict[str, str] = {}
    for path in OS_RELEASE:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                fields[key.strip()] = value.strip().strip("\"'")
        break
    numbers = [int(p) if p.isdigit() else 0 for p in fields.get("VERSION_ID", "0").split(".")]
    major = numbers[0] if numbers else 0
    minor = numbers[1] if len(numbers) > 1 else 0
    return fields.get("NAME", "Linux"), major, minor


def tcg_log(path: Path = TCG_LOG) -> bytes:
    """The firmware's TCG event log, or nothing where securityfs does not expose it."""
    try:
        return path.read_bytes()
    except OSError as exc:
        LOG.debug("no TCG log at %s: %s", path, exc.strerror)
        return b""


def _check_ak_binding(report: hcl.HclReport, ak_public: bytes) -> None:
    jwk = report.runtime_key("HCLAkPub")
    n, e = rsa_numbers(ak_public)
    if jwk is None or jose.rsa_numbers(jwk) != (n, e):
        raise AttestationError(
            "the HCL report's HCLAkPub is not the vTPM's AK at 0x81000003",
            reason=Reason.HCL_AK_MISMATCH,
        )


def _client_payload(nonce: bytes, bound_data: Mapping[str, str] | None) -> dict[str, str]:
    """Values base64-encoded as Azure's client library sends them."""
    payload = {"nonce": b64(nonce)}
    for key, value in (bound_data or {}).items():
        if key == "nonce":
            raise UsageError("bound data cannot use the key 'nonce'", reason=Reason.USAGE)
        if not isinstance(key, str) or not isinstance(value, str):
            raise UsageError("bound data keys and values must be strings", reason=Reason.USAGE)
        payload[key] = b64(value.encode("utf-8"))
    return payload


def attestation_info(
    *,
    report: hcl.HclReport,
    vcek_chain_pem: str,
    ak_cert: bytes,
    ak_public: bytes,
    quote_attest: bytes,
    quote_signature: bytes,
    pcrs: Mapping[int, bytes],
    key: EphemeralKey,
    client_payload: Mapping[str, str],
    tcg_log_bytes: bytes,
    distro: tuple[str, int, int],
) -> dict[str, Any]:
    """The AttestationInfo document, field for field as Azure's client builds it."""
    proof = json.dumps({"SnpReport": b64url(report.snp_report), "VcekCertChain": vcek_chain_pem})
    name, major, minor = distro
    return {
        "AttestationProtocolVersion": PROTOCOL_VERSION,
        "OSType": b64(b"Linux"),
        "OSDistro": b64(name.encode("utf-8")),
        "OSVersionMajor": major,
        "OSVersionMinor": minor,
        "OSBuild": b64(OS_BUILD.encode("ascii")),
        "TcgLogs": b64(tcg_log_bytes),
        "ClientPayload": dict(client_payload),
        "TpmInfo": {
            "AikCert": b64(ak_cert),
            "AikPub": b64(ak_public),
            "PcrQuote": b64(quote_attest),
            "PcrSignature": b64(quote_signature),
            "EncKeyPub": b64(key.public),
            "EncKeyCertifyInfo": b64(key.certify_info),
            "EncKeyCertifyInfoSignature": b64(key.certify_signature),
            "PcrSet": sorted(pcrs),
            "PCRs": [{"Index": i, "Digest": b64(pcrs[i])} for i in sorted(pcrs)],
        },
        "IsolationInfo": {
            "Type": "SevSnp",
            "Evidence": {
                "Proof": b64(proof.encode("utf-8")),
                "RunTimeData": b64(report.runtime_data),
            },
        },
    }


# --- the answer -----------------------------------------------------------------------------


def _open_envelope(vtpm: Vtpm, key: EphemeralKey, token_field: Any) -> str:
    """Open MAA's sealed answer: TPM-decrypt the AES inner key, then AES-GCM the JWT.

    The inner key exists in this process only inside this function and is zeroed before it
    returns, whatever happens.
    """
    try:
        envelope = json.loads(b64_any(token_field, "token"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _bad_response("token is not a sealed JSON envelope") from None
    if not isinstance(envelope, dict):
        raise _bad_response("token is not a sealed JSON envelope")
    params = envelope.get("EncryptionParams")
    if not isinstance(params, dict):
        raise _bad_response("EncryptionParams is missing")
    if (
        params.get("Cipher", "AES") != "AES"
        or params.get("BlockMode", "ChainingModeGCM") != "ChainingModeGCM"
    ):
        raise _bad_response(f"unsupported cipher {params.get('Cipher')}/{params.get('BlockMode')}")
    bits = params.get("KeySizeInBits")
    if isinstance(bits, str) and bits.isdigit():
        bits = int(bits)
    iv = b64_any(params.get("Iv"), "EncryptionParams.Iv")
    ciphertext = b64_any(envelope.get("Jwt"), "Jwt")
    tag = b64_any(envelope.get("AuthenticationData"), "AuthenticationData")
    wrapped = b64_any(envelope.get("EncryptedInnerKey"), "EncryptedInnerKey")
    if len(tag) != 16 or not 8 <= len(iv) <= 128:
        raise _bad_response(f"GCM tag of {len(tag)} bytes or IV of {len(iv)} bytes")
    inner = vtpm.decrypt_rsaes(wrapped, key=key)
    try:
        if len(inner) not in (16, 24, 32) or (bits is not None and bits != len(inner) * 8):
            raise _bad_response(f"inner key of {len(inner) * 8} bits (KeySizeInBits {bits})")
        try:
            plain = AESGCM(inner).decrypt(iv, ciphertext + tag, TRANSPORT_KEY_AAD)
        except InvalidTag:
            raise AttestationError(
                "MAA answer does not decrypt (authentication failed)",
                reason=Reason.MAA_RESPONSE_INTEGRITY,
            ) from None
    finally:
        inner[:] = bytes(len(inner))
    try:
        return plain.decode("ascii")
    except UnicodeDecodeError:
        raise _bad_response("the decrypted token is not ASCII") from None


def _check_binding(
    claims: Mapping[str, Any], key: EphemeralKey, payload: Mapping[str, str]
) -> None:
    runtime = claims.get("x-ms-runtime")
    if not isinstance(runtime, Mapping):
        raise AttestationError("token lacks x-ms-runtime", reason=Reason.MAA_TOKEN_UNBOUND)
    keys = runtime.get("keys")
    ours = False
    for jwk in keys if isinstance(keys, list) else []:
        if not isinstance(jwk, Mapping) or jwk.get("kty") != "RSA":
            continue
        if jose.rsa_numbers(jwk) == (key.n, key.e):
            ours = True
            break
    if not ours:
        raise AttestationError(
            "token's x-ms-runtime.keys does not hold this attestation's ephemeral key",
            reason=Reason.MAA_TOKEN_UNBOUND,
        )
    echoed = runtime.get("client-payload")
    echoed = echoed if isinstance(echoed, Mapping) else {}
    for name, sent in payload.items():
        # MAA echoes a value as sent or base64-encodes it again; both bind our value.
        if echoed.get(name) not in (sent, b64(sent.encode("ascii"))):
            raise AttestationError(
                f"token's client payload does not echo our {name}",
                reason=Reason.MAA_TOKEN_UNBOUND,
            )


def attest(
    vtpm: Vtpm,
    cfg: Config,
    *,
    nonce: bytes | None = None,
    bound_data: Mapping[str, str] | None = None,
    http: Http | None = None,
) -> AttestationResult:
    """Guest attestation with MAA; returns the verified token, its claims and header.

    Steps timed (confinfer.log.step): ``tpm`` (vTPM calls), ``imds-thim`` (the VCEK chain)
    and ``maa`` (the rest: the round trip, opening the answer, verifying the token).
    """
    with contextlib.ExitStack() as stack:
        session = http if http is not None else stack.enter_context(Http(cfg))
        with log.step("maa"):
            return _attest(vtpm, cfg, session, nonce, bound_data)


def _attest(
    vtpm: Vtpm,
    cfg: Config,
    http: Http,
    nonce: bytes | None,
    bound_data: Mapping[str, str] | None,
) -> AttestationResult:
    nonce = secrets.token_bytes(32) if nonce is None else nonce
    payload = _client_payload(nonce, bound_data)

    with log.step("tpm"):
        report = hcl.parse(vtpm.hcl_report())
        report.check_binding()
        ak_public = vtpm.ak_public()
        _check_ak_binding(report, ak_public)
        ak_cert = vtpm.ak_cert()
        quote = vtpm.quote(ATTESTATION_PCRS, b"")
        key = vtpm.ephemeral_key()
    chain = imds.vcek_chain(http, cfg)
    info = attestation_info(
        report=report,
        vcek_chain_pem=chain,
        ak_cert=ak_cert,
        ak_public=ak_public,
        quote_attest=quote.attest,
        quote_signature=quote.signature,
        pcrs=quote.pcrs,
        key=key,
        client_payload=payload,
        tcg_log_bytes=tcg_log(),
        distro=os_info(),
    )
    body = json.dumps({"AttestationInfo": b64url(json.dumps(info).encode("utf-8"))})

    url = f"{cfg.maa_url.rstrip('/')}/attest/AzureGuest?api-version={API_VERSION}"
    reply = http.request(
        "POST",
        url,
        service=MAA,
        body=body.encode("utf-8"),
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    if reply.status != 200:
        raise AttestationError(
            f"MAA refused the evidence (HTTP {reply.status}): {error_text(reply)}",
            reason=Reason.MAA_REFUSED,
        )
    try:
        answer = reply.json()
    except ValueError:
        raise _bad_response("not JSON") from None
    if not isinstance(answer, dict) or "token" not in answer:
        raise _bad_response("no token")
    with log.step("tpm"):
        jwt = _open_envelope(vtpm, key, answer["token"])
    verified = token.verify(jwt, cfg, http=http)
    _check_binding(verified.claims, key, payload)
    LOG.info("attested with %s (token expires %s)", verified.issuer, verified.claims.get("exp"))
    return AttestationResult(token=jwt, claims=verified.claims, header=verified.header)
