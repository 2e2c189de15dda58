"""Azure Instance Metadata Service stand-in (plain HTTP, as on 169.254.169.254).

Every route requires the ``Metadata: true`` header, as IMDS does, and refuses a request that
carries ``X-Forwarded-For``. Without the header the identity route answers IMDS's OAuth2 shape
``{"error": "invalid_request", "error_description": "Required metadata header not specified"}``;
every other route IMDS's own shape ``{"error": "Bad request. Required metadata header not
specified"}``.

- ``GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=R[&client_id=|&msi_res_id=
  |&object_id=]``: a managed-identity access token (AAD v1 shape, RS256, signed by the testbed's
  ``aad_signing`` key) for the selected identity, default the system-assigned one. The reply has
  IMDS's fields, numbers as strings: ``access_token, client_id, expires_in, expires_on,
  ext_expires_in, not_before, resource, token_type``. Errors use IMDS's OAuth2 shape
  ``{"error": ..., "error_description": ...}``.
- ``GET /metadata/instance[/<path>]?api-version=V[&format=json|text]``: the instance metadata
  document (``compute``, ``network``), or the node at ``<path>`` (``compute/vmId``, ...). A leaf
  needs ``format=text`` (the bare value) or ``format=json``; ``format=text`` on an inner node
  lists its children (``compute/``, ``network/``).
- ``GET /metadata/versions``: the instance API versions.
- ``GET /metadata/THIM/amd/certification``: the VCEK and its ASK/ARK chain (PEM), the TCB
  version they were issued for (``tcbm``: the 64-bit TCB_VERSION as 16 uppercase hex digits,
  the SNP report's REPORTED_TCB) and ``cacheControl``.
- ``POST /metadata/THIM/tvm/certificate/renew?api-version=2023-07-01&vmId=V&requestId=R`` with
  the current AK certificate as URL-encoded PEM in the body: a fresh AK certificate for the
  same AK from the testbed vTPM CA, ``{"AkCertPem": PEM}``. As on Azure, the service only
  answers; the client writes the certificate into NV 0x01C101D0 itself
  (Azure/confidential-computing-cvm-guest-attestation TpmCertOperations::RenewAndReplaceAkCert).

What azure-identity's ManagedIdentityCredential sends with ``AZURE_POD_IDENTITY_AUTHORITY_HOST``
set (msal ``_obtain_token_on_azure_vm``): the query above and the headers ``Metadata: true``,
``x-client-SKU``, ``x-client-Ver``, ``x-ms-client-request-id``.
"""

from __future__ import annotations

import logging
import secrets
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from testbed import httpfaults, snp, vtpm
from testbed.faults import Faults
from testbed.identities import Identities, Identity
from testbed.jwks import b64url, sign, x5t
from testbed.pki import Pair, Trust

TOKEN_PATH = "/metadata/identity/oauth2/token"  # noqa: S105 - a URL path, not a secret
THIM_PATH = "/metadata/THIM/amd/certification"
INSTANCE_PATH = "/metadata/instance"
VERSIONS_PATH = "/metadata/versions"
RENEW_PATH = "/metadata/THIM/tvm/certificate/renew"
API_VERSIONS = ("2018-02-01", "2019-03-11", "2019-08-01", "2021-02-01")
# The instance API's versions (learn.microsoft.com "Azure Instance Metadata Service",
# supported API versions); a missing or unknown one is answered with the newest three.
INSTANCE_API_VERSIONS = (
    "2017-03-01",
    "2017-04-02",
    "2017-08-01",
    "2017-10-01",
    "2017-12-01",
    "2018-02-01",
    "2018-04-02",
    "2018-10-01",
    "2019-02-01",
    "2019-03-11",
    "2019-04-30",
    "2019-06-01",
    "2019-06-04",
    "2019-08-01",
    "2019-08-15",
    "2019-11-01",
    "2020-06-01",
    "2020-07-15",
    "2020-09-01",
    "2020-10-01",
    "2020-12-01",
    "2021-01-01",
    "2021-02-01",
    "2021-03-01",
    "2021-05-01",
    "2021-10-01",
    "2021-11-01",
    "2021-11-15",
    "2021-12-13",
    "2023-07-01",
)
NEWEST_VERSIONS = list(reversed(INSTANCE_API_VERSIONS[-3:]))
# AK renewal: the synchronous API Microsoft's guest library calls first (TpmCertOperations.cpp
# ak_renew_sync_api_version). Its asynchronous fallback (2021-12-01 + .../query) is not served.
RENEW_API_VERSIONS = ("2023-07-01",)
DEFAULT_LIFETIME_S = 3600
# The reported TCB the testbed's VCEK stands for, as THIM prints it: the SNP report's
# REPORTED_TCB (testbed.snp.TESTBED_TCB) as one 64-bit TCB_VERSION, 16 uppercase hex digits,
# most significant byte (microcode) first.
DEFAULT_TCBM = f"{snp.TESTBED_TCB.to_u64():016X}"
THIM_CACHE_CONTROL = "86400"
RENEW_FAULT = "ak-renew"

log = logging.getLogger("testbed.imds")

TRUST_KEY = web.AppKey("trust", Trust)
IDENTITIES_KEY = web.AppKey("identities", Identities)
SETTINGS_KEY = web.AppKey("settings", dict[str, Any])
AkLookup = Callable[[], rsa.RSAPublicKey | None]
AK_PUBLIC_KEY: web.AppKey[AkLookup] = web.AppKey("ak_public")

_HEADER_REQUIRED = "Required metadata header not specified"
_VERSION_MISSING = (
    "Bad request. api-version was not specified in the request. For more "
    "information refer to aka.ms/azureimds"
)
_VERSION_INVALID = (
    "Bad request. api-version is invalid or was not specified in the request. "
    "For more information refer to aka.ms/azureimds"
)


@dataclass(frozen=True)
class Instance:
    """What IMDS knows about this VM: the compute and network facts of the instance document."""

    vm_id: str  # lowercase GUID; the HCL runtime data carries it uppercase as vmUniqueId
    name: str
    resource_group: str
    subscription_id: str
    location: str = "eastus2"
    vm_size: str = "Standard_NCC40ads_H100_v5"
    zone: str = "1"
    private_ip: str = "10.0.0.4"
    mac: str = "000D3A7B9C21"

    @classmethod
    def for_identities(cls, identities: Identities, vm_id: str, **overrides: Any) -> Instance:
        return cls(
            vm_id=str(uuid.UUID(vm_id)),
            name=identities.vm_name,
            resource_group=identities.resource_group,
            subscription_id=identities.subscription_id,
            **overrides,
        )

    @property
    def resource_id(self) -> str:
        return (
            f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
            f"/providers/Microsoft.Compute/virtualMachines/{self.name}"
        )

    def document(self) -> dict[str, Any]:
        """``/metadata/instance`` as IMDS answers it (values are strings, as IMDS's are)."""
        return {
            "compute": {
                "azEnvironment": "AzurePublicCloud",
                "customData": "",
                "evictionPolicy": "",
                "isHostCompatibilityLayerVm": "false",
                "licenseType": "",
                "location": self.location,
                "name": self.name,
                "offer": "0001-com-ubuntu-confidential-vm-jammy",
                "osProfile": {
                    "adminUsername": "azureuser",
                    "computerName": self.name,
                    "disablePasswordAuthentication": "true",
                },
                "osType": "Linux",
                "placementGroupId": "",
                "plan": {"name": "", "product": "", "publisher": ""},
                "platformFaultDomain": "0",
                "platformUpdateDomain": "0",
                "priority": "",
                "provider": "Microsoft.Compute",
                "publicKeys": [],
                "publisher": "Canonical",
                "resourceGroupName": self.resource_group,
                "resourceId": self.resource_id,
                "securityProfile": {
                    "encryptionAtHost": "false",
                    "secureBootEnabled": "true",
                    "securityType": "ConfidentialVM",
                    "virtualTpmEnabled": "true",
                },
                "sku": "22_04-lts-cvm",
                "storageProfile": {
                    "dataDisks": [],
                    "imageReference": {
                        "id": "",
                        "offer": "0001-com-ubuntu-confidential-vm-jammy",
                        "publisher": "Canonical",
                        "sku": "22_04-lts-cvm",
                        "version": "latest",
                    },
                    "osDisk": {
                        "caching": "ReadWrite",
                        "createOption": "FromImage",
                        "diskSizeGB": "64",
                        "name": f"{self.name}_OsDisk_1",
                        "osType": "Linux",
                        "writeAcceleratorEnabled": "false",
                    },
                },
                "subscriptionId": self.subscription_id,
                "tags": "",
                "tagsList": [],
                "userData": "",
                "version": "latest",
                "vmId": self.vm_id,
                "vmScaleSetName": "",
                "vmSize": self.vm_size,
                "zone": self.zone,
            },
            "network": {
                "interface": [
                    {
                        "ipv4": {
                            "ipAddress": [
                                {"privateIpAddress": self.private_ip, "publicIpAddress": ""}
                            ],
                            "subnet": [{"address": "10.0.0.0", "prefix": "24"}],
                        },
                        "ipv6": {"ipAddress": []},
                        "macAddress": self.mac,
                    }
                ]
            },
        }


INSTANCE_KEY = web.AppKey("instance", Instance)


def _error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


def _bad(message: str, status: int = 400, extra: dict[str, Any] | None = None) -> web.Response:
    """IMDS's own error shape (instance metadata, THIM): ``{"error": "<message>"}``."""
    return web.json_response({"error": message, **(extra or {})}, status=status)


def _fault_body(status: int) -> dict[str, str]:
    return {
        "error": "service_unavailable" if status >= 500 else "invalid_request",
        "error_description": f"injected fault: HTTP {status}",
    }


def audience(resource: str) -> str:
    """The token audience for a requested resource: no ``/.default`` scope suffix, no slash."""
    if resource.endswith("/.default"):
        resource = resource[: -len("/.default")]
    return resource.rstrip("/")


@web.middleware
async def _metadata_required(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every route needs ``Metadata: true`` and no ``X-Forwarded-For`` (IMDS refuses requests
    that were forwarded)."""
    identity_route = request.path.startswith("/metadata/identity/")
    if request.headers.get("Metadata", "").lower() != "true":
        if identity_route:
            return _error(400, "invalid_request", _HEADER_REQUIRED)
        return _bad(f"Bad request. {_HEADER_REQUIRED}")
    if "X-Forwarded-For" in request.headers:
        message = "Requests with an X-Forwarded-For header are not accepted"
        if identity_route:
            return _error(400, "invalid_request", message)
        return _bad(f"Bad request. {message}")
    return await handler(request)


def _route_faults(faults: Faults | None, path: str) -> Middleware:
    """The ``ak-renew`` knob: the renewal route only, after the service-wide ``imds`` one."""
    inner = httpfaults.middleware(faults, RENEW_FAULT, _renew_fault_body)

    @web.middleware
    async def apply(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == path:
            return await inner(request, handler)
        return await handler(request)

    return apply


def _renew_fault_body(status: int) -> dict[str, str]:
    return {"error": f"injected fault: HTTP {status}"}


def access_token(
    trust: Trust,
    identities: Identities,
    identity: Identity,
    resource: str,
    lifetime_s: int,
    now: int | None = None,
) -> tuple[str, int]:
    """An AAD v1 access token for ``identity`` and ``resource``; returns (token, exp)."""
    return access_token_signed_by(
        trust.aad_signing, identities, identity, resource, lifetime_s, now
    )


def access_token_signed_by(
    signer: Pair,
    identities: Identities,
    identity: Identity,
    resource: str,
    lifetime_s: int,
    now: int | None = None,
) -> tuple[str, int]:
    """:func:`access_token` with the token-signing pair (``pki/aad-signing``) given."""
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
    thumb = x5t(signer.cert)
    token = sign(claims, signer, kid=thumb, extra_header={"x5t": thumb})
    return token, exp


async def token(request: web.Request) -> web.Response:
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
        return _error(
            400,
            "invalid_resource",
            f"AADSTS500011: The resource principal named {resource} was not found",
        )
    selectors = {k: q[k] for k in ("client_id", "object_id", "msi_res_id") if k in q}
    if len(selectors) > 1:
        return _error(
            400,
            "invalid_request",
            "Only one of client_id, object_id or msi_res_id may be specified",
        )
    identities = request.app[IDENTITIES_KEY]
    identity = identities.select(**selectors)
    if identity is None:
        return _error(400, "invalid_request", "Identity not found")
    lifetime = int(request.app[SETTINGS_KEY]["lifetime_s"])
    tok, exp = access_token(request.app[TRUST_KEY], identities, identity, resource, lifetime)
    log.info("issued token: identity=%s aud=%s exp=%d", identity.name, audience(resource), exp)
    return web.json_response(
        {
            "access_token": tok,
            "client_id": identity.client_id,
            "expires_in": str(lifetime),
            "expires_on": str(exp),
            "ext_expires_in": str(lifetime),
            "not_before": str(exp - lifetime),
            "resource": resource,
            "token_type": "Bearer",
        }
    )


async def thim_certification(request: web.Request) -> web.Response:
    trust = request.app[TRUST_KEY]
    return web.json_response(
        {
            "vcekCert": trust.vcek.cert_pem.decode("ascii"),
            "certificateChain": (trust.ask.cert_pem + trust.ark.cert_pem).decode("ascii"),
            "tcbm": request.app[SETTINGS_KEY]["tcbm"],
            "cacheControl": THIM_CACHE_CONTROL,
        }
    )


def _api_version(request: web.Request, allowed: tuple[str, ...]) -> web.Response | None:
    version = request.query.get("api-version")
    if version is None:
        return _bad(_VERSION_MISSING, extra={"newest-versions": NEWEST_VERSIONS})
    if version not in allowed:
        return _bad(_VERSION_INVALID, extra={"newest-versions": NEWEST_VERSIONS})
    return None


_MISSING = object()


def _node(document: Any, path: str) -> Any:
    node = document
    for part in (p for p in path.split("/") if p):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _as_text(node: Any) -> str:
    """``format=text``: a leaf's bare value; an inner node's children, one a line, ``/`` after
    each that has children of its own."""
    if isinstance(node, dict):
        items: list[tuple[str, Any]] = list(node.items())
    elif isinstance(node, list):
        items = [(str(i), v) for i, v in enumerate(node)]
    else:
        return str(node)
    return "\n".join(k + ("/" if isinstance(v, dict | list) else "") for k, v in items)


async def instance_metadata(request: web.Request) -> web.Response:
    if request.method != "GET":
        return _bad("Bad request. Only GET is supported on this endpoint", status=405)
    refused = _api_version(request, INSTANCE_API_VERSIONS)
    if refused is not None:
        return refused
    fmt = request.query.get("format")
    if fmt not in (None, "json", "text"):
        return _bad(f"Bad request. format '{fmt}' is not supported; use json or text")
    node = _node(request.app[INSTANCE_KEY].document(), request.match_info.get("tail", ""))
    if node is _MISSING:
        return _bad("Not found", status=404)
    if fmt == "text":
        return web.Response(text=_as_text(node), content_type="text/plain")
    if fmt is None and not isinstance(node, dict | list):
        return _bad(
            "Bad request. Query parameter 'format' is required when querying a leaf "
            "node: use format=text"
        )
    return web.json_response(node)


async def versions(request: web.Request) -> web.Response:
    return web.json_response({"apiVersions": list(INSTANCE_API_VERSIONS)})


def _posted_certificate(body: bytes) -> x509.Certificate | None:
    """The AK certificate a renewal request carries: PEM, URL-encoded (curl_easy_escape) as the
    guest library sends it, or plain."""
    try:
        text = urllib.parse.unquote(body.decode("ascii"))
        return x509.load_pem_x509_certificate(text.strip().encode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None


async def renew_ak_certificate(request: web.Request) -> web.Response:
    """AK-certificate renewal (THIM): a fresh certificate for the AK the posted one names."""
    if request.method != "POST":
        return _bad("Bad request. Only POST is supported on this endpoint", status=405)
    refused = _api_version(request, RENEW_API_VERSIONS)
    if refused is not None:
        return refused
    instance = request.app[INSTANCE_KEY]
    vm_id, request_id = request.query.get("vmId", ""), request.query.get("requestId", "")
    if not vm_id or not request_id:
        return _bad("Bad request. Query parameters 'vmId' and 'requestId' are required")
    try:
        uuid.UUID(request_id)
        same_vm = uuid.UUID(vm_id) == uuid.UUID(instance.vm_id)
    except ValueError:
        return _bad("Bad request. 'vmId' and 'requestId' must be GUIDs")
    if not same_vm:
        return _bad(f"Bad request. vmId {vm_id} is not this VM's")
    body = await request.content.read(64 * 1024 + 1)
    if not body or len(body) > 64 * 1024:
        return _bad("Bad request. The body must hold the current AK certificate (PEM)")
    cert = _posted_certificate(body)
    if cert is None:
        return _bad("Bad request. The body is not a PEM certificate")
    trust = request.app[TRUST_KEY]
    try:
        cert.verify_directly_issued_by(trust.vtpm_ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        return _bad("Bad request. The certificate was not issued by the vTPM CA of this VM")
    ak = cert.public_key()
    current = request.app[AK_PUBLIC_KEY]()
    if not isinstance(ak, rsa.RSAPublicKey) or (
        current is not None and ak.public_numbers() != current.public_numbers()
    ):
        return _bad("Bad request. The certificate does not certify this VM's attestation key")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    subject = str(names[0].value) if names else instance.vm_id.upper()
    renewed = vtpm.issue_ak_certificate(trust, ak, subject)
    log.info(
        "renewed AK certificate for vm %s: serial %x, valid until %s",
        vm_id,
        renewed.serial_number,
        renewed.not_valid_after_utc.isoformat(),
    )
    pem = renewed.public_bytes(serialization.Encoding.PEM).decode("ascii")
    return web.json_response({"AkCertPem": pem})


def make_app(
    trust: Trust,
    faults: Faults | None,
    identities: Identities,
    *,
    token_lifetime_s: int = DEFAULT_LIFETIME_S,
    tcbm: str = DEFAULT_TCBM,
    instance: Instance | None = None,
    ak_public: AkLookup | None = None,
) -> web.Application:
    """The IMDS application; serve it over plain HTTP.

    ``instance`` is the VM the metadata describes (default: a fresh VM id for the identities'
    VM); ``ak_public`` returns the vTPM's AK public key, which a renewal must certify (None:
    any AK the vTPM CA certified).
    """
    if token_lifetime_s <= 0:
        raise ValueError("token lifetime must be positive")
    app = web.Application(
        middlewares=[
            httpfaults.middleware(faults, "imds", _fault_body),
            _route_faults(faults, RENEW_PATH),
            _metadata_required,
        ]
    )
    app[TRUST_KEY] = trust
    app[IDENTITIES_KEY] = identities
    app[SETTINGS_KEY] = {"lifetime_s": token_lifetime_s, "tcbm": tcbm}
    app[INSTANCE_KEY] = instance or Instance.for_identities(identities, str(uuid.uuid4()))
    app[AK_PUBLIC_KEY] = ak_public or (lambda: None)
    app.router.add_get(TOKEN_PATH, token)
    app.router.add_get(THIM_PATH, thim_certification)
    app.router.add_route("*", RENEW_PATH, renew_ak_certificate)
    app.router.add_get(VERSIONS_PATH, versions)
    app.router.add_route("*", INSTANCE_PATH, instance_metadata)
    app.router.add_route("*", INSTANCE_PATH + "/{tail:.*}", instance_metadata)
    return app
