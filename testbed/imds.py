"""Azure Instance Metadata Service stand-in (plain HTTP, as on 169.254.169.254).

Two endpoints, both requiring the ``Metadata: true`` header as IMDS does:

- ``GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=R[&client_id=|&msi_res_id=
  |&object_id=]``: a managed-identity access token (AAD v1 shape, RS256, signed by the testbed's
  ``aad_signing`` key) for the selected identity, default the system-assigned one. The reply has
  IMDS's fields, numbers as strings: ``access_token, client_id, expires_in, expires_on,
  ext_expires_in, not_before, resource, token_type``. Errors use IMDS's OAuth2 shape
  ``{"error": ..., "error_description": ...}``.
- ``GET /metadata/THIM/amd/certification``: the VCEK and its ASK/ARK chain (PEM) and the TCB
  version (``tcbm``, hex) they were issued for.

What azure-identity's ManagedIdentityCredential sends with ``AZURE_POD_IDENTITY_AUTHORITY_HOST``
set (msal ``_obtain_token_on_azure_vm``): the query above and the headers ``Metadata: true``,
``x-client-SKU``, ``x-client-Ver``, ``x-ms-client-request-id``.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from testbed import httpfaults
from testbed.faults import Faults
from testbed.identities import Identities, Identity
from testbed.jwks import b64url, sign, x5t
from testbed.pki import Trust

TOKEN_PATH = "/metadata/identity/oauth2/token"  # noqa: S105 - a URL path, not a secret
THIM_PATH = "/metadata/THIM/amd/certification"
API_VERSIONS = ("2018-02-01", "2019-03-11", "2019-08-01", "2021-02-01")
DEFAULT_LIFETIME_S = 3600
# The reported TCB the testbed's VCEK stands for, as THIM prints it (16 hex digits, most
# significant byte first: microcode 0xDB, snp 0x18, tee 0x00, bootloader 0x04).
DEFAULT_TCBM = "DB18000000000004"

log = logging.getLogger("testbed.imds")

TRUST_KEY = web.AppKey("trust", Trust)
IDENTITIES_KEY = web.AppKey("identities", Identities)
SETTINGS_KEY = web.AppKey("settings", dict[str, Any])


def _error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


def _fault_body(status: int) -> dict[str, str]:
    return {"error": "service_unavailable" if status >= 500 else "invalid_request",
            "error_description": f"injected fault: HTTP {status}"}


def audience(resource: str) -> str:
    """The token audience for a requested resource: no ``/.default`` scope suffix, no slash."""
    if resource.endswith("/.default"):
        resource = resource[: -len("/.default")]
    return resource.rstrip("/")


def _metadata_header(request: web.Request) -> web.Response | None:
    if request.headers.get("Metadata", "").lower() != "true":
        return _error(400, "invalid_request", "Required metadata header not specified")
    return None


def access_token(trust: Trust, identities: Identities, identity: Identity, resource: str,
                 lifetime_s: int, now: int | None = None) -> tuple[str, int]:
    """An AAD v1 access token for ``identity`` and ``resource``; returns (token, exp)."""
    now = int(time.time()) if now is None else now
    exp = now + lifetime_s
    claims = {
        "aud": audience(resource),
        "iss": identities.issuer,
        "iat": now,
        "nbf": now,
        "exp": exp,
        "aio": b64url(secrets.token_bytes(24)),
        "appid": identity.client_id,
        "appidacr": "2",
        "idp": identities.issuer,
        "idtyp": "app",
        "oid": identity.object_id,
        "rh": b64url(secrets.token_bytes(16)),
        "sub": identity.object_id,
        "tid": identities.tenant_id,
        "uti": b64url(secrets.token_bytes(16)),
        "ver": "1.0",
        "xms_mirid": identity.resource_id,
    }
    thumb = x5t(trust.aad_signing.cert)
    token = sign(claims, trust.aad_signing, kid=thumb, extra_header={"x5t": thumb})
    return token, exp


async def token(request: web.Request) -> web.Response:
    refused = _metadata_header(request)
    if refused is not None:
        return refused
    q = request.query
    api_version = q.get("api-version")
    if api_version is None:
        return _error(400, "invalid_request", "Required query variable 'api-version' is missing")
    if api_version not in API_VERSIONS:
        return _error(400, "invalid_request", f"Invalid api-version '{api_version}'")
    resource = q.get("resource")
    if not resource:
        return _error(400, "invalid_request", "Required audience parameter not specified")
    parts = urlsplit(resource)
    if not parts.scheme or not parts.netloc:
        return _error(400, "invalid_resource",
                      f"AADSTS500011: The resource principal named {resource} was not found")
    selectors = {k: q[k] for k in ("client_id", "object_id", "msi_res_id") if k in q}
    if len(selectors) > 1:
        return _error(400, "invalid_request",
                      "Only one of client_id, object_id or msi_res_id may be specified")
    identities = request.app[IDENTITIES_KEY]
    identity = identities.select(**selectors)
    if identity is None:
        return _error(400, "invalid_request", "Identity not found")
    lifetime = int(request.app[SETTINGS_KEY]["lifetime_s"])
    tok, exp = access_token(request.app[TRUST_KEY], identities, identity, resource, lifetime)
    log.info("issued token: identity=%s aud=%s exp=%d", identity.name, audience(resource), exp)
    return web.json_response({
        "access_token": tok,
        "client_id": identity.client_id,
        "expires_in": str(lifetime),
        "expires_on": str(exp),
        "ext_expires_in": str(lifetime),
        "not_before": str(exp - lifetime),
        "resource": resource,
        "token_type": "Bearer",
    })


async def thim_certification(request: web.Request) -> web.Response:
    refused = _metadata_header(request)
    if refused is not None:
        return refused
    trust = request.app[TRUST_KEY]
    return web.json_response({
        "vcekCert": trust.vcek.cert_pem.decode("ascii"),
        "certificateChain": (trust.ask.cert_pem + trust.ark.cert_pem).decode("ascii"),
        "tcbm": request.app[SETTINGS_KEY]["tcbm"],
    })


def make_app(trust: Trust, faults: Faults | None, identities: Identities, *,
             token_lifetime_s: int = DEFAULT_LIFETIME_S, tcbm: str = DEFAULT_TCBM,
             ) -> web.Application:
    """The IMDS application; serve it over plain HTTP."""
    if token_lifetime_s <= 0:
        raise ValueError("token lifetime must be positive")
    app = web.Application(middlewares=[httpfaults.middleware(faults, "imds", _fault_body)])
    app[TRUST_KEY] = trust
    app[IDENTITIES_KEY] = identities
    app[SETTINGS_KEY] = {"lifetime_s": token_lifetime_s, "tcbm": tcbm}
    app.router.add_get(TOKEN_PATH, token)
    app.router.add_get(THIM_PATH, thim_certification)
    return app
