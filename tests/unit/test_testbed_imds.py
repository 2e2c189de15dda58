"""testbed.imds and testbed.identities: managed-identity tokens, instance metadata, THIM and AK
certificate renewal, as IMDS serves them."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from multidict import CIMultiDictProxy

from testbed import env, hcl, imds, snp, vtpm
from testbed.faults import Fault, Faults
from testbed.identities import CRYPTO_OFFICER, RELEASE_USER, Identities
from testbed.pki import Trust, rsa_key

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


def call(
    app: aiohttp.web.Application,
    path: str,
    *,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    method: str = "GET",
) -> Reply:
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
    assert isinstance(public, rsa.RSAPublicKey)
    return dict(jwt.decode(token, public, algorithms=["RS256"], audience=audience))


# --- tokens ------------------------------------------------------------------------------------


def test_default_identity_token(trust: Trust, identities: Identities) -> None:
    before = int(time.time())
    status, body, _ = call(
        imds.make_app(trust, None, identities), TOKEN, params=token_params(), headers=META
    )
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
    status, body, _ = call(
        imds.make_app(trust, None, identities),
        TOKEN,
        params=token_params(resource=resource),
        headers=META,
    )
    assert status == 200
    assert body["resource"] == resource
    assert verified(trust, body["access_token"])["aud"] == VAULT


@pytest.mark.parametrize("selector", ["client_id", "object_id", "msi_res_id"])
def test_user_assigned_identity_by_each_selector(
    trust: Trust, identities: Identities, selector: str
) -> None:
    other = identities.named("noroles")
    value = {
        "client_id": other.client_id,
        "object_id": other.object_id,
        "msi_res_id": other.resource_id,
    }[selector]
    status, body, _ = call(
        imds.make_app(trust, None, identities),
        TOKEN,
        params=token_params(**{selector: value.upper()}),
        headers=META,
    )
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
    status, body, _ = call(
        imds.make_app(trust, None, identities, tcbm="0400000000001AD2"),
        imds.THIM_PATH,
        headers=META,
    )
    assert status == 200
    assert set(body) == {"vcekCert", "certificateChain", "tcbm", "cacheControl"}
    assert x509.load_pem_x509_certificate(body["vcekCert"].encode()) == trust.vcek.cert
    chain = x509.load_pem_x509_certificates(body["certificateChain"].encode())
    assert chain == [trust.ask.cert, trust.ark.cert]
    assert body["tcbm"] == "0400000000001AD2"
    assert body["cacheControl"] == "86400"


def test_thim_tcbm_is_the_reported_tcb_of_the_testbed_report(
    trust: Trust, identities: Identities
) -> None:
    status, body, _ = call(imds.make_app(trust, None, identities), imds.THIM_PATH, headers=META)
    assert status == 200
    # The SNP report the testbed vTPM serves (inside the HCL envelope, at 0x20).
    vcek_key = trust.vcek.key
    assert isinstance(vcek_key, ec.EllipticCurvePrivateKey)
    raw = hcl.build_hcl_report(
        ak_public=rsa_key().public_key(), vm_id=str(uuid.uuid4()), vcek_key=vcek_key
    )
    report = snp.parse_report(raw[0x20 : 0x20 + snp.REPORT_SIZE])
    # 16 uppercase hex digits of the 64-bit TCB_VERSION: microcode 115 (0x73), SNP 8,
    # four reserved bytes, TEE 0, bootloader 3.
    assert body["tcbm"] == "7308000000000003"
    assert int(body["tcbm"], 16) == report.reported_tcb.to_u64()
    raw_tcb = report.encode()[0x180:0x188]
    assert body["tcbm"] == raw_tcb[::-1].hex().upper()


# --- instance metadata -------------------------------------------------------------------------

VM_ID = "5c08b38e-4d57-4c23-ac45-aca61037f084"


def instance_app(trust: Trust, identities: Identities, **kwargs: Any) -> aiohttp.web.Application:
    instance = imds.Instance.for_identities(identities, VM_ID.upper())
    return imds.make_app(trust, None, identities, instance=instance, **kwargs)


def test_instance_document(trust: Trust, identities: Identities) -> None:
    status, body, headers = call(
        instance_app(trust, identities),
        imds.INSTANCE_PATH,
        params={"api-version": "2021-02-01"},
        headers=META,
    )
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    compute = body["compute"]
    assert compute["vmId"] == VM_ID  # lowercase, as IMDS serves it
    assert compute["location"] == "eastus2"
    assert compute["name"] == identities.vm_name
    assert compute["subscriptionId"] == identities.subscription_id
    assert compute["resourceGroupName"] == identities.resource_group
    assert compute["resourceId"] == (
        f"/subscriptions/{identities.subscription_id}/resourceGroups/{identities.resource_group}"
        f"/providers/Microsoft.Compute/virtualMachines/{identities.vm_name}"
    )
    assert compute["vmSize"] == "Standard_NCC40ads_H100_v5"
    assert compute["osType"] == "Linux"
    assert compute["securityProfile"] == {
        "encryptionAtHost": "false",
        "secureBootEnabled": "true",
        "securityType": "ConfidentialVM",
        "virtualTpmEnabled": "true",
    }
    assert body["network"]["interface"][0]["ipv4"]["ipAddress"][0]["privateIpAddress"] == (
        "10.0.0.4"
    )


@pytest.mark.parametrize(("leaf", "value"), [("location", "eastus2"), ("vmId", VM_ID)])
def test_instance_leaf_as_text_and_as_json(
    trust: Trust, identities: Identities, leaf: str, value: str
) -> None:
    app = instance_app(trust, identities)
    path = f"{imds.INSTANCE_PATH}/compute/{leaf}"

    async def go() -> tuple[tuple[int, str, str], tuple[int, Any]]:
        async with TestClient(TestServer(app)) as client:
            text = await client.get(
                path, params={"api-version": "2019-03-11", "format": "text"}, headers=META
            )
            as_json = await client.get(
                path, params={"api-version": "2019-03-11", "format": "json"}, headers=META
            )
            return (
                (text.status, text.headers["Content-Type"], await text.text()),
                (as_json.status, await as_json.json()),
            )

    text, as_json = asyncio.run(go())
    assert text == (200, "text/plain; charset=utf-8", value)
    assert as_json == (200, value)


def test_instance_leaf_without_format_is_refused(trust: Trust, identities: Identities) -> None:
    status, body, _ = call(
        instance_app(trust, identities),
        imds.INSTANCE_PATH + "/compute/vmId",
        params={"api-version": "2021-02-01"},
        headers=META,
    )
    assert (status, body) == (
        400,
        {
            "error": "Bad request. Query parameter 'format' is "
            "required when querying a leaf node: use "
            "format=text"
        },
    )


def test_instance_inner_node_as_text_lists_children(trust: Trust, identities: Identities) -> None:
    async def go(path: str) -> str:
        async with TestClient(TestServer(instance_app(trust, identities))) as client:
            resp = await client.get(
                path, params={"api-version": "2021-02-01", "format": "text"}, headers=META
            )
            assert resp.status == 200
            return await resp.text()

    assert asyncio.run(go(imds.INSTANCE_PATH)) == "compute/\nnetwork/"
    listing = asyncio.run(go(imds.INSTANCE_PATH + "/compute")).split("\n")
    assert "vmId" in listing and "securityProfile/" in listing and "tagsList/" in listing
    status, body, _ = call(
        instance_app(trust, identities),
        imds.INSTANCE_PATH + "/network/interface/0/macAddress",
        params={"api-version": "2021-02-01", "format": "json"},
        headers=META,
    )
    assert (status, body) == (200, "000D3A7B9C21")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {},
            "Bad request. api-version was not specified in the request. For more information "
            "refer to aka.ms/azureimds",
        ),
        (
            {"api-version": "2016-01-01"},
            "Bad request. api-version is invalid or was not specified "
            "in the request. For more information refer to "
            "aka.ms/azureimds",
        ),
    ],
)
def test_instance_api_version_is_required(
    trust: Trust, identities: Identities, params: dict[str, str], message: str
) -> None:
    status, body, _ = call(
        instance_app(trust, identities), imds.INSTANCE_PATH, params=params, headers=META
    )
    assert (status, body) == (
        400,
        {"error": message, "newest-versions": ["2023-07-01", "2021-12-13", "2021-11-15"]},
    )


def test_instance_refusals(trust: Trust, identities: Identities) -> None:
    params = {"api-version": "2021-02-01"}
    assert call(
        instance_app(trust, identities),
        imds.INSTANCE_PATH + "/compute/noSuchThing",
        params=params,
        headers=META,
    )[:2] == (404, {"error": "Not found"})
    assert call(
        instance_app(trust, identities),
        imds.INSTANCE_PATH + "/compute",
        params=params | {"format": "xml"},
        headers=META,
    )[:2] == (400, {"error": "Bad request. format 'xml' is not supported; use json or text"})
    status, _, _ = call(
        instance_app(trust, identities),
        imds.INSTANCE_PATH,
        params=params,
        headers=META,
        method="POST",
    )
    assert status == 405


def test_versions_lists_the_instance_api_versions(trust: Trust, identities: Identities) -> None:
    status, body, _ = call(instance_app(trust, identities), imds.VERSIONS_PATH, headers=META)
    assert status == 200
    assert body["apiVersions"][0] == "2017-03-01" and "2021-02-01" in body["apiVersions"]


def test_vm_id_is_stable_per_testbed_directory(tmp_path: Path) -> None:
    first = env.vm_id(tmp_path)
    assert first == str(uuid.UUID(first)) and first == first.lower()
    assert (tmp_path / "vm-id").read_text().strip() == first
    assert env.vm_id(tmp_path) == first
    other = tmp_path / "other"
    other.mkdir()
    assert env.vm_id(other) != first


# --- AK certificate renewal --------------------------------------------------------------------


@pytest.fixture(scope="module")
def ak() -> rsa.RSAPrivateKey:
    return rsa_key()


def renew_params(**extra: str) -> dict[str, str]:
    return {
        "api-version": "2023-07-01",
        "vmId": VM_ID,
        "requestId": "0f9e6c2a-3b1d-4c8e-9a7f-1e2d3c4b5a69",
    } | extra


def url_encoded_pem(cert: x509.Certificate) -> bytes:
    """What the guest library posts: the PEM as curl_easy_escape() encodes it."""
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    return urllib.parse.quote(pem, safe="").encode()


def post(
    app: aiohttp.web.Application,
    params: dict[str, str],
    body: bytes,
    headers: dict[str, str] = META,
) -> Reply:
    async def go() -> Reply:
        async with TestClient(TestServer(app)) as client:
            resp = await client.post(imds.RENEW_PATH, params=params, data=body, headers=headers)
            return resp.status, await resp.json(content_type=None), resp.headers

    return asyncio.run(go())


def test_renewal_issues_a_fresh_certificate_for_the_same_ak(
    trust: Trust, identities: Identities, ak: rsa.RSAPrivateKey
) -> None:
    old_expiry = dt.datetime.now(dt.UTC) + dt.timedelta(days=10)
    current = vtpm.issue_ak_certificate(trust, ak.public_key(), VM_ID.upper(), not_after=old_expiry)
    app = instance_app(trust, identities, ak_public=ak.public_key)
    status, body, headers = post(
        app,
        renew_params(),
        url_encoded_pem(current),
        META | {"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert set(body) == {"AkCertPem"}
    renewed = x509.load_pem_x509_certificate(body["AkCertPem"].encode())
    renewed.verify_directly_issued_by(trust.vtpm_ca.cert)
    renewed_key = renewed.public_key()
    assert isinstance(renewed_key, rsa.RSAPublicKey)
    assert renewed_key.public_numbers() == ak.public_key().public_numbers()
    assert renewed.subject == current.subject
    assert renewed.serial_number != current.serial_number
    assert renewed.not_valid_after_utc > old_expiry + dt.timedelta(days=300)
    assert renewed.not_valid_before_utc <= dt.datetime.now(dt.UTC)
    eku = renewed.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [vtpm.OID_TCG_KP_AIK_CERTIFICATE]
    # The body as the library strips it (header, footer, newlines) is the DER, base64.
    pem = body["AkCertPem"]
    stripped = (
        pem.replace("\r", "")
        .replace("-----BEGIN CERTIFICATE-----\n", "")
        .replace("\n-----END CERTIFICATE-----", "")
        .replace("\n", "")
    )
    assert base64.b64decode(stripped) == renewed.public_bytes(serialization.Encoding.DER)


def test_renewal_of_an_expired_certificate_and_of_a_plain_pem(
    trust: Trust, identities: Identities, ak: rsa.RSAPrivateKey
) -> None:
    expired = vtpm.issue_ak_certificate(
        trust,
        ak.public_key(),
        VM_ID.upper(),
        not_after=dt.datetime.now(dt.UTC) - dt.timedelta(days=3),
    )
    app = instance_app(trust, identities, ak_public=ak.public_key)
    status, body, _ = post(app, renew_params(), expired.public_bytes(serialization.Encoding.PEM))
    assert status == 200
    renewed = x509.load_pem_x509_certificate(body["AkCertPem"].encode())
    assert renewed.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=300)


def _renew_refusals(
    trust: Trust, ak: rsa.RSAPrivateKey
) -> list[tuple[str, dict[str, str], bytes, str]]:
    good = vtpm.issue_ak_certificate(trust, ak.public_key(), VM_ID.upper())
    stranger = Trust.create()
    other_ca = vtpm.issue_ak_certificate(stranger, ak.public_key(), VM_ID.upper())
    other_key = vtpm.issue_ak_certificate(trust, rsa_key().public_key(), VM_ID.upper())
    body = url_encoded_pem(good)
    return [
        (
            "no api-version",
            {k: v for k, v in renew_params().items() if k != "api-version"},
            body,
            "Bad request. api-version was not specified in the request. For more "
            "information refer to aka.ms/azureimds",
        ),
        (
            "the async api-version",
            renew_params(**{"api-version": "2021-12-01"}),
            body,
            "Bad request. api-version is invalid or was not specified in the request. For more "
            "information refer to aka.ms/azureimds",
        ),
        (
            "no vmId",
            {k: v for k, v in renew_params().items() if k != "vmId"},
            body,
            "Bad request. Query parameters 'vmId' and 'requestId' are required",
        ),
        (
            "no requestId",
            {k: v for k, v in renew_params().items() if k != "requestId"},
            body,
            "Bad request. Query parameters 'vmId' and 'requestId' are required",
        ),
        (
            "requestId not a GUID",
            renew_params(requestId="42"),
            body,
            "Bad request. 'vmId' and 'requestId' must be GUIDs",
        ),
        ("another VM", renew_params(vmId=str(uuid.uuid4())), body, "Bad request. vmId "),
        (
            "empty body",
            renew_params(),
            b"",
            "Bad request. The body must hold the current AK certificate (PEM)",
        ),
        (
            "not a certificate",
            renew_params(),
            b"hello",
            "Bad request. The body is not a PEM certificate",
        ),
        (
            "another CA",
            renew_params(),
            url_encoded_pem(other_ca),
            "Bad request. The certificate was not issued by the vTPM CA of this VM",
        ),
        (
            "another key",
            renew_params(),
            url_encoded_pem(other_key),
            "Bad request. The certificate does not certify this VM's attestation key",
        ),
    ]


def test_renewal_refusals(trust: Trust, identities: Identities, ak: rsa.RSAPrivateKey) -> None:
    def app() -> aiohttp.web.Application:
        return instance_app(trust, identities, ak_public=ak.public_key)

    for case, params, body, message in _renew_refusals(trust, ak):
        status, reply, _ = post(app(), params, body)
        assert status == 400, case
        assert set(reply) == {"error"} | (
            {"newest-versions"} if "api-version" in message else set()
        ), case
        assert reply["error"].startswith(message), (case, reply)
    status, _, _ = call(app(), imds.RENEW_PATH, params=renew_params(), headers=META)
    assert status == 405


def test_renewal_fault_knob_fails_only_the_renewal(
    trust: Trust, identities: Identities, ak: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    faults = Faults(tmp_path / "faults.json")
    instance = imds.Instance.for_identities(identities, VM_ID)

    def app() -> aiohttp.web.Application:
        return imds.make_app(trust, faults, identities, instance=instance, ak_public=ak.public_key)

    body = url_encoded_pem(vtpm.issue_ak_certificate(trust, ak.public_key(), VM_ID.upper()))
    faults.arm("ak-renew", Fault(status=500, count=1))
    status, reply, _ = post(app(), renew_params(), body)
    assert (status, reply) == (500, {"error": "injected fault: HTTP 500"})
    # It was used up, and the other routes never see it.
    assert post(app(), renew_params(), body)[0] == 200
    faults.arm("ak-renew", Fault(down=True))
    assert call(app(), TOKEN, params=token_params(), headers=META)[0] == 200
    assert call(app(), imds.THIM_PATH, headers=META)[0] == 200
    with pytest.raises(aiohttp.ServerDisconnectedError):
        post(app(), renew_params(), body)


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
    (
        "no metadata header",
        token_params(),
        {},
        400,
        {"error": "invalid_request", "error_description": "Required metadata header not specified"},
    ),
    (
        "metadata false",
        token_params(),
        {"Metadata": "false"},
        400,
        {"error": "invalid_request", "error_description": "Required metadata header not specified"},
    ),
    (
        "unknown client_id",
        token_params(client_id="11111111-2222-3333-4444-555555555555"),
        META,
        400,
        {"error": "invalid_request", "error_description": "Identity not found"},
    ),
    (
        "unknown object_id",
        token_params(object_id="11111111-2222-3333-4444-555555555555"),
        META,
        400,
        {"error": "invalid_request", "error_description": "Identity not found"},
    ),
    (
        "unknown msi_res_id",
        token_params(msi_res_id="/subscriptions/x/resourcegroups/y"),
        META,
        400,
        {"error": "invalid_request", "error_description": "Identity not found"},
    ),
    (
        "two selectors",
        token_params(client_id="a", object_id="b"),
        META,
        400,
        {
            "error": "invalid_request",
            "error_description": "Only one of client_id, object_id or msi_res_id may be specified",
        },
    ),
    (
        "no resource",
        {"api-version": "2018-02-01"},
        META,
        400,
        {
            "error": "invalid_request",
            "error_description": "Required audience parameter not specified",
        },
    ),
    (
        "no api-version",
        {"resource": VAULT},
        META,
        400,
        {
            "error": "invalid_request",
            "error_description": "Required query variable 'api-version' is missing",
        },
    ),
    (
        "bad api-version",
        token_params(**{"api-version": "2017-01-01"}),
        META,
        400,
        {"error": "invalid_request", "error_description": "Invalid api-version '2017-01-01'"},
    ),
    (
        "resource not a URI",
        token_params(resource="vault"),
        META,
        400,
        {
            "error": "invalid_resource",
            "error_description": "AADSTS500011: The resource principal named vault was not found",
        },
    ),
]


@pytest.mark.parametrize(
    ("case", "params", "headers", "status", "body"), IMDS_ERRORS, ids=[c[0] for c in IMDS_ERRORS]
)
def test_token_refusals(
    trust: Trust,
    identities: Identities,
    case: str,
    params: dict[str, str],
    headers: dict[str, str],
    status: int,
    body: dict[str, str],
) -> None:
    got_status, got_body, _ = call(
        imds.make_app(trust, None, identities), TOKEN, params=params, headers=headers
    )
    assert (got_status, got_body) == (status, body)


NO_HEADER = {"error": "Bad request. Required metadata header not specified"}


@pytest.mark.parametrize(
    ("path", "method"),
    [
        (imds.THIM_PATH, "GET"),
        (imds.INSTANCE_PATH, "GET"),
        (imds.INSTANCE_PATH + "/compute/vmId", "GET"),
        (imds.VERSIONS_PATH, "GET"),
        (imds.RENEW_PATH, "POST"),
        ("/metadata/no/such/route", "GET"),
    ],
)
def test_every_route_needs_the_metadata_header(
    trust: Trust, identities: Identities, path: str, method: str
) -> None:
    for headers in ({}, {"Metadata": "false"}):
        status, body, _ = call(
            imds.make_app(trust, None, identities),
            path,
            params={"api-version": "2021-02-01"},
            headers=headers,
            method=method,
        )
        assert (status, body) == (400, NO_HEADER)


def test_forwarded_requests_are_refused(trust: Trust, identities: Identities) -> None:
    forwarded = META | {"X-Forwarded-For": "203.0.113.9"}
    status, body, _ = call(
        imds.make_app(trust, None, identities),
        imds.INSTANCE_PATH,
        params={"api-version": "2021-02-01"},
        headers=forwarded,
    )
    assert (status, body) == (
        400,
        {"error": "Bad request. Requests with an X-Forwarded-For header are not accepted"},
    )
    status, body, _ = call(
        imds.make_app(trust, None, identities), TOKEN, params=token_params(), headers=forwarded
    )
    assert (status, body["error"]) == (400, "invalid_request")


def test_token_endpoint_takes_only_get(trust: Trust, identities: Identities) -> None:
    status, _, _ = call(
        imds.make_app(trust, None, identities),
        TOKEN,
        params=token_params(),
        headers=META,
        method="POST",
    )
    assert status == 405


def test_lifetime_must_be_positive(trust: Trust, identities: Identities) -> None:
    with pytest.raises(ValueError, match="lifetime must be positive"):
        imds.make_app(trust, None, identities, token_lifetime_s=0)


def test_status_fault_answers_once_with_retry_after(
    trust: Trust, identities: Identities, tmp_path: Path
) -> None:
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


def test_down_fault_drops_the_connection(
    trust: Trust, identities: Identities, tmp_path: Path
) -> None:
    faults = Faults(tmp_path / "faults.json")
    faults.arm("imds", Fault(down=True))
    with pytest.raises(aiohttp.ServerDisconnectedError):
        call(imds.make_app(trust, faults, identities), TOKEN, params=token_params(), headers=META)
