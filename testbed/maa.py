"""Microsoft Azure Attestation stand-in: guest attestation of an SEV-SNP CVM with a vTPM.

Routes (shared/reference/azure-protocols.md §2):

- ``GET /.well-known/openid-configuration``: OpenID metadata naming ``{issuer}/certs``.
- ``GET /certs``: the JWKS with the token signing key and its ``x5c`` chain.
- ``POST /attest/AzureGuest?api-version=2020-10-01``: ``{"AttestationInfo": b64url(JSON)}``;
  the evidence is verified (testbed.guestevidence) and an RS256 token is returned encrypted
  to the TPM's ephemeral key, as MAA does: ``{"token": b64url(JSON{Jwt, EncryptedInnerKey,
  EncryptionParams, AuthenticationData})}`` (AES-256-GCM, AAD ``"Transport Key"``, the AES
  key under RSAES-PKCS1-v1_5).
- ``POST /attest/SevSnpVm?api-version=2022-08-01``: the platform-only API: an SNP report with
  its VCEK chain and runtime data, answered with a plain ``{"token": JWT}``.

Refusals are HTTP 400 ``{"error": {"code", "message"}}`` with a message naming what failed.
Fault knobs (service ``maa``) apply at the start of every ``/attest/*`` request.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
import os
import secrets
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from testbed import httpfaults, jwks
from testbed.faults import Faults
from testbed.guestevidence import (
    MALFORMED,
    EvidenceError,
    GuestEvidence,
    MaaPolicy,
    b64_any,
    decode_attestation_info,
    verify_guest,
    verify_snp,
)
from testbed.pki import Trust
from testbed.snp import SnpReport
from testbed.tpmstruct import RsaPublic

__all__ = ["API_VERSIONS", "MaaPolicy", "decrypt_response", "make_app"]

API_VERSIONS = {"AzureGuest": ("2020-10-01",), "SevSnpVm": ("2022-08-01",)}
TRANSPORT_KEY_AAD = b"Transport Key"
MAX_BODY_BYTES = 4 * 1024 * 1024  # TCG logs make guest requests tens of KiB

log = logging.getLogger("testbed.maa")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _fault_body(status: int) -> dict[str, Any]:
    code = {429: "TooManyRequests", 503: "ServiceUnavailable"}.get(
        status, "InternalServerError" if status >= 500 else "BadRequest"
    )
    return {"error": {"code": code, "message": f"injected fault: HTTP {status}"}}


def _attest_faults(faults: Faults | None) -> Middleware:
    inner = httpfaults.middleware(faults, "maa", _fault_body)

    @web.middleware
    async def apply(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/attest/"):
            return await inner(request, handler)
        return await handler(request)

    return apply


def _snp_claims(report: SnpReport) -> dict[str, Any]:
    tcb = report.reported_tcb
    return {
        "x-ms-sevsnpvm-authorkeydigest": report.author_key_digest.hex(),
        "x-ms-sevsnpvm-bootloader-svn": tcb.boot_loader,
        "x-ms-sevsnpvm-familyId": report.family_id.hex(),
        "x-ms-sevsnpvm-guestsvn": report.guest_svn,
        "x-ms-sevsnpvm-hostdata": report.host_data.hex(),
        "x-ms-sevsnpvm-idkeydigest": report.id_key_digest.hex(),
        "x-ms-sevsnpvm-imageId": report.image_id.hex(),
        "x-ms-sevsnpvm-is-debuggable": report.is_debuggable,
        "x-ms-sevsnpvm-launchmeasurement": report.measurement.hex(),
        "x-ms-sevsnpvm-microcode-svn": tcb.microcode,
        "x-ms-sevsnpvm-migration-allowed": report.migration_allowed,
        "x-ms-sevsnpvm-reportdata": report.report_data.hex(),
        "x-ms-sevsnpvm-reportid": report.report_id.hex(),
        "x-ms-sevsnpvm-smt-allowed": report.smt_allowed,
        "x-ms-sevsnpvm-snpfw-svn": tcb.snp,
        "x-ms-sevsnpvm-tee-svn": tcb.tee,
        "x-ms-sevsnpvm-vmpl": report.vmpl,
    }


def _rsa_jwk(key: RsaPublic | rsa.RSAPublicKey) -> dict[str, str]:
    numbers = (key.public_key() if isinstance(key, RsaPublic) else key).public_numbers()
    n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
    e = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
    return {"n": jwks.b64url(n), "e": jwks.b64url(e)}


def encrypt_token(token: str, enc_key: RsaPublic) -> str:
    """The ``token`` field of an AzureGuest answer: the JWT sealed to the ephemeral TPM key."""
    aes_key = AESGCM.generate_key(bit_length=256)
    iv = os.urandom(12)
    sealed = AESGCM(aes_key).encrypt(iv, token.encode("ascii"), TRANSPORT_KEY_AAD)
    ciphertext, tag = sealed[:-16], sealed[-16:]
    inner_key = enc_key.public_key().encrypt(aes_key, padding.PKCS1v15())
    envelope = {
        "Jwt": _b64(ciphertext),
        "EncryptedInnerKey": _b64(inner_key),
        "EncryptionParams": {
            "BlockMode": "ChainingModeGCM",
            "BlockPadding": "PKCS7",
            "Cipher": "AES",
            "KeySizeInBits": 256,
            "Iv": _b64(iv),
        },
        "AuthenticationData": _b64(tag),
    }
    return jwks.b64url(json.dumps(envelope).encode())


def decrypt_response(token_field: str, enc_key: rsa.RSAPrivateKey) -> str:
    """Open an AzureGuest ``token`` field with the ephemeral private key (the client's side).

    For tests and tools that hold the key in software; on a VM the TPM does the RSA step.
    """
    envelope = json.loads(b64_any(token_field, "token"))
    iv = base64.b64decode(envelope["EncryptionParams"]["Iv"])
    sealed = base64.b64decode(envelope["Jwt"]) + base64.b64decode(envelope["AuthenticationData"])
    try:
        aes_key = enc_key.decrypt(
            base64.b64decode(envelope["EncryptedInnerKey"]), padding.PKCS1v15()
        )
        # A wrong RSA key may also yield a random "inner key" (implicit rejection).
        if len(aes_key) * 8 != envelope["EncryptionParams"]["KeySizeInBits"]:
            raise ValueError("inner key size")
        return AESGCM(aes_key).decrypt(iv, sealed, TRANSPORT_KEY_AAD).decode("ascii")
    except (ValueError, InvalidTag):
        raise ValueError("the token does not open with this key") from None


class MaaService:
    """One attestation provider: its issuer URL, signing key, policy and handlers."""

    def __init__(self, trust: Trust, issuer: str, policy: MaaPolicy) -> None:
        self.trust = trust
        self.issuer = issuer.rstrip("/")
        self.policy = policy
        self.kid = jwks.x5t(trust.maa_signing.cert)
        self.policy_hash = jwks.b64url(hashlib.sha256(policy.text().encode()).digest())

    # --- metadata ---------------------------------------------------------------------------

    async def openid_configuration(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "issuer": self.issuer,
                "jwks_uri": f"{self.issuer}/certs",
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["token", "none"],
                "token_endpoint_auth_methods_supported": ["none"],
                "claims_supported": [
                    "iat",
                    "exp",
                    "iss",
                    "nbf",
                    "jti",
                    "x-ms-ver",
                    "x-ms-attestation-type",
                    "x-ms-policy-hash",
                    "x-ms-runtime",
                    "x-ms-isolation-tee",
                ],
            }
        )

    async def certs(self, request: web.Request) -> web.Response:
        signing = self.trust.maa_signing.cert
        public = signing.public_key()
        if not isinstance(public, rsa.RSAPublicKey):
            raise TypeError("the MAA signing certificate must hold an RSA key")
        key = {
            "kid": self.kid,
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            **_rsa_jwk(public),
            "x5c": [_b64(self.trust.maa_signing.cert_der), _b64(self.trust.ca.cert_der)],
        }
        return web.json_response({"keys": [key]})

    # --- attestation ------------------------------------------------------------------------

    async def _body(self, request: web.Request, kind: str) -> Any:
        version = request.query.get("api-version")
        if version is None:
            raise EvidenceError(
                "MissingApiVersionParameter", "the api-version query parameter is required"
            )
        if version not in API_VERSIONS[kind]:
            raise EvidenceError(
                "UnsupportedApiVersion",
                f"api-version {version!r} is not supported for {kind}; "
                f"supported: {', '.join(API_VERSIONS[kind])}",
            )
        if request.content_type != "application/json":
            raise EvidenceError(
                MALFORMED, f"Content-Type {request.content_type!r} is not application/json"
            )
        try:
            return json.loads(await request.read())
        except (UnicodeDecodeError, ValueError):
            raise EvidenceError(MALFORMED, "request body is not JSON") from None

    def _sign(self, claims: dict[str, Any]) -> str:
        return jwks.sign(
            claims,
            self.trust.maa_signing,
            kid=self.kid,
            extra_header={"jku": f"{self.issuer}/certs", "typ": "JWT"},
        )

    def _base_claims(self, now: dt.datetime) -> dict[str, Any]:
        iat = int(now.timestamp())
        return {
            "exp": iat + int(self.policy.token_lifetime.total_seconds()),
            "iat": iat,
            "iss": self.issuer,
            "jti": secrets.token_hex(32),
            "nbf": iat,
        }

    def guest_claims(self, evidence: GuestEvidence, now: dt.datetime) -> dict[str, Any]:
        runtime = evidence.snp.runtime
        vm_config = runtime.get("vm-configuration", {})
        secure_boot = vm_config.get("secure-boot") is True
        # The Windows boot-policy claims come from replaying the TCG log in Azure; a Linux
        # guest gets the same fixed values there, and the testbed does not replay the log.
        claims = self._base_claims(now) | {
            "secureboot": secure_boot,
            "x-ms-attestation-type": "azurevm",
            "x-ms-azurevm-attestation-protocol-ver": evidence.protocol_version,
            "x-ms-azurevm-attested-pcrs": list(evidence.pcrs),
            "x-ms-azurevm-bootdebug-enabled": False,
            "x-ms-azurevm-dbvalidated": secure_boot,
            "x-ms-azurevm-dbxvalidated": secure_boot,
            "x-ms-azurevm-debuggersdisabled": True,
            "x-ms-azurevm-default-securebootkeysvalidated": secure_boot,
            "x-ms-azurevm-elam-enabled": False,
            "x-ms-azurevm-flightsigning-enabled": False,
            "x-ms-azurevm-hvci-policy": 0,
            "x-ms-azurevm-hypervisordebug-enabled": False,
            "x-ms-azurevm-is-windows": evidence.os_type.lower() == "windows",
            "x-ms-azurevm-kerneldebug-enabled": False,
            "x-ms-azurevm-osbuild": evidence.os_build,
            "x-ms-azurevm-osdistro": evidence.os_distro,
            "x-ms-azurevm-ostype": evidence.os_type,
            "x-ms-azurevm-osversion-major": evidence.os_version_major,
            "x-ms-azurevm-osversion-minor": evidence.os_version_minor,
            "x-ms-azurevm-signingdisabled": True,
            "x-ms-azurevm-testsigning-enabled": False,
        }
        vm_id = vm_config.get("vmUniqueId")
        if isinstance(vm_id, str):
            claims["x-ms-azurevm-vmid"] = vm_id
        claims["x-ms-isolation-tee"] = {
            "x-ms-attestation-type": "sevsnpvm",
            "x-ms-compliance-status": "azure-compliant-cvm",
            "x-ms-runtime": runtime,
            **_snp_claims(evidence.snp.report),
        }
        claims["x-ms-policy-hash"] = self.policy_hash
        ephemeral = {
            "kid": "TpmEphemeralEncryptionKey",
            "kty": "RSA",
            "key_ops": ["encrypt"],
            **_rsa_jwk(evidence.enc_key),
        }
        x_ms_runtime: dict[str, Any] = {}
        if evidence.client_payload:
            # Echoed exactly as sent: MAA adds no base64 layer of its own (the C++ client
            # base64-encodes each value before sending; azure-protocols.md §7.3).
            x_ms_runtime["client-payload"] = evidence.client_payload
        x_ms_runtime["keys"] = [ephemeral]
        claims["x-ms-runtime"] = x_ms_runtime
        claims["x-ms-ver"] = "1.0"
        return claims

    async def attest_guest(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request, "AzureGuest")
            now = dt.datetime.now(dt.UTC)
            evidence = verify_guest(decode_attestation_info(body), self.policy, now)
        except EvidenceError as exc:
            log.info("AzureGuest refused: %s: %s", exc.code, exc.message)
            return _error(400, exc.code, exc.message)
        token = self._sign(self.guest_claims(evidence, now))
        log.info(
            "AzureGuest attested vm %s, launch measurement %s",
            evidence.snp.runtime.get("vm-configuration", {}).get("vmUniqueId", "?"),
            evidence.snp.report.measurement.hex()[:16],
        )
        return web.json_response({"token": encrypt_token(token, evidence.enc_key)})

    async def attest_snp(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request, "SevSnpVm")
            now = dt.datetime.now(dt.UTC)
            if not isinstance(body, dict):
                raise EvidenceError(MALFORMED, "request body is not a JSON object")
            if "report" not in body:
                raise EvidenceError(MALFORMED, "request body lacks report")
            proof = json.loads(b64_any(body["report"], "report"))
            if not isinstance(proof, dict):
                raise EvidenceError(MALFORMED, "report does not decode to a JSON object")
            runtime_data = body.get("runtimeData")
            if not isinstance(runtime_data, dict) or "data" not in runtime_data:
                raise EvidenceError(MALFORMED, "runtimeData.data is missing")
            if runtime_data.get("dataType", "JSON") != "JSON":
                raise EvidenceError(
                    MALFORMED,
                    f"runtimeData.dataType {runtime_data.get('dataType')!r} is not 'JSON'",
                )
            runtime_raw = b64_any(runtime_data["data"], "runtimeData.data")
            evidence = verify_snp(proof, runtime_raw, self.policy, now)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return _error(400, MALFORMED, "report does not decode to JSON")
        except EvidenceError as exc:
            log.info("SevSnpVm refused: %s: %s", exc.code, exc.message)
            return _error(400, exc.code, exc.message)
        claims = self._base_claims(now) | {
            "x-ms-attestation-type": "sevsnpvm",
            "x-ms-compliance-status": "azure-compliant-cvm",
            "x-ms-policy-hash": self.policy_hash,
            "x-ms-runtime": evidence.runtime,
            **_snp_claims(evidence.report),
            "x-ms-ver": "1.0",
        }
        return web.json_response({"token": self._sign(claims)})

    async def attest_unknown(self, request: web.Request) -> web.Response:
        return _error(
            400, MALFORMED, f"attestation type {request.match_info['kind']!r} is not supported here"
        )


SERVICE_KEY = web.AppKey("maa", MaaService)


def make_app(
    trust: Trust, faults: Faults | None, *, issuer: str, policy: MaaPolicy | None = None
) -> web.Application:
    """The MAA stand-in as an aiohttp application; ``issuer`` is its public base URL."""
    service = MaaService(trust, issuer, policy or MaaPolicy.for_trust(trust))
    app = web.Application(middlewares=[_attest_faults(faults)], client_max_size=MAX_BODY_BYTES)
    app[SERVICE_KEY] = service
    app.router.add_get("/.well-known/openid-configuration", service.openid_configuration)
    app.router.add_get("/certs", service.certs)
    app.router.add_post("/attest/AzureGuest", service.attest_guest)
    app.router.add_post("/attest/SevSnpVm", service.attest_snp)
    app.router.add_post("/attest/{kind}", service.attest_unknown)
    return app
