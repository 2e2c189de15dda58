"""testbed.keyvault: authentication, RBAC, keys, wrap/unwrap and Secure Key Release.

The vault and an attestation authority (testbed.maa's OpenID metadata and JWKS) run in-process
over TLS on loopback sockets; attestation tokens are signed here with the authority's key, as MAA
would sign them, and access tokens are minted the way testbed.imds mints them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding
from cryptography.x509.oid import ExtendedKeyUsageOID

from testbed import imds, keyvault, maa
from testbed.faults import Fault, Faults
from testbed.identities import CRYPTO_OFFICER, CRYPTO_USER, Identities, Identity
from testbed.jwks import b64url, b64url_decode, sign, x5t
from testbed.pki import Pair, Trust, issue, rsa_key

pytestmark = pytest.mark.unit

T = TypeVar("T")
VAULT = "https://vault.azure.net"
OAEP_HASH = {
    "CKM_RSA_AES_KEY_WRAP": hashes.SHA1(),  # noqa: S303 - OAEP-SHA1 by definition
    "RSA_AES_KEY_WRAP_256": hashes.SHA256(),
    "RSA_AES_KEY_WRAP_384": hashes.SHA384(),
}


@pytest.fixture(scope="module")
def trust() -> Trust:
    return Trust.create()


@pytest.fixture(scope="module")
def transfer() -> rsa.RSAPrivateKey:
    """The stand-in for the vTPM's ephemeral encryption key."""
    return rsa_key()


@pytest.fixture(scope="module")
def identities() -> Identities:
    base = Identities.create()
    officer = Identity(
        "officer",
        "c0ffee00-0000-4000-8000-000000000001",
        "c0ffee00-0000-4000-8000-000000000002",
        "officer-only",
        "/subscriptions/s/resourcegroups/r/providers/Microsoft.ManagedIdentity/"
        "userAssignedIdentities/officer",
        False,
        (CRYPTO_OFFICER,),
    )
    user = replace(
        officer,
        name="user",
        client_id="c0ffee00-0000-4000-8000-000000000003",
        object_id="c0ffee00-0000-4000-8000-000000000004",
        principal_name="user-only",
        roles=(CRYPTO_USER,),
    )
    return replace(base, members=(*base.members, officer, user))


def _socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    return sock


@dataclass
class Env:
    trust: Trust
    identities: Identities
    vault_url: str
    maa_url: str
    session: aiohttp.ClientSession
    transfer: rsa.RSAPrivateKey
    tmp: Path

    def access_token(self, who: str = "system", **overrides: Any) -> str:
        token, _ = imds.access_token(
            self.trust, self.identities, self.identities.named(who), VAULT, 3600
        )
        if not overrides:
            return token
        claims = jwt.decode(token, options={"verify_signature": False}) | overrides
        return sign(claims, self.trust.aad_signing, kid=jwt.get_unverified_header(token)["kid"])

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        who: str | None = "system",
        token: str | None = None,
        api: str | None = "7.4",
    ) -> tuple[int, Any, Any]:
        headers = {}
        if token is None and who is not None:
            token = self.access_token(who)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        params = {"api-version": api} if api is not None else {}
        raw = body if isinstance(body, bytes) else None
        async with self.session.request(
            method,
            self.vault_url + path,
            params=params,
            json=None if raw is not None else body,
            data=raw,
            headers=headers,
        ) as resp:
            return resp.status, await resp.json(content_type=None), resp.headers

    def policy(self, *conditions: dict[str, Any], authority: str | None = None) -> dict[str, Any]:
        conds = list(conditions) or [
            {"claim": "x-ms-isolation-tee.x-ms-attestation-type", "equals": "sevsnpvm"},
            {"claim": "x-ms-isolation-tee.x-ms-compliance-status", "equals": "azure-compliant-cvm"},
        ]
        doc = {
            "version": "1.0.0",
            "anyOf": [{"authority": authority or self.maa_url, "allOf": conds}],
        }
        return {
            "contentType": "application/json; charset=utf-8",
            "data": b64url(json.dumps(doc).encode()),
            "immutable": False,
        }

    async def create(
        self,
        name: str,
        *,
        exportable: bool = True,
        kty: str = "RSA-HSM",
        policy: dict[str, Any] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"kty": kty, "attributes": {"exportable": exportable}} | extra
        if exportable or policy is not None:
            body["release_policy"] = policy or self.policy()
        status, reply, _ = await self.call("POST", f"/keys/{name}/create", body)
        assert status == 200, reply
        return dict(reply)

    def attestation(
        self, *, signer: Pair | None = None, kid: str | None = None, **overrides: Any
    ) -> str:
        numbers = self.transfer.public_key().public_numbers()
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.maa_url,
            "iat": now,
            "nbf": now,
            "exp": now + 600,
            "x-ms-attestation-type": "azurevm",
            "x-ms-isolation-tee": {
                "x-ms-attestation-type": "sevsnpvm",
                "x-ms-compliance-status": "azure-compliant-cvm",
            },
            "x-ms-runtime": {
                "keys": [
                    {
                        "kid": "HCLAkPub",
                        "kty": "RSA",
                        "key_ops": ["sign"],
                        "e": "AQAB",
                        "n": "AQAB",
                    },
                    {
                        "kid": "TpmEphemeralEncryptionKey",
                        "kty": "RSA",
                        "key_ops": ["encrypt"],
                        "n": b64url(numbers.n.to_bytes(256, "big")),
                        "e": "AQAB",
                    },
                ]
            },
        } | overrides
        signer = signer or self.trust.maa_signing
        return sign(
            claims,
            signer,
            kid=kid or x5t(self.trust.maa_signing.cert),
            extra_header={"jku": f"{self.maa_url}/certs"},
        )


@contextlib.asynccontextmanager
async def running(
    trust: Trust,
    identities: Identities,
    transfer: rsa.RSAPrivateKey,
    tmp: Path,
    faults: Faults | None = None,
) -> AsyncIterator[Env]:
    pki = tmp / "pki"
    if not pki.exists():
        trust.save(pki)
    maa_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    maa_ctx.load_cert_chain(pki / "tls.pem", pki / "tls.key")
    kv_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    kv_ctx.load_cert_chain(pki / "kv-tls.pem", pki / "kv-tls.key")
    maa_sock, kv_sock = _socket(), _socket()
    maa_url = f"https://127.0.0.1:{maa_sock.getsockname()[1]}"
    vault_url = f"https://127.0.0.1:{kv_sock.getsockname()[1]}"
    apps = [
        (maa.make_app(trust, None, issuer=maa_url), maa_sock, maa_ctx),
        (
            keyvault.make_app(
                trust,
                faults,
                identities,
                vault_url=vault_url,
                maa_ca_bundle=pki / "ca.pem",
                state_dir=tmp / "vault",
            ),
            kv_sock,
            kv_ctx,
        ),
    ]
    runners = []
    try:
        for app, sock, server_ctx in apps:
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            runners.append(runner)
            await web.SockSite(runner, sock, ssl_context=server_ctx).start()
        client_ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        connector = aiohttp.TCPConnector(ssl=client_ctx, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            yield Env(trust, identities, vault_url, maa_url, session, transfer, tmp)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        maa_sock.close()
        kv_sock.close()


@pytest.fixture
def run(
    trust: Trust, identities: Identities, transfer: rsa.RSAPrivateKey, tmp_path: Path
) -> Callable[..., Any]:
    def runner(scenario: Callable[[Env], Awaitable[T]], faults: Faults | None = None) -> T:
        async def main() -> T:
            async with running(trust, identities, transfer, tmp_path, faults) as env:
                return await scenario(env)

        return asyncio.run(main())

    return runner


def _segments(jws: str) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """The compact JWS's header and payload (member order kept) and its signature."""
    parts = jws.split(".")
    assert len(parts) == 3 and not any("=" in p for p in parts)
    return (
        json.loads(b64url_decode(parts[0])),
        json.loads(b64url_decode(parts[1])),
        b64url_decode(parts[2]),
    )


def _unwrap_release(
    env: Env, jws: str, signer: str = "kv_tls"
) -> tuple[dict[str, Any], rsa.RSAPrivateKey, str]:
    """Verify the release JWS like a careful client; return (payload, released key, enc)."""
    header, _, _ = _segments(jws)
    assert list(header) == ["alg", "kid", "x5t", "typ", "x5t#S256", "x5c"]
    assert (header["alg"], header["typ"]) == ("RS256", "JWT")
    chain = [
        x509.load_der_x509_certificate(base64.b64decode(c, validate=True)) for c in header["x5c"]
    ]
    assert chain == [getattr(env.trust, signer).cert, env.trust.tls_issuing.cert, env.trust.ca.cert]
    chain[0].verify_directly_issued_by(chain[1])
    chain[1].verify_directly_issued_by(chain[2])
    der = chain[0].public_bytes(serialization.Encoding.DER)
    assert header["kid"] == hashlib.sha1(der).hexdigest().upper()  # noqa: S324
    assert header["x5t"] == b64url(hashlib.sha1(der).digest())  # noqa: S324
    assert header["x5t#S256"] == b64url(hashlib.sha256(der).digest())
    payload = jwt.decode(jws, chain[0].public_key(), algorithms=["RS256"])  # type: ignore[arg-type]
    jwk = payload["response"]["key"]["key"]
    raw_blob = b64url_decode(jwk["key_hsm"])
    blob = json.loads(raw_blob)
    assert list(blob) == ["schema_version", "header", "ciphertext"]
    assert list(blob["header"]) == ["kid", "alg", "enc"]
    assert blob["schema_version"] == "1.0"
    assert blob["header"]["alg"] == "dir"
    assert blob["header"]["kid"] == "TpmEphemeralEncryptionKey"
    enc = blob["header"]["enc"]
    assert enc == payload["request"]["enc"]
    ciphertext = b64url_decode(blob["ciphertext"])
    k_aes = env.transfer.decrypt(
        ciphertext[:256], padding.OAEP(padding.MGF1(OAEP_HASH[enc]), OAEP_HASH[enc], None)
    )
    key = serialization.load_der_private_key(
        aes_key_unwrap_with_padding(k_aes, ciphertext[256:]), None
    )
    assert isinstance(key, rsa.RSAPrivateKey)
    return payload, key, enc


def _error(reply: Any) -> tuple[str, str | None, str]:
    err = reply["error"]
    return err["code"], err.get("innererror", {}).get("code"), err["message"]


# --- keys --------------------------------------------------------------------------------------


def test_create_and_get_by_version_latest_and_trailing_slash(run: Callable[..., Any]) -> None:
    async def scenario(env: Env) -> None:
        first = await env.create("kek", key_size=3072, key_ops=["wrapKey", "unwrapKey"])
        second = await env.create("kek")
        kid = second["key"]["kid"]
        name, version = kid.rsplit("/", 2)[-2:]
        assert kid == f"{env.vault_url}/keys/kek/{version}" and name == "kek"
        assert len(version) == 32 and int(version, 16) >= 0
        assert second["key"]["kty"] == "RSA-HSM"
        assert second["key"]["e"] == "AQAB"
        assert len(b64url_decode(first["key"]["n"])) == 384
        assert first["key"]["key_ops"] == ["wrapKey", "unwrapKey"]
        attrs = second["attributes"]
        assert attrs["enabled"] is True and attrs["exportable"] is True
        assert attrs["recoveryLevel"] == "Recoverable+Purgeable"
        assert isinstance(attrs["created"], int) and attrs["updated"] == attrs["created"]
        assert second["release_policy"]["data"] == env.policy()["data"]
        for path in ("/keys/kek", "/keys/kek/", f"/keys/kek/{version}", f"/keys/KEK/{version}"):
            status, got, _ = await env.call("GET", path)
            assert (status, got["key"]["kid"]) == (200, kid), path
        status, got, _ = await env.call("GET", "/keys/kek/" + first["key"]["kid"].split("/")[-1])
        assert (status, got["key"]["n"]) == (200, first["key"]["n"])
        assert "private" not in json.dumps(got) and "d" not in got["key"]

    run(scenario)


def test_keys_survive_a_restart(run: Callable[..., Any], tmp_path: Path) -> None:
    async def first(env: Env) -> dict[str, Any]:
        return await env.create("persisted")

    async def second(env: Env) -> dict[str, Any]:
        status, got, _ = await env.call("GET", "/keys/persisted")
        assert status == 200
        return dict(got)

    created = run(first)
    assert (tmp_path / "vault" / "keys.json").stat().st_mode & 0o777 == 0o600
    again = run(second)
    assert again["key"]["kid"].split("/")[-2:] == created["key"]["kid"].split("/")[-2:]
    assert again["key"]["n"] == created["key"]["n"]


@pytest.mark.parametrize("alg", ["RSA-OAEP", "RSA-OAEP-256", "RSA1_5"])
def test_wrap_and_unwrap(run: Callable[..., Any], alg: str) -> None:
    async def scenario(env: Env) -> None:
        key = await env.create("wrapper", exportable=False)
        version = key["key"]["kid"].split("/")[-1]
        dek = bytes(range(32))
        for who in ("system", "user"):
            status, wrapped, _ = await env.call(
                "POST",
                f"/keys/wrapper/{version}/wrapkey",
                {"alg": alg, "value": b64url(dek)},
                who=who,
            )
            assert status == 200 and wrapped["kid"] == key["key"]["kid"]
            status, unwrapped, _ = await env.call(
                "POST",
                f"/keys/wrapper/{version}/unwrapkey",
                {"alg": alg, "value": wrapped["value"]},
                who=who,
            )
            assert status == 200 and b64url_decode(unwrapped["value"]) == dek
        # What a client wraps locally with the public key unwraps in the vault too.
        n = int.from_bytes(b64url_decode(key["key"]["n"]), "big")
        public = rsa.RSAPublicNumbers(65537, n).public_key()
        local = public.encrypt(dek, keyvault.WRAP_ALGORITHMS[alg]())
        status, unwrapped, _ = await env.call(
            "POST", f"/keys/wrapper/{version}/unwrapkey", {"alg": alg, "value": b64url(local)}
        )
        assert status == 200 and b64url_decode(unwrapped["value"]) == dek

    run(scenario)


# --- release -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "enc", [None, "CKM_RSA_AES_KEY_WRAP", "RSA_AES_KEY_WRAP_256", "RSA_AES_KEY_WRAP_384"]
)
def test_release_wraps_the_key_to_the_transfer_key(
    run: Callable[..., Any], enc: str | None
) -> None:
    async def scenario(env: Env) -> None:
        key = await env.create("model-kek")
        version = key["key"]["kid"].split("/")[-1]
        body: dict[str, Any] = {"target": env.attestation(), "nonce": "abc"}
        if enc is not None:
            body["enc"] = enc
        status, reply, _ = await env.call(
            "POST", f"/keys/model-kek/{version}/release", body, api="7.6"
        )
        assert status == 200, reply
        payload, released, got_enc = _unwrap_release(env, reply["value"])
        assert got_enc == (enc or "CKM_RSA_AES_KEY_WRAP")
        assert payload["request"] == {
            "api-version": "7.6",
            "enc": got_enc,
            "kid": key["key"]["kid"],
            "nonce": "abc",
        }
        out = payload["response"]["key"]
        assert list(out) == ["key", "attributes", "release_policy"]
        assert out["key"]["kid"] == key["key"]["kid"] and out["key"]["kty"] == "RSA"
        assert out["attributes"]["exportable"] is True
        assert out["release_policy"] == {"data": key["release_policy"]["data"], "immutable": False}
        n = released.public_key().public_numbers().n
        assert b64url(n.to_bytes(256, "big")) == key["key"]["n"]

    run(scenario)


def test_release_of_the_latest_version_by_double_slash(run: Callable[..., Any]) -> None:
    async def scenario(env: Env) -> None:
        await env.create("kek")
        latest = await env.create("kek")
        status, reply, _ = await env.call(
            "POST", "/keys/kek//release", {"target": env.attestation()}, api="2025-07-01"
        )
        assert status == 200, reply
        payload, _, _ = _unwrap_release(env, reply["value"])
        assert payload["response"]["key"]["key"]["kid"] == latest["key"]["kid"]
        # The key URL as requested (no version), the service's default enc, no nonce.
        assert payload["request"] == {
            "api-version": "2025-07-01",
            "enc": "CKM_RSA_AES_KEY_WRAP",
            "kid": f"{env.vault_url}/keys/kek",
        }

    run(scenario)


@pytest.mark.parametrize("path", ["/keys/KeK/release", "/keys/KeK//release"])
def test_release_without_a_version_echoes_the_key_url_as_requested(
    run: Callable[..., Any], path: str
) -> None:
    async def scenario(env: Env) -> None:
        key = await env.create("kek")
        status, reply, _ = await env.call("POST", path, {"target": env.attestation()}, api="7.4")
        assert status == 200, reply
        payload, _, _ = _unwrap_release(env, reply["value"])
        assert payload["request"]["kid"] == f"{env.vault_url}/keys/KeK"
        assert payload["response"]["key"]["key"]["kid"] == key["key"]["kid"]
        status, reply, _ = await env.call(
            "POST", "/keys/nokey/release", {"target": env.attestation()}
        )
        assert (status, _error(reply)[0]) == (404, "KeyNotFound")

    run(scenario)


def test_release_under_a_policy_whose_authority_has_no_scheme(run: Callable[..., Any]) -> None:
    async def scenario(env: Env) -> None:
        bare = env.maa_url.removeprefix("https://") + "/"
        key = await env.create("kek", policy=env.policy(authority=bare))
        status, reply, _ = await env.call(
            "POST", "/keys/kek//release", {"target": env.attestation()}
        )
        assert status == 200, reply
        payload, _, _ = _unwrap_release(env, reply["value"])
        policy = json.loads(b64url_decode(payload["response"]["key"]["release_policy"]["data"]))
        assert policy["anyOf"][0]["authority"] == bare  # kept as the client wrote it
        assert key["release_policy"]["data"] == payload["response"]["key"]["release_policy"]["data"]

    run(scenario)


def test_release_is_signed_by_the_vault_tls_certificate(run: Callable[..., Any]) -> None:
    async def scenario(env: Env) -> None:
        await env.create("kek")
        status, reply, _ = await env.call(
            "POST", "/keys/kek//release", {"target": env.attestation()}
        )
        assert status == 200
        # What the vault's TLS listener presents, as a client trusting only the root sees it.
        port = int(env.vault_url.rsplit(":", 1)[1])
        ctx = ssl.create_default_context(cafile=str(env.tmp / "pki" / "ca.pem"))
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"
        )
        presented = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        await writer.wait_closed()
        header, _, _ = _segments(reply["value"])
        assert base64.b64decode(header["x5c"][0]) == presented

    run(scenario)


def test_vault_tls_certificate_is_shaped_like_key_vaults(trust: Trust) -> None:
    leaf, issuing, root = trust.chain("kv_tls")
    ext = leaf.cert.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = ext.get_extension_for_class(x509.KeyUsage).value
    assert (usage.digital_signature, usage.key_encipherment, usage.key_cert_sign) == (
        True,
        True,
        False,
    )
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert ext.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest == (
        x509.SubjectKeyIdentifier.from_public_key(leaf.cert.public_key()).digest
    )
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert (
        aki
        == issuing.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    )
    basic = issuing.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert (basic.ca, basic.path_length) == (True, 0)
    ca_usage = issuing.cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert (ca_usage.key_cert_sign, ca_usage.crl_sign, ca_usage.digital_signature) == (
        True,
        True,
        False,
    )
    assert issuing.cert.issuer == root.cert.subject and root.cert == trust.ca.cert
    foreign = trust.kv_tls_foreign.cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value
    assert foreign.get_values_for_type(x509.DNSName) == ["evil.example"]
    assert foreign.get_values_for_type(x509.IPAddress) == []


# --- refusals: authentication ------------------------------------------------------------------


def test_no_token_gets_the_challenge(run: Callable[..., Any]) -> None:
    async def scenario(env: Env) -> None:
        status, reply, headers = await env.call("POST", "/keys/k/create", who=None)
        assert status == 401
        assert headers["WWW-Authenticate"] == (
            f'Bearer authorization="https://login.microsoftonline.com/'
            f'{env.identities.tenant_id}", resource="https://vault.azure.net"'
        )
        assert reply == {
            "error": {
                "code": "Unauthorized",
                "message": "Request is missing a Bearer or PoP token.",
            }
        }

    run(scenario)


@pytest.mark.parametrize(
    ("case", "overrides", "inner"),
    [
        (
            "expired",
            {"exp": int(time.time()) - 3600, "nbf": int(time.time()) - 7200},
            "TokenExpired",
        ),
        ("not yet valid", {"nbf": int(time.time()) + 3600}, "TokenNotYetValid"),
        ("wrong audience", {"aud": "https://storage.azure.com"}, "InvalidAudience"),
        (
            "other tenant",
            {"iss": "https://sts.windows.net/00000000-0000-0000-0000-000000000000/"},
            "InvalidIssuer",
        ),
    ],
)
def test_bad_access_tokens_are_401(
    run: Callable[..., Any], case: str, overrides: dict[str, Any], inner: str
) -> None:
    async def scenario(env: Env) -> None:
        status, reply, headers = await env.call(
            "GET", "/keys/k", token=env.access_token(**overrides)
        )
        assert status == 401 and "WWW-Authenticate" in headers
        assert _error(reply)[:2] == ("Unauthorized", inner)

    run(scenario)


def test_foreign_access_token_is_401(run: Callable[..., Any]) -> None:
    async def scenario(env: Env) -> None:
        genuine = env.access_token()
        claims = jwt.decode(genuine, options={"verify_signature": False})
        forged = sign(
            claims, issue("impostor", rsa_key()), kid=jwt.get_unverified_header(genuine)["kid"]
        )
        status, reply, _ = await env.call("GET", "/keys/k", token=forged)
        assert status == 401
        assert _error(reply) == (
            "Unauthorized",
            "InvalidSignature",
            "Invalid token: signature verification failed.",
        )
        other_kid = sign(claims, env.trust.maa_signing)
        status, reply, _ = await env.call("GET", "/keys/k", token=other_kid)
        assert (status, _error(reply)[1]) == (401, "UnknownSigningKey")

    run(scenario)


# --- refusals: roles ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "method", "path", "role"),
    [
        ("noroles", "POST", "/keys/k/create", "'Key Vault Crypto Officer'"),
        ("noroles", "GET", "/keys/k", "one of 'Key Vault Crypto Officer', 'Key Vault Crypto User'"),
        ("user", "POST", "/keys/k/create", "'Key Vault Crypto Officer'"),
        ("officer", "POST", "/keys/k//release", "'Key Vault Crypto Service Release User'"),
        (
            "noroles",
            "POST",
            "/keys/k/v/unwrapkey",
            "one of 'Key Vault Crypto Officer', 'Key Vault Crypto User'",
        ),
    ],
)
def test_missing_role_is_403_naming_it(
    run: Callable[..., Any], who: str, method: str, path: str, role: str
) -> None:
    async def scenario(env: Env) -> None:
        status, reply, _ = await env.call(method, path, {}, who=who)
        assert status == 403
        code, inner, message = _error(reply)
        assert (code, inner) == ("Forbidden", "ForbiddenByRbac")
        assert f"Missing role: {role} (roles held: " in message
        assert env.identities.named(who).object_id in message

    run(scenario)


# --- refusals: requests and keys ---------------------------------------------------------------


def test_exportable_key_without_policy(run: Callable[..., Any]) -> None:
    async def scenario(env: Env) -> None:
        status, reply, _ = await env.call(
            "POST", "/keys/k/create", {"kty": "RSA-HSM", "attributes": {"exportable": True}}
        )
        assert (status, _error(reply)) == (
            400,
            ("BadParameter", None, "AKV.SKR.1004: Exportable keys must have release policy."),
        )

    run(scenario)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"kty": "EC"}, "Property 'kty' = 'EC' is not supported"),
        ({"kty": "RSA", "key_size": 1024}, "Property 'key_size' = 1024"),
        ({"kty": "RSA", "key_ops": ["fly"]}, "Property 'key_ops'"),
        ({"kty": "RSA", "public_exponent": 3}, "only 65537"),
        (
            {
                "kty": "RSA",
                "attributes": {"exportable": True},
                "release_policy": {"data": b64url(b'{"version":"1.0.0","anyOf":[]}')},
            },
            "Release policy is invalid: policy.anyOf: expected a non-empty array",
        ),
        (
            {
                "kty": "RSA-HSM",
                "attributes": {"exportable": True},
                "release_policy": {"data": "not base64!"},
            },
            "Property 'data' is not valid base64url",
        ),
        (
            {"kty": "RSA-HSM", "release_policy": {"contentType": "text/plain", "data": "e30"}},
            "contentType 'text/plain' is not supported",
        ),
    ],
)
def test_malformed_create_is_400(
    run: Callable[..., Any], body: dict[str, Any], message: str
) -> None:
    async def scenario(env: Env) -> None:
        status, reply, _ = await env.call("POST", "/keys/k/create", body)
        assert status == 400 and _error(reply)[0] == "BadParameter"
        assert message in _error(reply)[2]

    run(scenario)


def test_exportable_software_key_is_refused(run: Callable[..., Any]) -> None:
    async def scenario(env: Env) -> None:
        status, reply, _ = await env.call(
            "POST",
            "/keys/k/create",
            {"kty": "RSA", "attributes": {"exportable": True}, "release_policy": env.policy()},
        )
        assert (status, _error(reply)[2]) == (
            400,
            "Exportable keys must be HSM-protected: use kty 'RSA-HSM'.",
        )

    run(scenario)


def test_unknown_key_and_version_are_404(run: Callable[..., Any]) -> None:
    async def scenario(env: Env) -> None:
        status, reply, _ = await env.call("GET", "/keys/absent")
        assert (status, _error(reply)[0]) == (404, "KeyNotFound")
        assert "A key with (name/id) absent was not found" in _error(reply)[2]
        await env.create("present")
        status, reply, _ = await env.call("GET", "/keys/present/" + "0" * 32)
        assert (status, _error(reply)[0]) == (404, "KeyNotFound")
        status, reply, _ = await env.call(
            "POST", "/keys/present/" + "0" * 32 + "/release", {"target": env.attestation()}
        )
        assert (status, _error(reply)[0]) == (404, "KeyNotFound")

    run(scenario)


@pytest.mark.parametrize(
    ("api", "message"),
    [
        (None, "The 'api-version' query parameter is required."),
        ("2016-10-01", "The specified version (2016-10-01) is not recognized."),
    ],
)
def test_api_version_is_checked(run: Callable[..., Any], api: str | None, message: str) -> None:
    async def scenario(env: Env) -> None:
        status, reply, _ = await env.call("GET", "/keys/k", api=api)
        assert status == 400 and _error(reply)[2].startswith(message)

    run(scenario)


def test_wrap_refusals(run: Callable[..., Any]) -> None:
    async def scenario(env: Env) -> None:
        key = await env.create("signer", exportable=False, key_ops=["sign", "verify"])
        version = key["key"]["kid"].split("/")[-1]
        path = f"/keys/signer/{version}"
        status, reply, _ = await env.call(
            "POST", path + "/wrapkey", {"alg": "RSA-OAEP-256", "value": b64url(b"k" * 32)}
        )
        assert (status, _error(reply)[1]) == (403, "KeyOperationForbidden")
        status, reply, _ = await env.call(
            "POST", path + "/wrapkey", {"alg": "A256KW", "value": b64url(b"k" * 32)}
        )
        assert (status, _error(reply)[0]) == (400, "BadParameter")
        await env.create("wrapper", exportable=False)
        status, reply, _ = await env.call(
            "POST", "/keys/wrapper//unwrapkey", {"alg": "RSA-OAEP-256", "value": b64url(b"x" * 256)}
        )
        assert (status, _error(reply)[2]) == (
            400,
            "unwrapKey failed: the value does not fit RSA-OAEP-256 with this key.",
        )
        status, reply, _ = await env.call("POST", "/keys/wrapper//unwrapkey", b"[]")
        assert (status, _error(reply)[2]) == (400, "The request body must be a JSON object.")

    run(scenario)


# --- refusals: release -------------------------------------------------------------------------


def test_release_of_a_non_exportable_key_is_403(run: Callable[..., Any]) -> None:
    async def scenario(env: Env) -> None:
        await env.create("fixed", exportable=False)
        status, reply, _ = await env.call(
            "POST", "/keys/fixed//release", {"target": env.attestation()}
        )
        assert (status, _error(reply)[:2]) == (403, ("Forbidden", "KeyNotExportable"))

    run(scenario)


def test_release_with_unknown_enc_or_no_target_is_400(run: Callable[..., Any]) -> None:
    async def scenario(env: Env) -> None:
        await env.create("kek")
        status, reply, _ = await env.call(
            "POST", "/keys/kek//release", {"target": env.attestation(), "enc": "A256KW"}
        )
        assert (status, _error(reply)[2]) == (
            400,
            (
                "Property 'enc' = 'A256KW' is not supported; expected one of CKM_RSA_AES_KEY_WRAP, "
                "RSA_AES_KEY_WRAP_256, RSA_AES_KEY_WRAP_384."
            ),
        )
        status, reply, _ = await env.call("POST", "/keys/kek//release", {"nonce": "x"})
        assert (status, _error(reply)[0]) == (400, "BadParameter")
        status, reply, _ = await env.call("POST", "/keys/kek//release", {"target": "nope"})
        assert status == 400 and "target is not an attestation token" in _error(reply)[2]

    run(scenario)


def test_release_policy_mismatch_names_the_claim(run: Callable[..., Any]) -> None:
    async def scenario(env: Env) -> None:
        await env.create("kek")
        tee: dict[str, Any] = {
            "x-ms-isolation-tee": {
                "x-ms-attestation-type": "sevsnpvm",
                "x-ms-compliance-status": "debug-cvm",
            }
        }
        status, reply, _ = await env.call(
            "POST", "/keys/kek//release", {"target": env.attestation(**tee)}
        )
        assert status == 403
        code, inner, message = _error(reply)
        assert (code, inner) == ("Forbidden", "ReleasePolicyNotSatisfied")
        assert message.endswith(
            "claim 'x-ms-isolation-tee.x-ms-compliance-status' expected "
            'equals "azure-compliant-cvm", found "debug-cvm"'
        )

    run(scenario)


def test_release_to_an_untrusted_authority_is_403(run: Callable[..., Any]) -> None:
    async def scenario(env: Env) -> None:
        await env.create("kek", policy=env.policy(authority="https://other.attest.azure.net"))
        status, reply, _ = await env.call(
            "POST", "/keys/kek//release", {"target": env.attestation()}
        )
        assert (status, _error(reply)[1]) == (403, "UntrustedAuthority")
        assert f"issuer '{env.maa_url}'" in _error(reply)[2]

    run(scenario)


def test_tampered_expired_and_foreign_targets_are_403(run: Callable[..., Any]) -> None:
    async def scenario(env: Env) -> None:
        await env.create("kek")
        head, body, sig = env.attestation().split(".")
        claims = json.loads(b64url_decode(body))
        claims["x-ms-isolation-tee"]["x-ms-compliance-status"] = "azure-compliant-cvm "
        tampered = ".".join([head, b64url(json.dumps(claims).encode()), sig])
        expired = env.attestation(exp=int(time.time()) - 3600, nbf=int(time.time()) - 7200)
        foreign = env.attestation(signer=issue("impostor", rsa_key()))
        unknown_kid = env.attestation(kid="some-other-kid")
        for target, reason in (
            (tampered, "(signature)"),
            (expired, "(expired)"),
            (foreign, "(signature)"),
            (unknown_kid, "(unknown-kid)"),
        ):
            status, reply, _ = await env.call("POST", "/keys/kek//release", {"target": target})
            assert (status, _error(reply)[1]) == (403, "AttestationTokenInvalid"), reason
            assert reason in _error(reply)[2]

    run(scenario)


def test_target_without_a_transfer_key_is_403(run: Callable[..., Any]) -> None:
    async def scenario(env: Env) -> None:
        await env.create("kek")
        runtime: dict[str, Any] = {
            "x-ms-runtime": {
                "keys": [
                    {"kid": "HCLAkPub", "kty": "RSA", "key_ops": ["sign"], "e": "AQAB", "n": "AQAB"}
                ]
            }
        }
        target = env.attestation(**runtime)
        status, reply, _ = await env.call("POST", "/keys/kek//release", {"target": target})
        assert (status, _error(reply)[1]) == (403, "NoTransferKey")

    run(scenario)


def test_unreachable_authority_is_403(run: Callable[..., Any]) -> None:
    async def scenario(env: Env) -> None:
        closed = _socket()
        dead = f"https://127.0.0.1:{closed.getsockname()[1]}"
        closed.close()
        await env.create("kek", policy=env.policy(authority=dead))
        status, reply, _ = await env.call(
            "POST", "/keys/kek//release", {"target": env.attestation(iss=dead)}
        )
        assert (status, _error(reply)[1]) == (403, "AuthorityMetadataUnavailable")

    run(scenario)


def test_jwks_not_chaining_to_a_trusted_root_is_refused(run: Callable[..., Any]) -> None:
    rogue = issue("rogue MAA", rsa_key(), ca=False)

    async def scenario(env: Env) -> None:
        sock = _socket()
        issuer = f"https://127.0.0.1:{sock.getsockname()[1]}"
        app = web.Application()

        async def metadata(_: web.Request) -> web.Response:
            return web.json_response({"issuer": issuer, "jwks_uri": f"{issuer}/certs"})

        async def certs(_: web.Request) -> web.Response:
            return web.json_response(
                {
                    "keys": [
                        {
                            "kid": "rogue",
                            "kty": "RSA",
                            "x5c": [base64.b64encode(rogue.cert_der).decode()],
                        }
                    ]
                }
            )

        app.router.add_get("/.well-known/openid-configuration", metadata)
        app.router.add_get("/certs", certs)
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(env.tmp / "pki/tls.pem", env.tmp / "pki/tls.key")
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.SockSite(runner, sock, ssl_context=server_ctx).start()
            await env.create("kek", policy=env.policy(authority=issuer))
            target = env.attestation(signer=rogue, kid="rogue", iss=issuer)
            status, reply, _ = await env.call("POST", "/keys/kek//release", {"target": target})
        finally:
            await runner.cleanup()
            sock.close()
        assert (status, _error(reply)[1]) == (403, "AuthorityMetadataUnavailable")
        assert "does not lead to a trusted root" in _error(reply)[2]

    run(scenario)


# --- faults ------------------------------------------------------------------------------------


def test_foreign_signer_fault_signs_for_another_host(
    run: Callable[..., Any], tmp_path: Path
) -> None:
    faults = Faults(tmp_path / "faults.json")
    faults.arm("kv-release", Fault(foreign_signer=True, count=1))

    async def scenario(env: Env) -> None:
        await env.create("kek")
        status, reply, _ = await env.call(
            "POST", "/keys/kek//release", {"target": env.attestation()}
        )
        assert status == 200, reply
        # A valid chain to the same root, a valid signature: only the host is wrong.
        payload, _, _ = _unwrap_release(env, reply["value"], signer="kv_tls_foreign")
        assert payload["request"]["kid"] == f"{env.vault_url}/keys/kek"
        status, reply, _ = await env.call(
            "POST", "/keys/kek//release", {"target": env.attestation()}
        )
        _unwrap_release(env, reply["value"])  # used up: the vault's own again

    run(scenario, faults)


def test_release_fault_fails_only_releases(run: Callable[..., Any], tmp_path: Path) -> None:
    faults = Faults(tmp_path / "faults.json")

    async def scenario(env: Env) -> None:
        key = await env.create("kek")
        faults.arm("kv-release", Fault(status=503, count=1))
        status, got, _ = await env.call("GET", "/keys/kek")
        assert (status, got["key"]["kid"]) == (200, key["key"]["kid"])
        status, reply, _ = await env.call(
            "POST", "/keys/kek//release", {"target": env.attestation()}
        )
        assert (status, reply) == (
            503,
            {"error": {"code": "ServiceUnavailable", "message": "injected fault: HTTP 503"}},
        )
        # A refused release does not consume it: the fault acts on answers about to be given.
        faults.arm("kv-release", Fault(status=503, count=1))
        status, reply, _ = await env.call(
            "POST", "/keys/kek//release", {"target": env.attestation(iss="https://evil")}
        )
        assert (status, _error(reply)[1]) == (403, "UntrustedAuthority")
        status, reply, _ = await env.call(
            "POST", "/keys/kek//release", {"target": env.attestation()}
        )
        assert status == 503
        status, reply, _ = await env.call(
            "POST", "/keys/kek//release", {"target": env.attestation()}
        )
        assert status == 200

    run(scenario, faults)


def test_status_fault_then_recovery(run: Callable[..., Any], tmp_path: Path) -> None:
    faults = Faults(tmp_path / "faults.json")
    faults.arm("keyvault", Fault(status=503, retry_after=3, count=1))

    async def scenario(env: Env) -> None:
        status, reply, headers = await env.call("GET", "/keys/k")
        assert (status, headers["Retry-After"], _error(reply)[0]) == (
            503,
            "3",
            "ServiceUnavailable",
        )
        status, _, _ = await env.call("GET", "/keys/k")
        assert status == 404

    run(scenario, faults)


def test_down_fault_drops_the_connection(run: Callable[..., Any], tmp_path: Path) -> None:
    faults = Faults(tmp_path / "faults.json")
    faults.arm("keyvault", Fault(down=True))

    async def scenario(env: Env) -> None:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await env.call("GET", "/keys/k")
        faults.clear("keyvault")
        status, _, _ = await env.call("GET", "/keys/k")
        assert status == 404

    run(scenario, faults)
