"""testbed.imds and testbed.identities: managed-identity tokens and THIM, as IMDS serves them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from multidict import CIMultiDictProxy

from testbed import imds
from testbed.faults import Fault, Faults
from testbed.identities import CRYPTO_OFFICER, RELEASE_USER, Identities
from testbed.pki import Trust

pytestmark = pytest.mark.unit

TOKEN = imds.TOKEN_PATH
VAULT = "https://vault.azure.net"
META = {"Metadata": "true"}


@pytest.fixture(scope="module")
def trust() -> Trust:
    return Trust.create()


@pytest.fixture(scope="module")
def identities() -> Identities:
    return Identities.create()


Reply = tuple[int, Any, "CIMultiDictProxy[str]"]


def call(app: aiohttp.web.Application, path: str, *, params: dict[str, str] | None = None,
         headers: dict[str, str] | None = None, method: str = "GET") -> Reply:
    async def go() -> Reply:
        async with TestClient(TestServer(app)) as client:
            resp = await client.request(method, path, params=params, headers=headers)
            body = await resp.json(content_type=None) if resp.status != 405 else None
            return resp.status, body, resp.headers
    return asyncio.run(go())


def token_params(**extra: str) -> dict[str, str]:
    return {"api-version": "2018-02-01", "resource": VAULT} | extra


def verified(trust: Trust, token: str, audience: str = VAULT) -> dict[str, Any]:
    public = trust.aad_signing.cert.public_key()
    return dict(jwt.decode(token, public, algorithms=["RS256"],  # type: ignore[arg-type]
                           audience=audience))


# --- tokens ------------------------------------------------------------------------------------

def test_default_identity_token(trust: Trust, identities: Identities) -> None:
    before = int(time.time())
    status, body, _ = call(imds.make_app(trust, None, identities), TOKEN,
                           params=token_params(), headers=META)
    assert status == 200
    me = identities.default
    assert body["token_type"] == "Bearer"
    assert body["resource"] == VAULT
    assert body["client_id"] == me.client_id
    assert body["expires_in"] == "3600"
    assert isinstance(body["expires_on"], str) and int(body["expires_on"]) >= before + 3600
    claims = verified(trust, body["access_token"])
    assert claims["iss"] == f"https://sts.windows.net/{identities.tenant_id}/"
    assert claims["tid"] == identities.tenant_id
    assert claims["oid"] == me.object_id
    assert claims["appid"] == me.client_id
    assert claims["xms_mirid"] == me.resource_id
    assert claims["exp"] == int(body["expires_on"])
    assert claims["nbf"] <= claims["iat"] <= int(time.time())
    header = jwt.get_unverified_header(body["access_token"])
    assert header["alg"] == "RS256"
    assert header["kid"] == header["x5t"]


@pytest.mark.parametrize("resource", [VAULT, VAULT + "/", VAULT + "/.default"])
def test_audience_is_normalised(trust: Trust, identities: Identities, resource: str) -> None:
    status, body, _ = call(imds.make_app(trust, None, identities), TOKEN,
                           params=token_params(resource=resource), headers=META)
    assert status == 200
    assert body["resource"] == resource
    assert verified(trust, body["access_token"])["aud"] == VAULT


@pytest.mark.parametrize("selector", ["client_id", "object_id", "msi_res_id"])
def test_user_assigned_identity_by_each_selector(trust: Trust, identities: Identities,
                                                 selector: str) -> None:
    other = identities.named("noroles")
    value = {"client_id": other.client_id, "object_id": other.object_id,
             "msi_res_id": other.resource_id}[selector]
    status, body, _ = call(imds.make_app(trust, None, identities), TOKEN,
                           params=token_params(**{selector: value.upper()}), headers=META)
    assert status == 200
    assert body["client_id"] == other.client_id
    claims = verified(trust, body["access_token"])
    assert (claims["oid"], claims["xms_mirid"]) == (other.object_id, other.resource_id)


def test_token_lifetime_is_configurable(trust: Trust, identities: Identities) -> None:
    app = imds.make_app(trust, None, identities, token_lifetime_s=120)
    status, body, _ = call(app, TOKEN, params=token_params(), headers=META)
    assert status == 200
    assert body["expires_in"] == "120"
    claims = verified(trust, body["access_token"])
    assert claims["exp"] - claims["iat"] == 120


def test_thim_certification_serves_the_vcek_chain(trust: Trust, identities: Identities) -> None:
    status, body, _ = call(imds.make_app(trust, None, identities, tcbm="0400000000001AD2"),
                           imds.THIM_PATH, headers=META)
    assert status == 200
    assert x509.load_pem_x509_certificate(body["vcekCert"].encode()) == trust.vcek.cert
    chain = x509.load_pem_x509_certificates(body["certificateChain"].encode())
    assert chain == [trust.ask.cert, trust.ark.cert]
    assert body["tcbm"] == "0400000000001AD2"


# --- identities --------------------------------------------------------------------------------

def test_identities_persist_and_reload(tmp_path: Path) -> None:
    first = Identities.load_or_create(tmp_path)
    assert (tmp_path / "identities.json").is_file()
    again = Identities.load_or_create(tmp_path)
    assert again == first
    assert again.default.roles == (CRYPTO_OFFICER, RELEASE_USER)
    assert again.named("noroles").roles == ()
    assert not again.named("noroles").system_assigned
    assert again.select() == again.default
    assert again.select(client_id="00000000-0000-0000-0000-000000000000") is None


# --- refusals ----------------------------------------------------------------------------------

IMDS_ERRORS = [
    ("no metadata header", token_params(), {}, 400,
     {"error": "invalid_request", "error_description": "Required metadata header not specified"}),
    ("metadata false", token_params(), {"Metadata": "false"}, 400,
     {"error": "invalid_request", "error_description": "Required metadata header not specified"}),
    ("unknown client_id", token_params(client_id="11111111-2222-3333-4444-555555555555"), META,
     400, {"error": "invalid_request", "error_description": "Identity not found"}),
    ("unknown object_id", token_params(object_id="11111111-2222-3333-4444-555555555555"), META,
     400, {"error": "invalid_request", "error_description": "Identity not found"}),
    ("unknown msi_res_id", token_params(msi_res_id="/subscriptions/x/resourcegroups/y"), META,
     400, {"error": "invalid_request", "error_description": "Identity not found"}),
    ("two selectors", token_params(client_id="a", object_id="b"), META, 400,
     {"error": "invalid_request",
      "error_description": "Only one of client_id, object_id or msi_res_id may be specified"}),
    ("no resource", {"api-version": "2018-02-01"}, META, 400,
     {"error": "invalid_request",
      "error_description": "Required audience parameter not specified"}),
    ("no api-version", {"resource": VAULT}, META, 400,
     {"error": "invalid_request",
      "error_description": "Required query variable 'api-version' is missing"}),
    ("bad api-version", token_params(**{"api-version": "2017-01-01"}), META, 400,
     {"error": "invalid_request", "error_description": "Invalid api-version '2017-01-01'"}),
    ("resource not a URI", token_params(resource="vault"), META, 400,
     {"error": "invalid_resource",
      "error_description": "AADSTS500011: The resource principal named vault was not found"}),
]


@pytest.mark.parametrize(("case", "params", "headers", "status", "body"), IMDS_ERRORS,
                         ids=[c[0] for c in IMDS_ERRORS])
def test_token_refusals(trust: Trust, identities: Identities, case: str, params: dict[str, str],
                        headers: dict[str, str], status: int, body: dict[str, str]) -> None:
    got_status, got_body, _ = call(imds.make_app(trust, None, identities), TOKEN,
                                   params=params, headers=headers)
    assert (got_status, got_body) == (status, body)


def test_thim_without_metadata_header(trust: Trust, identities: Identities) -> None:
    status, body, _ = call(imds.make_app(trust, None, identities), imds.THIM_PATH)
    assert (status, body["error_description"]) == (400, "Required metadata header not specified")


def test_token_endpoint_takes_only_get(trust: Trust, identities: Identities) -> None:
    status, _, _ = call(imds.make_app(trust, None, identities), TOKEN, params=token_params(),
                        headers=META, method="POST")
    assert status == 405


def test_lifetime_must_be_positive(trust: Trust, identities: Identities) -> None:
    with pytest.raises(ValueError, match="lifetime must be positive"):
        imds.make_app(trust, None, identities, token_lifetime_s=0)


def test_status_fault_answers_once_with_retry_after(trust: Trust, identities: Identities,
                                                    tmp_path: Path) -> None:
    faults = Faults(tmp_path / "faults.json")
    faults.arm("imds", Fault(status=503, retry_after=7, count=1))
    app = imds.make_app(trust, faults, identities)

    async def go() -> list[tuple[int, str | None]]:
        async with TestClient(TestServer(app)) as client:
            out = []
            for _ in range(2):
                resp = await client.get(TOKEN, params=token_params(), headers=META)
                await resp.read()
                out.append((resp.status, resp.headers.get("Retry-After")))
            return out

    assert asyncio.run(go()) == [(503, "7"), (200, None)]


def test_down_fault_drops_the_connection(trust: Trust, identities: Identities,
                                         tmp_path: Path) -> None:
    faults = Faults(tmp_path / "faults.json")
    faults.arm("imds", Fault(down=True))
    with pytest.raises(aiohttp.ServerDisconnectedError):
        call(imds.make_app(trust, faults, identities), TOKEN, params=token_params(), headers=META)
