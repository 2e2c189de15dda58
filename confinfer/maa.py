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

import base64
import binascii
import email.utils
import json
import logging
import random
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from confinfer import hcl, token
from confinfer.errors import AttestationError, Reason, ServiceError, UsageError
from confinfer.tpm import ATTESTATION_PCRS, EphemeralKey, rsa_numbers

if TYPE_CHECKING:
    import requests

    from confinfer.config import Config
    from confinfer.tpm import Vtpm

LOG = logging.getLogger("confinfer.maa")

API_VERSION = "2020-10-01"
PROTOCOL_VERSION = "2.0"
TRANSPORT_KEY_AAD = b"Transport Key"
THIM_PATH = "/metadata/THIM/amd/certification"
TCG_LOG = Path("/sys/kernel/security/tpm0/binary_bios_measurements")
OS_RELEASE = (Path("/etc/os-release"), Path("/usr/lib/os-release"))
OS_BUILD = "NotApplicable"  # what Azure's Linux client sends
RETRY_AFTER_CAP_S = 30.0
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 8.0
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_B64 = re.compile(r"[A-Za-z0-9+/_-]*={0,2}")


@dataclass(frozen=True)
class AttestationResult:
    token: str
    claims: dict[str, Any]
    header: dict[str, Any]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64_any(text: Any, what: str) -> bytes:
    """Decode base64 or base64url, padded or not (MAA's answers use either)."""
    if not isinstance(text, str) or not _B64.fullmatch(text):
        raise _bad_response(f"{what} is not base64")
    body = text.rstrip("=").replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise _bad_response(f"{what} is not base64") from None


def _bad_response(message: str) -> AttestationError:
    return AttestationError(f"MAA answer: {message}", reason=Reason.MAA_BAD_RESPONSE)


# --- HTTP with bounded retries --------------------------------------------------------------


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), capped."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, min(seconds, RETRY_AFTER_CAP_S))


def _backoff(attempt: int) -> float:
    # Full jitter keeps a fleet of VMs that lost MAA at once from retrying in lockstep.
    jitter = random.uniform(0.5, 1.0)  # noqa: S311 - spreading retries, not a secret
    return jitter * min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2.0**attempt)


def send(
    http: requests.Session,
    method: str,
    url: str,
    *,
    cfg: Config,
    service: str,
    sleep: Callable[[float], None] = time.sleep,
    **kwargs: Any,
) -> requests.Response:
    """One HTTP exchange, retried on 408/429/5xx and connection failures (bounded).

    Returns the first answer that is not retryable (the caller judges its status); raises
    ServiceError ``<service>-unavailable`` when every attempt failed, ``<service>-tls`` when
    the peer's certificate is not trusted (never retried).
    """
    import requests

    attempts = cfg.max_retries + 1
    verify: bool | str = str(cfg.ca_bundle) if cfg.ca_bundle else True
    last = "no attempt"
    for attempt in range(attempts):
        try:
            reply = http.request(method, url, timeout=cfg.http_timeout_s, verify=verify,
                                 allow_redirects=False, **kwargs)
        except requests.exceptions.SSLError as exc:
            raise ServiceError(
                f"{service} at {url}: TLS verification failed ({exc.__class__.__name__})",
                reason=Reason(f"{service}-tls"),
                hint="set ca_bundle (CONFINFER_CA_BUNDLE) to the CA that issued its certificate",
            ) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            last, delay = exc.__class__.__name__, _backoff(attempt)
        else:
            if reply.status_code not in _RETRY_STATUS:
                return reply
            last = f"HTTP {reply.status_code}"
            hinted = _retry_after(reply.headers.get("Retry-After"))
            delay = hinted if hinted is not None else _backoff(attempt)
            reply.close()
        if attempt + 1 < attempts:
            LOG.info("%s: %s; retry %d/%d in %.1f s", service, last, attempt + 1, attempts - 1,
                     delay)
            sleep(delay)
    raise ServiceError(f"{service} at {url}: {last} after {attempts} attempt(s)",
                       reason=Reason(f"{service}-unavailable"))


def _error_message(reply: requests.Response) -> str:
    """MAA's ``{"error": {"code", "message"}}`` as one line (or the start of the body)."""
    try:
        body = reply.json()
    except ValueError:
        return " ".join(reply.text.split())[:300] or f"HTTP {reply.status_code}"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code, message = error.get("code"), error.get("message")
        text = ": ".join(str(p) for p in (code, message) if p)
        return " ".join(text.split())[:500] or f"HTTP {reply.status_code}"
    return f"HTTP {reply.status_code}"


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


def vcek_chain(http: requests.Session, cfg: Config) -> str:
    """The VCEK certificate and its ASK/ARK chain (PEM) from IMDS THIM."""
    url = f"{cfg.imds}{THIM_PATH}"
    reply = send(http, "GET", url, cfg=cfg, service="imds", headers={"Metadata": "true"})
    if reply.status_code != 200:
        raise ServiceError(f"imds at {url}: HTTP {reply.status_code}: {_error_message(reply)}",
                           reason=Reason.IMDS_UNAVAILABLE)
    try:
        body = reply.json()
    except ValueError:
        raise ServiceError(f"imds at {url}: not JSON", reason=Reason.IMDS_BAD_RESPONSE) from None
    vcek = body.get("vcekCert") if isinstance(body, dict) else None
    chain = body.get("certificateChain") if isinstance(body, dict) else None
    if not isinstance(vcek, str) or not isinstance(chain, str):
        raise ServiceError(f"imds at {url}: no vcekCert/certificateChain",
                           reason=Reason.IMDS_BAD_RESPONSE)
    pem = vcek if vcek.endswith("\n") else vcek + "\n"
    pem += chain
    try:
        certs = x509.load_pem_x509_certificates(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise ServiceError(f"imds at {url}: the VCEK chain is not PEM certificates",
                           reason=Reason.IMDS_BAD_RESPONSE) from None
    if len(certs) < 2:
        raise ServiceError(f"imds at {url}: the VCEK chain has {len(certs)} certificate(s)",
                           reason=Reason.IMDS_BAD_RESPONSE)
    return pem


def _check_ak_binding(report: hcl.HclReport, ak_public: bytes) -> None:
    jwk = report.runtime_key("HCLAkPub")
    n, e = rsa_numbers(ak_public)
    try:
        bound = jwk is not None and (
            int.from_bytes(token.b64url_decode(jwk["n"], "HCLAkPub.n"), "big") == n
            and int.from_bytes(token.b64url_decode(jwk["e"], "HCLAkPub.e"), "big") == e
        )
    except (AttestationError, KeyError, TypeError, AttributeError):
        bound = False
    if not bound:
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
    if params.get("Cipher", "AES") != "AES" or params.get("BlockMode",
                                                          "ChainingModeGCM") != "ChainingModeGCM":
        raise _bad_response(f"unsupported cipher {params.get('Cipher')}/"
                            f"{params.get('BlockMode')}")
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
            raise AttestationError("MAA answer does not decrypt (authentication failed)",
                                   reason=Reason.MAA_RESPONSE_INTEGRITY) from None
    finally:
        inner[:] = bytes(len(inner))
    try:
        return plain.decode("ascii")
    except UnicodeDecodeError:
        raise _bad_response("the decrypted token is not ASCII") from None


def _check_binding(claims: Mapping[str, Any], key: EphemeralKey,
                   payload: Mapping[str, str]) -> None:
    runtime = claims.get("x-ms-runtime")
    if not isinstance(runtime, Mapping):
        raise AttestationError("token lacks x-ms-runtime", reason=Reason.MAA_TOKEN_UNBOUND)
    keys = runtime.get("keys")
    ours = False
    for jwk in keys if isinstance(keys, list) else []:
        if not isinstance(jwk, Mapping) or jwk.get("kty") != "RSA":
            continue
        try:
            n = int.from_bytes(token.b64url_decode(jwk.get("n", ""), "n"), "big")
            e = int.from_bytes(token.b64url_decode(jwk.get("e", ""), "e"), "big")
        except (AttestationError, TypeError, AttributeError):
            continue
        if (n, e) == (key.n, key.e):
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
    session: requests.Session | None = None,
) -> AttestationResult:
    """Guest attestation with MAA; returns the verified token, its claims and header."""
    import requests

    http = session or requests.Session()
    try:
        nonce = secrets.token_bytes(32) if nonce is None else nonce
        payload = _client_payload(nonce, bound_data)

        report = hcl.parse(vtpm.hcl_report())
        report.check_binding()
        ak_public = vtpm.ak_public()
        _check_ak_binding(report, ak_public)
        ak_cert = vtpm.ak_cert()
        quote = vtpm.quote(ATTESTATION_PCRS, b"")
        key = vtpm.ephemeral_key()
        chain = vcek_chain(http, cfg)
        info = attestation_info(
            report=report, vcek_chain_pem=chain, ak_cert=ak_cert, ak_public=ak_public,
            quote_attest=quote.attest, quote_signature=quote.signature, pcrs=quote.pcrs,
            key=key, client_payload=payload, tcg_log_bytes=tcg_log(), distro=os_info(),
        )
        body = json.dumps({"AttestationInfo": b64url(json.dumps(info).encode("utf-8"))})

        url = f"{cfg.maa_url.rstrip('/')}/attest/AzureGuest?api-version={API_VERSION}"
        reply = send(http, "POST", url, cfg=cfg, service="maa", data=body,
                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        if reply.status_code != 200:
            raise AttestationError(
                f"MAA refused the evidence (HTTP {reply.status_code}): {_error_message(reply)}",
                reason=Reason.MAA_REFUSED,
            )
        try:
            answer = reply.json()
        except ValueError:
            raise _bad_response("not JSON") from None
        if not isinstance(answer, dict) or "token" not in answer:
            raise _bad_response("no token")
        jwt = _open_envelope(vtpm, key, answer["token"])

        def fetch(url: str) -> Any:
            reply = send(http, "GET", url, cfg=cfg, service="maa",
                         headers={"Accept": "application/json"})
            if reply.status_code != 200:
                raise ServiceError(f"{url} answered HTTP {reply.status_code}",
                                   reason=Reason.TOKEN_JWKS_UNAVAILABLE)
            try:
                return reply.json()
            except ValueError:
                raise AttestationError(f"{url} did not answer JSON",
                                       reason=Reason.TOKEN_JWKS_INVALID) from None

        verified = token.verify(jwt, cfg, fetch=fetch)
        _check_binding(verified.claims, key, payload)
        LOG.info("attested with %s (token expires %s)", verified.issuer,
                 verified.claims.get("exp"))
        return AttestationResult(token=jwt, claims=verified.claims, header=verified.header)
    finally:
        if session is None:
            http.close()
