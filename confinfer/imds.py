"""The one IMDS client: managed-identity tokens and the VCEK chain (THIM), over confinfer.http.

IMDS is plain HTTP on a link-local address that only this VM reaches; every request carries
``Metadata: true`` (IMDS refuses requests without it, which keeps it out of reach of forged
requests relayed through a proxy). The address is ``imds_url`` (default Azure's
``http://169.254.169.254``), never taken from an answer.

Managed-identity tokens are asked for one *audience* chosen by the caller from configuration
(Key Vault's ``https://vault.azure.net``, ...); they are cached per audience and client id until
five minutes before they expire.

The vTPM's AK certificate is renewed as Microsoft's guest attestation library renews it
(Azure/confidential-computing-cvm-guest-attestation, ImdsClient::RenewAkCert): the VM id from
``/metadata/instance/compute/vmId``, then a POST of the current certificate (PEM, URL-encoded) to
``/metadata/THIM/tvm/certificate/renew`` with the synchronous API version, answered with
``{"AkCertPem": PEM}``. This module only checks the answer's shape; whether the certificate may
be installed is attestd.vtpm's decision.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from urllib.parse import quote, urlencode

from cryptography import x509

from confinfer import log
from confinfer.config import Config
from confinfer.errors import AttestationError, Reason, ServiceError, printable
from confinfer.http import IMDS, Http, Reply, error_text

LOG = logging.getLogger(__name__)

THIM_PATH = "/metadata/THIM/amd/certification"
TOKEN_PATH = "/metadata/identity/oauth2/token"
TOKEN_API_VERSION = "2018-02-01"
TOKEN_EARLY_REFRESH_S = 300
HEADERS = {"Metadata": "true"}
# What Microsoft's guest attestation library asks for (ImdsClient.cpp, TpmCertOperations.cpp).
VM_ID_PATH = "/metadata/instance/compute/vmId"
VM_ID_API_VERSION = "2019-03-11"
AK_RENEW_PATH = "/metadata/THIM/tvm/certificate/renew"
AK_RENEW_API_VERSION = "2023-07-01"  # the synchronous renewal; its answer holds the certificate
MAX_VM_ID_BYTES = 64
MAX_AK_CERT_PEM_CHARS = 16 * 1024


def _bad(url: str, message: str) -> ServiceError:
    return ServiceError(f"imds at {url}: {message}", reason=Reason.IMDS_BAD_RESPONSE)


def _get(http: Http, url: str, step: str) -> Reply:
    with log.step(step):
        return http.request("GET", url, service=IMDS, headers=HEADERS)


def _body(reply: Reply, shown: str) -> dict[str, object]:
    """An IMDS answer's JSON object, or ServiceError naming ``shown`` (the URL, no query)."""
    if reply.status != 200:
        raise ServiceError(
            f"imds at {shown}: HTTP {reply.status}: {error_text(reply)}",
            reason=Reason.IMDS_UNAVAILABLE,
        )
    try:
        body = reply.json()
    except ValueError:
        raise _bad(shown, "not JSON") from None
    if not isinstance(body, dict):
        raise _bad(shown, "not a JSON object")
    return body


def vcek_chain(http: Http, cfg: Config) -> str:
    """The VCEK certificate and its ASK/ARK chain (PEM) from IMDS THIM."""
    url = f"{cfg.imds}{THIM_PATH}"
    body = _body(_get(http, url, "imds-thim"), url)
    vcek, chain = body.get("vcekCert"), body.get("certificateChain")
    if not isinstance(vcek, str) or not isinstance(chain, str):
        raise _bad(url, "no vcekCert/certificateChain")
    pem = vcek if vcek.endswith("\n") else vcek + "\n"
    pem += chain
    try:
        certs = x509.load_pem_x509_certificates(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise _bad(url, "the VCEK chain is not PEM certificates") from None
    if len(certs) < 2:
        raise _bad(url, f"the VCEK chain has {len(certs)} certificate(s)")
    return pem


@dataclass(frozen=True)
class AccessToken:
    token: str
    expires_on: float


_CACHE: dict[tuple[str, str, str | None], AccessToken] = {}
_CACHE_LOCK = threading.Lock()


def managed_identity_token(http: Http, cfg: Config, audience: str) -> AccessToken:
    """An access token for ``audience`` from the VM's managed identity (cached)."""
    client_id = cfg.managed_identity_client_id
    key = (cfg.imds, audience, client_id)
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
    if cached is not None and cached.expires_on - TOKEN_EARLY_REFRESH_S > time.time():
        return cached
    query = {"api-version": TOKEN_API_VERSION, "resource": audience}
    if client_id:
        query["client_id"] = client_id
    url = f"{cfg.imds}{TOKEN_PATH}?{urlencode(query)}"
    reply = _get(http, url, "imds-token")
    if reply.status in (400, 401, 403, 404):
        # IMDS answers 400 "Identity not found" when the VM has no (such) managed identity.
        raise AttestationError(
            f"IMDS refused a managed-identity token for {audience}: {error_text(reply)}",
            reason=Reason.IMDS_TOKEN_REFUSED,
            hint="assign a managed identity to the VM; with several, set "
            "managed_identity_client_id",
        )
    body = _body(reply, f"{cfg.imds}{TOKEN_PATH}")
    token, expires = body.get("access_token"), body.get("expires_on")
    if not isinstance(token, str) or not token:
        raise _bad(f"{cfg.imds}{TOKEN_PATH}", "no access_token")
    try:
        expires_on = float(expires) if isinstance(expires, str | int) else time.time() + 300
    except ValueError:
        expires_on = time.time() + 300
    found = AccessToken(token, expires_on)
    with _CACHE_LOCK:
        _CACHE[key] = found
    return found


def forget_tokens() -> None:
    """Drop cached tokens (after a 401 from the service the token was for)."""
    with _CACHE_LOCK:
        _CACHE.clear()


# --- the AK certificate ----------------------------------------------------------------------


def vm_id(http: Http, cfg: Config) -> str:
    """This VM's id (``compute/vmId``), as a lowercase GUID."""
    shown = f"{cfg.imds}{VM_ID_PATH}"
    query = urlencode({"api-version": VM_ID_API_VERSION, "format": "text"})
    reply = _get(http, f"{shown}?{query}", "imds-vmid")
    if reply.status != 200:
        raise ServiceError(
            f"imds at {shown}: HTTP {reply.status}: {error_text(reply)}",
            reason=Reason.IMDS_UNAVAILABLE,
        )
    if len(reply.body) > MAX_VM_ID_BYTES:
        raise _bad(shown, f"the vmId answer is longer than {MAX_VM_ID_BYTES} bytes")
    text = reply.body.decode("ascii", errors="replace").strip()
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise _bad(shown, f"vmId {printable(text, 80)!r} is not a GUID") from None


def certificate_pem(der: bytes) -> str:
    """A certificate as the guest library posts it: the PEM armour around one base64 line."""
    body = base64.b64encode(der).decode("ascii")
    return f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----"


def renew_ak_certificate(
    http: Http, cfg: Config, current_pem: str, *, vm: str | None = None
) -> str:
    """A renewed AK certificate (PEM) from THIM for the one in ``current_pem``.

    ``vm`` is this VM's id (default: asked from IMDS). Each call is one renewal request with a
    fresh request id; the HTTP layer's retries repeat it with the same id. The answer must be
    one PEM certificate of at most :data:`MAX_AK_CERT_PEM_CHARS` characters; nothing about whose
    key it certifies is checked here.
    """
    machine = vm_id(http, cfg) if vm is None else str(uuid.UUID(vm))
    shown = f"{cfg.imds}{AK_RENEW_PATH}"
    query = urlencode(
        {"api-version": AK_RENEW_API_VERSION, "vmId": machine, "requestId": str(uuid.uuid4())}
    )
    # curl_easy_escape, as the library sends it: everything but unreserved characters escaped.
    body = quote(current_pem, safe="").encode("ascii")
    with log.step("imds-ak-renew"):
        reply = http.request(
            "POST",
            f"{shown}?{query}",
            service=IMDS,
            headers={**HEADERS, "Content-Type": "application/x-www-form-urlencoded"},
            body=body,
        )
    answer = _body(reply, shown)
    pem = answer.get("AkCertPem")
    if not isinstance(pem, str) or not pem.strip():
        raise _bad(shown, "no AkCertPem in the renewal answer")
    if len(pem) > MAX_AK_CERT_PEM_CHARS:
        raise _bad(shown, f"AkCertPem is longer than {MAX_AK_CERT_PEM_CHARS} characters")
    try:
        certs = x509.load_pem_x509_certificates(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise _bad(shown, "AkCertPem is not a PEM certificate") from None
    if len(certs) != 1:
        raise _bad(shown, f"AkCertPem holds {len(certs)} certificates, not one")
    return pem
