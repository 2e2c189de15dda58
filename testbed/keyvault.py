"""Azure Key Vault stand-in (serve over TLS): keys, wrap/unwrap, Secure Key Release.

Every request goes through what Key Vault does, in this order: fault knobs; bearer-token
authentication (no token: 401 with the ``WWW-Authenticate`` challenge the SDK's challenge policy
follows; a bad token: 401); the ``api-version``; the route; the caller's role for the operation
(RBAC, 403); the body (400); the key (404); the operation itself.

Routes (``{version}`` may be empty, meaning the newest, as the SDK sends ``/keys/k//release``):

- ``POST /keys/{name}/create``                     (Crypto Officer)
- ``GET  /keys/{name}``, ``/keys/{name}/``, ``/keys/{name}/{version}``  (Officer or User)
- ``POST /keys/{name}/{version}/wrapkey|unwrapkey`` (Officer or User)
- ``POST /keys/{name}/{version}/release``, ``/keys/{name}/release``  (Crypto Service Release
  User)

A release answer is signed by the vault's TLS service certificate (testbed.keyrelease); the
``kv-release`` fault knob acts on release answers only (status, latency, down, or
``foreign_signer``: signed by a valid certificate of the same chain for another host).

Errors are ``{"error": {"code", "message"[, "innererror": {"code"}]}}``; the inner code is the
stable reason (``ForbiddenByRbac``, ``KeyNotExportable``, ``UntrustedAuthority``,
``AttestationTokenInvalid``, ``ReleasePolicyNotSatisfied``, ``NoTransferKey``, ...).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from testbed import httpfaults, keyrelease, releasepolicy
from testbed.faults import Faults
from testbed.identities import (
    ADMINISTRATOR,
    CRYPTO_OFFICER,
    CRYPTO_USER,
    RELEASE_USER,
    Identities,
    Identity,
)
from testbed.jwks import TokenError, b64url, b64url_decode, load_roots, verify, x5t
from testbed.keystore import (
    DEFAULT_KEY_OPS,
    DEFAULT_POLICY_CONTENT_TYPE,
    KEY_OPS,
    KEY_SIZES,
    KEY_TYPES,
    NAME_RE,
    KeyStore,
    KeyVersion,
    StoredPolicy,
    generate,
)
from testbed.pki import Trust

RESOURCE = "https://vault.azure.net"
API_VERSIONS = ("7.3", "7.4", "7.5", "7.6", "2025-07-01")
AUTHORIZATION_AUTHORITY = "https://login.microsoftonline.com"
MAX_BODY_BYTES = 1024 * 1024
TOKEN_LEEWAY_S = 300  # AAD tokens: five minutes of clock skew, as Azure services allow
RELEASE_FAULT = "kv-release"  # the fault knob applied to release answers only

log = logging.getLogger("testbed.keyvault")


class VaultError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        inner: str | None = None,
        challenge: bool = False,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.inner, self.challenge = inner, challenge


@dataclass(frozen=True)
class Operation:
    name: str
    action: str  # the RBAC data action
    roles: tuple[str, ...]  # any one of these permits it

    @property
    def roles_named(self) -> str:
        """The roles a refusal names: those that grant just this kind of access."""
        named = [f"'{r}'" for r in self.roles if r != ADMINISTRATOR]
        return named[0] if len(named) == 1 else "one of " + ", ".join(named)


_KEYS = "Microsoft.KeyVault/vaults/keys"
OPERATIONS = {
    "get": Operation("get", f"{_KEYS}/read", (ADMINISTRATOR, CRYPTO_OFFICER, CRYPTO_USER)),
    "create": Operation("create", f"{_KEYS}/create/action", (ADMINISTRATOR, CRYPTO_OFFICER)),
    "wrapkey": Operation(
        "wrapkey", f"{_KEYS}/wrap/action", (ADMINISTRATOR, CRYPTO_OFFICER, CRYPTO_USER)
    ),
    "unwrapkey": Operation(
        "unwrapkey", f"{_KEYS}/unwrap/action", (ADMINISTRATOR, CRYPTO_OFFICER, CRYPTO_USER)
    ),
    "release": Operation("release", f"{_KEYS}/release/action", (ADMINISTRATOR, RELEASE_USER)),
}
WRAP_ALGORITHMS: dict[str, Callable[[], padding.AsymmetricPadding]] = {
    # JWA defines RSA-OAEP as OAEP with SHA-1 and MGF1-SHA-1; Key Vault serves it as such.
    "RSA-OAEP": lambda: padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None),  # noqa: S303
    "RSA-OAEP-256": lambda: padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None),
    "RSA1_5": padding.PKCS1v15,
}


@dataclass
class Vault:
    trust: Trust
    identities: Identities
    vault_url: str
    store: KeyStore
    roots: list[x509.Certificate]
    ssl_ctx: ssl.SSLContext
    faults: Faults | None = None
    session: aiohttp.ClientSession | None = None


VAULT_KEY = web.AppKey("vault", Vault)


@dataclass(frozen=True)
class Caller:
    identity: Identity
    appid: str


def _error_body(status: int, code: str, message: str, inner: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if inner is not None:
        err["innererror"] = {"code": inner}
    return {"error": err}


def _fault_body(status: int) -> dict[str, Any]:
    code = {403: "Forbidden", 429: "Throttled"}.get(
        status, "ServiceUnavailable" if status >= 500 else "BadRequest"
    )
    return _error_body(status, code, f"injected fault: HTTP {status}")


def _challenge(identities: Identities) -> str:
    return (
        f'Bearer authorization="{AUTHORIZATION_AUTHORITY}/{identities.tenant_id}", '
        f'resource="{RESOURCE}"'
    )


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except VaultError as exc:
        headers = None
        if exc.challenge:
            headers = {"WWW-Authenticate": _challenge(request.app[VAULT_KEY].identities)}
        log.info("%s %s -> %d %s", request.method, request.path, exc.status, exc.inner or exc.code)
        return web.json_response(
            _error_body(exc.status, exc.code, exc.message, exc.inner),
            status=exc.status,
            headers=headers,
        )


def authenticate(vault: Vault, request: web.Request) -> Caller:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise VaultError(
            401, "Unauthorized", "Request is missing a Bearer or PoP token.", challenge=True
        )
    thumb = x5t(vault.trust.aad_signing.cert)
    public = vault.trust.aad_signing.key.public_key()
    assert isinstance(public, rsa.RSAPublicKey)  # noqa: S101 - pki makes it RSA
    try:
        claims = verify(
            token.strip(),
            {thumb: public},
            issuer=vault.identities.issuer,
            audience=[RESOURCE, RESOURCE + "/"],
            leeway_s=TOKEN_LEEWAY_S,
        )
    except TokenError as exc:
        inner, message = {
            "audience": ("InvalidAudience", f"AKV10022: Invalid audience. Expected {RESOURCE}."),
            "issuer": (
                "InvalidIssuer",
                f"AKV10032: Invalid issuer. Expected {vault.identities.issuer}.",
            ),
            "expired": ("TokenExpired", "Invalid token: the token has expired."),
            "not-yet-valid": ("TokenNotYetValid", "Invalid token: the token is not yet valid."),
            "unknown-kid": ("UnknownSigningKey", "Invalid token: signed by an unknown key."),
            "signature": ("InvalidSignature", "Invalid token: signature verification failed."),
        }.get(exc.reason, ("InvalidToken", f"Invalid token: {exc.message}"))
        raise VaultError(401, "Unauthorized", message, inner=inner, challenge=True) from None
    oid, appid = claims.get("oid"), claims.get("appid")
    if claims.get("tid") != vault.identities.tenant_id or not isinstance(oid, str):
        raise VaultError(
            401,
            "Unauthorized",
            "Invalid token: no tenant/oid for this vault's tenant.",
            challenge=True,
        )
    identity = vault.identities.by_object_id(oid)
    if identity is None:
        raise VaultError(
            403,
            "Forbidden",
            f"Caller is not authorized to perform action on "
            f"resource. Caller: oid={oid} is not a principal of tenant "
            f"{vault.identities.tenant_id}.",
            inner="ForbiddenByRbac",
        )
    return Caller(identity, str(appid))


def authorize(vault: Vault, caller: Caller, op: Operation, name: str) -> None:
    if any(role in caller.identity.roles for role in op.roles):
        return
    held = ", ".join(caller.identity.roles) or "none"
    raise VaultError(
        403,
        "Forbidden",
        f"Caller is not authorized to perform action on resource. Caller: appid={caller.appid};"
        f"oid={caller.identity.object_id} ({caller.identity.principal_name}). Action: "
        f"'{op.action}'. Resource: '{vault.vault_url}/keys/{name}'. Missing role: "
        f"{op.roles_named} (roles held: {held}).",
        inner="ForbiddenByRbac",
    )


def _bad(message: str) -> VaultError:
    return VaultError(400, "BadParameter", message)


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise _bad("The request body is too large.")
    try:
        body = json.loads(raw)
    except ValueError:
        raise _bad("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object.")
    return body


def _b64url_field(body: dict[str, Any], field: str) -> bytes:
    value = body.get(field)
    if not isinstance(value, str):
        raise _bad(f"Property '{field}' is required and must be a base64url string.")
    try:
        return b64url_decode(value)
    except ValueError:
        raise _bad(f"Property '{field}' is not valid base64url.") from None


def _key(vault: Vault, name: str, version: str) -> KeyVersion:
    kv = vault.store.get(name, version)
    if kv is None:
        shown = f"{name}/{version}" if version else name
        raise VaultError(
            404,
            "KeyNotFound",
            f"A key with (name/id) {shown} was not found in "
            "this key vault. If you recently deleted this key you may be able to "
            "recover it using the correct recovery command.",
        )
    return kv


def _usable(kv: KeyVersion, operation: str) -> None:
    """Refuse an operation on a disabled, not yet valid or expired key, or one without the op."""
    now = time.time()
    if not kv.enabled:
        raise VaultError(
            403,
            "Forbidden",
            f"Operation {operation} is not allowed on a disabled key.",
            inner="KeyDisabled",
        )
    if (kv.not_before is not None and now < kv.not_before) or (
        kv.expires is not None and now > kv.expires
    ):
        raise VaultError(
            403,
            "Forbidden",
            f"Operation {operation} is not allowed on a key outside its validity period.",
            inner="KeyNotValid",
        )
    if operation in KEY_OPS and operation not in kv.key_ops:
        raise VaultError(
            403,
            "Forbidden",
            f"Operation {operation} is not permitted on this key.",
            inner="KeyOperationForbidden",
        )


async def create_key(vault: Vault, request: web.Request, name: str) -> dict[str, Any]:
    body = await _body(request)
    kty = body.get("kty")
    if kty not in KEY_TYPES:
        raise _bad(
            f"Property 'kty' = {kty!r} is not supported here; expected one of "
            f"{', '.join(KEY_TYPES)}."
        )
    size = body.get("key_size", 2048)
    if size not in KEY_SIZES or isinstance(size, bool):
        raise _bad(
            f"Property 'key_size' = {size!r}: expected one of {', '.join(map(str, KEY_SIZES))}."
        )
    if body.get("public_exponent", 65537) != 65537:
        raise _bad("Property 'public_exponent': only 65537 is supported.")
    ops = body.get("key_ops", list(DEFAULT_KEY_OPS))
    if not isinstance(ops, list) or not ops or any(op not in KEY_OPS for op in ops):
        raise _bad(
            f"Property 'key_ops' = {ops!r}: expected a list drawn from {', '.join(KEY_OPS)}."
        )
    attrs = body.get("attributes") or {}
    tags = body.get("tags") or {}
    if (
        not isinstance(attrs, dict)
        or not isinstance(tags, dict)
        or any(not isinstance(v, str) for v in tags.values())
    ):
        raise _bad("Properties 'attributes' and 'tags' must be objects (tags of strings).")
    exportable = attrs.get("exportable", False)
    enabled = attrs.get("enabled", True)
    nbf, exp = attrs.get("nbf"), attrs.get("exp")
    if (
        not isinstance(exportable, bool)
        or not isinstance(enabled, bool)
        or any(
            t is not None and (not isinstance(t, int) or isinstance(t, bool)) for t in (nbf, exp)
        )
    ):
        raise _bad("Property 'attributes': enabled/exportable must be booleans, nbf/exp integers.")
    policy = _release_policy(body.get("release_policy"))
    if exportable and policy is None:
        raise _bad("AKV.SKR.1004: Exportable keys must have release policy.")
    if exportable and kty != "RSA-HSM":
        raise _bad("Exportable keys must be HSM-protected: use kty 'RSA-HSM'.")
    private_key = await asyncio.get_running_loop().run_in_executor(None, generate, size)
    kv = vault.store.add(
        name,
        kty,
        private_key,
        key_ops=tuple(ops),
        enabled=enabled,
        exportable=exportable,
        not_before=nbf,
        expires=exp,
        tags=tags,
        release_policy=policy,
    )
    log.info(
        "created key %s/%s kty=%s size=%d exportable=%s", kv.name, kv.version, kty, size, exportable
    )
    return kv.bundle(vault.vault_url)


def _release_policy(wire: Any) -> StoredPolicy | None:
    if wire is None:
        return None
    if not isinstance(wire, dict):
        raise _bad("Property 'release_policy' must be an object.")
    content_type = wire.get("contentType") or DEFAULT_POLICY_CONTENT_TYPE
    if not isinstance(content_type, str) or not content_type.lower().startswith("application/json"):
        raise _bad(
            f"Release policy contentType {content_type!r} is not supported; expected "
            f"'{DEFAULT_POLICY_CONTENT_TYPE}'."
        )
    immutable = wire.get("immutable", False)
    if not isinstance(immutable, bool):
        raise _bad("Release policy 'immutable' must be a boolean.")
    data = _b64url_field(wire, "data")
    try:
        releasepolicy.parse(data)
    except releasepolicy.PolicyError as exc:
        raise _bad(f"Release policy is invalid: {exc}") from None
    return StoredPolicy(data, content_type, immutable)


async def key_operation(
    vault: Vault, request: web.Request, kv: KeyVersion, operation: str
) -> dict[str, Any]:
    body = await _body(request)
    alg = body.get("alg")
    if alg not in WRAP_ALGORITHMS:
        raise _bad(f"Property 'alg' = {alg!r}: expected one of {', '.join(WRAP_ALGORITHMS)}.")
    value = _b64url_field(body, "value")
    op = "wrapKey" if operation == "wrapkey" else "unwrapKey"
    _usable(kv, op)
    pad = WRAP_ALGORITHMS[alg]()
    try:
        if operation == "wrapkey":
            result = kv.private_key.public_key().encrypt(value, pad)
        else:
            result = kv.private_key.decrypt(value, pad)
    except ValueError:
        raise _bad(f"{op} failed: the value does not fit {alg} with this key.") from None
    log.info("%s with %s/%s alg=%s", op, kv.name, kv.version, alg)
    return {"kid": kv.kid(vault.vault_url), "value": b64url(result)}


async def release_key(
    vault: Vault, request: web.Request, kv_name: str, version: str
) -> dict[str, Any]:
    body = await _body(request)
    target = body.get("target")
    if not isinstance(target, str) or not target:
        raise _bad("Property 'target' (the attestation token) is required.")
    nonce = body.get("nonce")
    if nonce is not None and not isinstance(nonce, str):
        raise _bad("Property 'nonce' must be a string.")
    enc = body.get("enc") or keyrelease.DEFAULT_ENC
    if enc not in keyrelease.ENC_HASHES:
        raise _bad(
            f"Property 'enc' = {enc!r} is not supported; expected one of "
            f"{', '.join(keyrelease.ENC_HASHES)}."
        )
    kv = _key(vault, kv_name, version)
    if not kv.exportable or kv.release_policy is None:
        raise VaultError(
            403,
            "Forbidden",
            f"Key {kv.name}/{kv.version} is not exportable: it cannot be released.",
            inner="KeyNotExportable",
        )
    _usable(kv, "release")
    assert vault.session is not None  # noqa: S101 - opened on startup
    try:
        policy = releasepolicy.parse(kv.release_policy.data)
        _, transfer = await keyrelease.verify_target(
            target, policy, vault.session, vault.ssl_ctx, vault.roots
        )
    except keyrelease.ReleaseRefused as exc:
        if exc.status == 400:
            raise _bad(exc.message) from None
        raise VaultError(exc.status, "Forbidden", exc.message, inner=exc.code) from None
    signer = await _release_fault(vault, request)
    # request.kid echoes the key URL as the request named it: without a version when it
    # named none (``/keys/k/release`` and ``/keys/k//release`` alike).
    requested_kid = vault.vault_url + request.path.removesuffix("/release").rstrip("/")
    jws = keyrelease.release_jws(
        vault.trust,
        kv,
        vault.vault_url,
        api_version=request.query["api-version"],
        enc=enc,
        nonce=nonce,
        transfer=transfer,
        requested_kid=requested_kid,
        signer_role=signer,
    )
    log.info(
        "released key %s/%s enc=%s to transfer key %r (signed by %s)",
        kv.name,
        kv.version,
        enc,
        transfer.kid,
        signer,
    )
    return {"value": jws}


async def _release_fault(vault: Vault, request: web.Request) -> str:
    """The ``kv-release`` fault knob, applied to a release that is about to be answered;
    returns the role of the certificate that signs the answer."""
    fault = vault.faults.take(RELEASE_FAULT) if vault.faults is not None else None
    if fault is None:
        return "kv_tls"
    if fault.latency_s > 0:
        await asyncio.sleep(fault.latency_s)
    if fault.down:
        if request.transport is not None:
            request.transport.abort()
        raise web.HTTPServiceUnavailable()  # never reaches the client: the socket is gone
    if fault.status is not None:
        body = _fault_body(fault.status)["error"]
        raise VaultError(fault.status, body["code"], body["message"])
    return "kv_tls_foreign" if fault.foreign_signer else "kv_tls"


def _route(method: str, path: str) -> tuple[str, str, str] | None:
    """(operation, key name, version) for a vault path; None when no route matches."""
    parts = path.split("/")
    if len(parts) < 3 or parts[0] != "" or parts[1] != "keys" or not parts[2]:
        return None
    name, rest = parts[2], parts[3:]
    if method == "GET" and (not rest or rest == [""]):
        return ("get", name, "")
    if method == "GET" and len(rest) == 1:
        return ("get", name, rest[0])
    if method == "POST" and rest == ["create"]:
        return ("create", name, "")
    if method == "POST" and len(rest) == 2 and rest[1] in ("wrapkey", "unwrapkey", "release"):
        return (rest[1], name, rest[0])
    if method == "POST" and rest == ["release"]:  # no version: the newest
        return ("release", name, "")
    return None


async def dispatch(request: web.Request) -> web.Response:
    vault = request.app[VAULT_KEY]
    caller = authenticate(vault, request)
    api_version = request.query.get("api-version")
    if api_version is None:
        raise _bad("The 'api-version' query parameter is required.")
    if api_version not in API_VERSIONS:
        raise _bad(
            f"The specified version ({api_version}) is not recognized. Consider using "
            f"the latest supported version ({API_VERSIONS[-1]})."
        )
    route = _route(request.method, request.path)
    if route is None:
        raise VaultError(
            404 if request.method in ("GET", "POST") else 405,
            "NotFound",
            f"No operation {request.method} {request.path} on this vault.",
        )
    operation, name, version = route
    if not NAME_RE.match(name):
        raise _bad(f"The request URI contains an invalid name: {name}")
    authorize(vault, caller, OPERATIONS[operation], name)
    if operation == "create":
        return web.json_response(await create_key(vault, request, name))
    if operation == "release":
        return web.json_response(await release_key(vault, request, name, version))
    kv = _key(vault, name, version)
    if operation == "get":
        return web.json_response(kv.bundle(vault.vault_url))
    return web.json_response(await key_operation(vault, request, kv, operation))


def make_app(
    trust: Trust,
    faults: Faults | None,
    identities: Identities,
    *,
    vault_url: str,
    maa_ca_bundle: Path,
    state_dir: Path | None = None,
) -> web.Application:
    """The Key Vault application; serve it over TLS (``trust.chain_pem("kv_tls")``) at
    ``vault_url``.

    ``maa_ca_bundle`` holds the roots attestation authorities' TLS and JWKS x5c chains must
    lead to. Keys persist under ``state_dir``; by default the directory the identities were
    loaded from (memory only when they were never saved).
    """
    if not vault_url.startswith("https://"):
        raise ValueError(f"vault_url {vault_url!r}: Key Vault is served over https only")
    if state_dir is None and identities.path is not None:
        state_dir = identities.path.parent / "keyvault"
    vault = Vault(
        trust=trust,
        identities=identities,
        vault_url=vault_url.rstrip("/"),
        store=KeyStore(state_dir),
        roots=load_roots(maa_ca_bundle),
        ssl_ctx=ssl.create_default_context(cafile=str(maa_ca_bundle)),
        faults=faults,
    )
    app = web.Application(
        middlewares=[httpfaults.middleware(faults, "keyvault", _fault_body), _errors]
    )
    app[VAULT_KEY] = vault

    async def session_ctx(app: web.Application) -> Any:
        vault.session = aiohttp.ClientSession()
        yield
        await vault.session.close()
        vault.session = None

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app
