"""The unmodified Azure SDKs against the testbed's IMDS, MAA and Key Vault, over real sockets.

Only endpoint and trust settings change: ``AZURE_POD_IDENTITY_AUTHORITY_HOST`` points
ManagedIdentityCredential at the IMDS stand-in (plain HTTP); KeyClient and CryptographyClient get
the vault URL, ``connection_verify=<ca.pem>`` and ``verify_challenge_resource=False`` (the vault
is served from 127.0.0.1, not a ``*.vault.azure.net`` host). The attestation token for Secure Key
Release is signed here with the MAA stand-in's key, and its OpenID metadata and JWKS are served
by testbed.maa over TLS, so Key Vault verifies it the way it verifies MAA's.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from azure.core.exceptions import HttpResponseError
from azure.identity import ManagedIdentityCredential
from azure.keyvault.keys import (
    KeyClient,
    KeyExportEncryptionAlgorithm,
    KeyReleasePolicy,
)
from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding

from testbed import imds, keyvault, maa
from testbed.identities import Identities
from testbed.jwks import b64url, b64url_decode, sign, x5t
from testbed.pki import Trust, rsa_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

OAEP = {
    "CKM_RSA_AES_KEY_WRAP": hashes.SHA1(),  # noqa: S303 - CKM_RSA_AES_KEY_WRAP is OAEP-SHA1
    "RSA_AES_KEY_WRAP_256": hashes.SHA256(),
    "RSA_AES_KEY_WRAP_384": hashes.SHA384(),
}


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    return sock


class Loop:
    """An asyncio loop in a thread serving aiohttp apps on pre-bound loopback sockets."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []

    def serve(
        self, app: web.Application, sock: socket.socket, ssl_ctx: ssl.SSLContext | None = None
    ) -> None:
        async def start() -> None:
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.SockSite(runner, sock, ssl_context=ssl_ctx).start()
            self.runners.append(runner)

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

        async def stop() -> None:
            for runner in reversed(self.runners):
                # A client may still hold a kept-alive TLS connection; a graceful TLS close
                # would wait for its close_notify, so drop what is left instead.
                for conn in list(runner.server.connections if runner.server else ()):
                    if conn.transport is not None:
                        conn.transport.abort()
                await runner.cleanup()
            await asyncio.sleep(0)

        self.loop.run_until_complete(stop())
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()


@dataclass
class Bed:
    trust: Trust
    identities: Identities
    ca: Path
    imds_url: str
    maa_url: str
    vault_url: str


@pytest.fixture(scope="module")
def trust() -> Trust:
    return Trust.create()


@pytest.fixture
def bed(trust: Trust, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bed]:
    pki = tmp_path / "pki"
    trust.save(pki)
    ca = pki / "ca.pem"
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pki / "tls.pem", pki / "tls.key")
    vault_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    vault_ctx.load_cert_chain(pki / "kv-tls.pem", pki / "kv-tls.key")
    identities = Identities.load_or_create(tmp_path / "state")
    socks = {name: _listening_socket() for name in ("imds", "maa", "kv")}
    ports = {name: s.getsockname()[1] for name, s in socks.items()}
    b = Bed(
        trust,
        identities,
        ca,
        f"http://127.0.0.1:{ports['imds']}",
        f"https://127.0.0.1:{ports['maa']}",
        f"https://127.0.0.1:{ports['kv']}",
    )
    loop = Loop()
    try:
        loop.serve(imds.make_app(trust, None, identities), socks["imds"])
        loop.serve(maa.make_app(trust, None, issuer=b.maa_url), socks["maa"], server_ctx)
        loop.serve(
            keyvault.make_app(trust, None, identities, vault_url=b.vault_url, maa_ca_bundle=ca),
            socks["kv"],
            vault_ctx,
        )
        for var in (
            "IDENTITY_ENDPOINT",
            "IDENTITY_HEADER",
            "MSI_ENDPOINT",
            "MSI_SECRET",
            "IMDS_ENDPOINT",
            "AZURE_CLIENT_ID",
        ):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", b.imds_url)
        yield b
    finally:
        loop.close()
        for s in socks.values():
            s.close()


def _policy(bed: Bed, attestation_type: str = "sevsnpvm") -> bytes:
    return json.dumps(
        {
            "version": "1.0.0",
            "anyOf": [
                {
                    "authority": bed.maa_url + "/",
                    "allOf": [
                        {
                            "claim": "x-ms-isolation-tee.x-ms-attestation-type",
                            "equals": attestation_type,
                        },
                        {
                            "claim": "x-ms-isolation-tee.x-ms-compliance-status",
                            "equals": "azure-compliant-cvm",
                        },
                    ],
                }
            ],
        }
    ).encode()


def _attestation_token(bed: Bed, transfer: rsa.RSAPrivateKey) -> str:
    numbers = transfer.public_key().public_numbers()
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": bed.maa_url,
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
                    "kid": "TpmEphemeralEncryptionKey",
                    "kty": "RSA",
                    "key_ops": ["encrypt"],
                    "n": b64url(numbers.n.to_bytes(256, "big")),
                    "e": b64url(b"\x01\x00\x01"),
                }
            ]
        },
    }
    return sign(
        claims,
        bed.trust.maa_signing,
        kid=x5t(bed.trust.maa_signing.cert),
        extra_header={"jku": f"{bed.maa_url}/certs"},
    )


def _key_client(bed: Bed, credential: ManagedIdentityCredential) -> KeyClient:
    return KeyClient(
        bed.vault_url, credential, connection_verify=str(bed.ca), verify_challenge_resource=False
    )


def test_managed_identity_credential_gets_a_vault_token(bed: Bed) -> None:
    with ManagedIdentityCredential() as cred:
        token = cred.get_token("https://vault.azure.net/.default")
    claims = jwt.decode(token.token, options={"verify_signature": False})
    assert claims["aud"] == "https://vault.azure.net"
    assert claims["oid"] == bed.identities.default.object_id
    assert claims["iss"] == f"https://sts.windows.net/{bed.identities.tenant_id}/"
    assert token.expires_on > time.time() + 3000


def test_user_assigned_identity_is_chosen_by_client_id(bed: Bed) -> None:
    other = bed.identities.named("noroles")
    with ManagedIdentityCredential(client_id=other.client_id) as cred:
        token = cred.get_token("https://vault.azure.net/.default")
    assert jwt.decode(token.token, options={"verify_signature": False})["oid"] == other.object_id


def test_key_client_creates_gets_and_releases_an_exportable_hsm_key(bed: Bed) -> None:
    transfer = rsa_key()
    with ManagedIdentityCredential() as cred, _key_client(bed, cred) as client:
        created = client.create_rsa_key(
            "model-kek",
            size=3072,
            hardware_protected=True,
            exportable=True,
            release_policy=KeyReleasePolicy(_policy(bed), immutable=True),
        )
        assert created.key_type == "RSA-HSM"
        assert created.properties.exportable is True
        assert created.properties.release_policy is not None
        assert json.loads(created.properties.release_policy.encoded_policy) == json.loads(
            _policy(bed)
        )
        fetched = client.get_key("model-kek")
        assert fetched.id == created.id
        modulus = created.key.n  # type: ignore[attr-defined]
        assert fetched.key.n == modulus  # type: ignore[attr-defined]
        assert client.get_key("model-kek", created.properties.version).id == created.id

        for alg in (None, KeyExportEncryptionAlgorithm.rsa_aes_key_wrap_256):
            result = client.release_key(
                "model-kek", _attestation_token(bed, transfer), algorithm=alg, nonce="n-123"
            )
            assert result.value is not None
            payload = json.loads(b64url_decode(result.value.split(".")[1]))
            assert payload["request"]["nonce"] == "n-123"
            released = payload["response"]["key"]["key"]
            assert released["kid"] == created.id
            blob = json.loads(b64url_decode(released["key_hsm"]))
            enc = blob["header"]["enc"]
            assert enc == (alg.value if alg else "CKM_RSA_AES_KEY_WRAP")
            ciphertext = b64url_decode(blob["ciphertext"])
            k_aes = transfer.decrypt(
                ciphertext[:256], padding.OAEP(padding.MGF1(OAEP[enc]), OAEP[enc], None)
            )
            private = serialization.load_der_private_key(
                aes_key_unwrap_with_padding(k_aes, ciphertext[256:]), None
            )
            assert isinstance(private, rsa.RSAPrivateKey)
            n = private.public_key().public_numbers().n
            assert n.to_bytes(384, "big") == modulus
            # The SDK asked for the newest version: /keys/model-kek//release.
            assert payload["request"]["kid"] == f"{bed.vault_url}/keys/model-kek"
            # The JWS verifies with the certificate in its own x5c: the vault's TLS
            # certificate, whose chain (with the root) is in x5c.
            header = jwt.get_unverified_header(result.value)
            chain = [x509.load_der_x509_certificate(base64.b64decode(c)) for c in header["x5c"]]
            assert chain == [bed.trust.kv_tls.cert, bed.trust.tls_issuing.cert, bed.trust.ca.cert]
            jwt.decode(
                result.value,
                chain[0].public_key(),  # type: ignore[arg-type]
                algorithms=["RS256"],
            )


def test_release_refused_by_policy_reaches_the_sdk_as_403(bed: Bed) -> None:
    with ManagedIdentityCredential() as cred, _key_client(bed, cred) as client:
        client.create_rsa_key(
            "tdx-only",
            hardware_protected=True,
            exportable=True,
            release_policy=KeyReleasePolicy(_policy(bed, "tdxvm")),
        )
        with pytest.raises(HttpResponseError) as info:
            client.release_key("tdx-only", _attestation_token(bed, rsa_key()))
    assert info.value.status_code == 403
    assert "x-ms-isolation-tee.x-ms-attestation-type" in str(info.value.message)
    assert '"tdxvm"' in str(info.value.message)


def test_exportable_key_without_policy_is_refused_as_the_service_does(bed: Bed) -> None:
    with ManagedIdentityCredential() as cred, _key_client(bed, cred) as client:
        with pytest.raises(HttpResponseError) as info:
            client.create_rsa_key("bare", hardware_protected=True, exportable=True)
    assert info.value.status_code == 400
    assert info.value.error is not None
    assert info.value.error.code == "BadParameter"
    assert "AKV.SKR.1004: Exportable keys must have release policy." in str(info.value.message)


def test_identity_without_roles_is_forbidden(bed: Bed) -> None:
    other = bed.identities.named("noroles")
    with (
        ManagedIdentityCredential(client_id=other.client_id) as cred,
        _key_client(bed, cred) as client,
    ):
        with pytest.raises(HttpResponseError) as info:
            client.create_rsa_key("nope", hardware_protected=True)
    assert info.value.status_code == 403
    assert "Key Vault Crypto Officer" in str(info.value.message)


def test_cryptography_client_wraps_locally_and_unwraps_in_the_vault(
    bed: Bed, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="testbed.keyvault")
    dek = bytes(range(32))
    with ManagedIdentityCredential() as cred:
        with _key_client(bed, cred) as client:
            key = client.create_rsa_key("wrapper", hardware_protected=True)
        with CryptographyClient(
            key.id, cred, connection_verify=str(bed.ca), verify_challenge_resource=False
        ) as crypto:
            wrapped = crypto.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, dek)
            assert wrapped.key_id == key.id
            assert (
                crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped.encrypted_key).key == dek
            )
            sha1 = crypto.wrap_key(KeyWrapAlgorithm.rsa_oaep, dek)
            assert crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep, sha1.encrypted_key).key == dek
    operations = [
        r.getMessage().split(" ")[0]
        for r in caplog.records
        if r.name == "testbed.keyvault" and "Key with wrapper/" in r.getMessage()
    ]
    # The SDK wraps with the public key it fetched; only unwrapping needs the vault.
    assert operations == ["unwrapKey", "unwrapKey"]
