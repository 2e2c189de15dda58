"""``python -m testbed``: up -> testbed.env -> every endpoint answers -> the knobs act -> down."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import jwt
import pytest
import requests

from testbed.env import ProcessRecord, RunRecords

if TYPE_CHECKING:
    from tests.integration.conftest import RunningTestbed, TestbedFactory

Cli = Callable[..., subprocess.CompletedProcess[str]]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

REQUIRED = (
    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
    "CONFINFER_MAA_URL",
    "CONFINFER_KEYVAULT_URL",
    "CONFINFER_KEYVAULT_VERIFY_CHALLENGE_RESOURCE",
    "CONFINFER_CA_BUNDLE",
    "CONFINFER_TPM_TCTI",
    "CONFINFER_NVML_LIBRARY",
    "CONFINFER_TESTBED_GPU_STATE",
    "CONFINFER_TESTBED_DIR",
    "CONFINFER_TESTBED_NOROLE_CLIENT_ID",
    "CONFINFER_KEY_ID",
)
TOKEN_PATH = "/metadata/identity/oauth2/token"
VAULT = "https://vault.azure.net"


def imds_token(tb: RunningTestbed, **params: str) -> requests.Response:
    return requests.get(
        tb.env["AZURE_POD_IDENTITY_AUTHORITY_HOST"] + TOKEN_PATH,
        params={"api-version": "2018-02-01", "resource": VAULT, **params},
        headers={"Metadata": "true"},
        timeout=10,
    )


def vault_get(tb: RunningTestbed, path: str, token: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(
        tb.env["CONFINFER_KEYVAULT_URL"] + path,
        params={"api-version": "7.4"},
        headers=headers,
        verify=tb.env["CONFINFER_CA_BUNDLE"],
        timeout=10,
    )


def pcr(tb: RunningTestbed, index: int) -> str:
    out = subprocess.run(
        ["tpm2_pcrread", "-T", tb.env["CONFINFER_TPM_TCTI"], f"sha256:{index}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    match = re.search(rf"\b{index}\s*:\s*0x([0-9A-Fa-f]{{64}})", out)
    assert match, out
    return match.group(1)


NVML_PROBE = """
import ctypes, json, os
class S(ctypes.Structure):
    _fields_ = [("environment", ctypes.c_uint), ("ccFeature", ctypes.c_uint),
                ("devToolsMode", ctypes.c_uint)]
lib = ctypes.CDLL(os.environ["CONFINFER_NVML_LIBRARY"])
assert lib.nvmlInit_v2() == 0
s = S()
cc = lib.nvmlSystemGetConfComputeState(ctypes.byref(s))
dev = ctypes.c_void_p()
handle = lib.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(dev))
print(json.dumps({"cc": [cc, s.environment, s.ccFeature, s.devToolsMode], "handle": handle}))
lib.nvmlShutdown()
"""


def nvml_probe(tb: RunningTestbed) -> dict[str, list[int] | int]:
    out = subprocess.run(
        [sys.executable, "-c", NVML_PROBE],
        env=tb.environ(),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    result: dict[str, list[int] | int] = json.loads(out)
    return result


# ---- the env file and the endpoints -----------------------------------------------------------


def test_env_file_names_every_endpoint(testbed: RunningTestbed) -> None:
    env = testbed.env
    assert set(REQUIRED) <= set(env)
    assert env["AZURE_POD_IDENTITY_AUTHORITY_HOST"].startswith("http://127.0.0.1:")
    assert env["CONFINFER_MAA_URL"].startswith("https://127.0.0.1:")
    assert env["CONFINFER_KEYVAULT_URL"].startswith("https://127.0.0.1:")
    assert env["CONFINFER_KEYVAULT_VERIFY_CHALLENGE_RESOURCE"] == "0"
    assert env["CONFINFER_TESTBED_DIR"] == str(testbed.dir)
    assert Path(env["CONFINFER_CA_BUNDLE"]) == testbed.dir / "pki" / "ca.pem"
    for key in ("CONFINFER_CA_BUNDLE", "CONFINFER_NVML_LIBRARY", "CONFINFER_TESTBED_GPU_STATE"):
        assert Path(env[key]).is_file(), key
    assert env["CONFINFER_TPM_TCTI"].startswith("swtpm:host=127.0.0.1,port=")
    assert env["CONFINFER_KEY_ID"].startswith(env["CONFINFER_KEYVAULT_URL"] + "/keys/model-kek/")
    assert "REQUESTS_CA_BUNDLE" not in env
    # the file is shell-sourceable and says the same thing
    shell = subprocess.run(
        ["bash", "-c", f"source {testbed.dir / 'testbed.env'} && env -0"],
        capture_output=True,
        timeout=10,
        check=True,
        env={"PATH": os.environ["PATH"]},
    ).stdout.decode()
    sourced = dict(item.split("=", 1) for item in shell.split("\0") if "=" in item)
    assert {k: sourced[k] for k in env} == env


def test_imds_issues_tokens_for_both_identities(testbed: RunningTestbed) -> None:
    resp = imds_token(testbed)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["aud"] == VAULT
    norole = testbed.env["CONFINFER_TESTBED_NOROLE_CLIENT_ID"]
    other = imds_token(testbed, client_id=norole)
    assert other.status_code == 200
    assert other.json()["client_id"] == norole != body["client_id"]
    refused = requests.get(
        testbed.env["AZURE_POD_IDENTITY_AUTHORITY_HOST"] + TOKEN_PATH,
        params={"api-version": "2018-02-01", "resource": VAULT},
        timeout=10,
    )
    assert refused.status_code == 400  # no Metadata header


def test_maa_serves_openid_metadata_over_tls(testbed: RunningTestbed) -> None:
    maa = testbed.env["CONFINFER_MAA_URL"]
    ca = testbed.env["CONFINFER_CA_BUNDLE"]
    meta = requests.get(maa + "/.well-known/openid-configuration", verify=ca, timeout=10)
    assert meta.status_code == 200
    assert meta.json()["jwks_uri"] == maa + "/certs"
    keys = requests.get(maa + "/certs", verify=ca, timeout=10).json()["keys"]
    assert keys and all(k["x5c"] for k in keys)
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(maa + "/certs", verify=True, timeout=10)  # the system store: not trusted


def test_keyvault_challenges_and_holds_the_kek(testbed: RunningTestbed) -> None:
    name_path = "/keys/model-kek"
    challenge = vault_get(testbed, name_path)
    assert challenge.status_code == 401
    www = challenge.headers["WWW-Authenticate"]
    assert www.startswith("Bearer authorization=") and f'resource="{VAULT}"' in www
    token = imds_token(testbed).json()["access_token"]
    key = vault_get(testbed, name_path, token)
    assert key.status_code == 200, key.text
    bundle = key.json()
    assert bundle["key"]["kid"] == testbed.env["CONFINFER_KEY_ID"]
    assert bundle["key"]["kty"] == "RSA-HSM"
    assert bundle["attributes"]["exportable"] is True
    data = bundle["release_policy"]["data"]
    policy = json.loads(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
    assert policy["anyOf"] == [
        {
            "authority": testbed.env["CONFINFER_MAA_URL"],
            "allOf": [
                {"claim": "x-ms-isolation-tee.x-ms-attestation-type", "equals": "sevsnpvm"},
                {
                    "claim": "x-ms-isolation-tee.x-ms-compliance-status",
                    "equals": "azure-compliant-cvm",
                },
            ],
        }
    ]


def test_kek_command_creates_another_key(testbed: RunningTestbed) -> None:
    kid = testbed.cli("kek", "--name", "second-kek").stdout.strip()
    assert kid.startswith(testbed.env["CONFINFER_KEYVAULT_URL"] + "/keys/second-kek/")
    token = imds_token(testbed).json()["access_token"]
    assert vault_get(testbed, "/keys/second-kek", token).json()["key"]["kid"] == kid


def test_status_reports_live_processes_and_ports(testbed: RunningTestbed) -> None:
    proc = testbed.cli("status")
    report = json.loads(proc.stdout)
    assert proc.returncode == 0
    assert {"services", "vtpm-swtpm", "vtpm-tpmproxy"} <= set(report["processes"])
    assert all(p["alive"] for p in report["processes"].values())
    assert report["urls"]["maa"] == testbed.env["CONFINFER_MAA_URL"]
    assert testbed.env["CONFINFER_KEYVAULT_URL"].endswith(f":{report['ports']['keyvault']}")
    assert report["gpu"] == {
        "cc": True,
        "devtools": False,
        "env": "production",
        "gpus": 1,
        "lost": False,
        "ready": False,
    }


def test_second_up_in_the_same_dir_is_refused(testbed: RunningTestbed, testbed_cli: Cli) -> None:
    proc = testbed_cli("up", "--dir", str(testbed.dir), check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("testbed: already-running: ")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert testbed.cli("status").returncode == 0  # and nothing was stopped


# ---- the knobs --------------------------------------------------------------------------------


def test_gpu_subcommand_changes_what_nvml_reports(testbed: RunningTestbed) -> None:
    assert nvml_probe(testbed) == {"cc": [0, 2, 1, 0], "handle": 0}
    try:
        testbed.cli("gpu", "cc-off")
        assert nvml_probe(testbed)["cc"] == [0, 2, 0, 0]
        testbed.cli("gpu", "cc-on")
        testbed.cli("gpu", "devtools-on")
        assert nvml_probe(testbed)["cc"] == [0, 2, 1, 1]
        testbed.cli("gpu", "devtools-off")
        testbed.cli("gpu", "lose")
        assert nvml_probe(testbed)["handle"] == 15  # NVML_ERROR_GPU_IS_LOST
        shown = json.loads(testbed.cli("gpu", "restore").stdout)
        assert shown["lost"] is False and shown["ready"] is False
        assert nvml_probe(testbed) == {"cc": [0, 2, 1, 0], "handle": 0}
    finally:
        for action in ("cc-on", "devtools-off", "restore"):
            testbed.cli("gpu", action)
    bad = testbed.cli("gpu", "explode", check=False)
    assert bad.returncode == 2  # argparse: not an action


def test_gpu_set_changes_any_key_and_validates(testbed: RunningTestbed) -> None:
    before = json.loads(testbed.cli("gpu", "show").stdout)
    try:
        shown = json.loads(testbed.cli("gpu", "set", "tamper=3", "driver=555.42.02").stdout)
        assert (shown["tamper"], shown["driver"]) == (3, "555.42.02")
        assert "driver=555.42.02" in Path(testbed.env["CONFINFER_TESTBED_GPU_STATE"]).read_text()
        refused = testbed.cli("gpu", "set", "gpus=99", check=False)
        assert refused.returncode == 1
        assert refused.stderr.startswith("testbed: gpu-state-invalid: ")
        unknown = testbed.cli("gpu", "set", "colour=green", check=False)
        assert unknown.stderr.startswith("testbed: gpu-state-invalid: ")
        assert testbed.cli("gpu", "lose", "x=1", check=False).stderr.startswith("testbed: usage: ")
    finally:
        testbed.cli("gpu", "set", "tamper=0", f"driver={before['driver']}")
    assert json.loads(testbed.cli("gpu", "show").stdout) == before


def test_fault_subcommand_shapes_the_next_requests(testbed: RunningTestbed) -> None:
    try:
        testbed.cli("fault", "imds", "--status", "503", "--retry-after", "7", "--count", "1")
        first = imds_token(testbed)
        assert first.status_code == 503
        assert first.headers["Retry-After"] == "7"
        assert imds_token(testbed).status_code == 200  # the count was one request
        testbed.cli("fault", "keyvault", "--down")
        with pytest.raises(requests.exceptions.ConnectionError):
            vault_get(testbed, "/keys/model-kek")
        with pytest.raises(requests.exceptions.ConnectionError):
            vault_get(testbed, "/keys/model-kek")
        testbed.cli("fault", "maa", "--status", "429", "--retry-after", "3")
        attest = requests.post(
            testbed.env["CONFINFER_MAA_URL"] + "/attest/AzureGuest",
            params={"api-version": "2020-10-01"},
            json={},
            verify=testbed.env["CONFINFER_CA_BUNDLE"],
            timeout=10,
        )
        assert attest.status_code == 429 and attest.headers["Retry-After"] == "3"
        testbed.cli("fault", "--clear", "keyvault")
        assert vault_get(testbed, "/keys/model-kek").status_code == 401
        testbed.cli("fault", "--clear")
        attest = requests.post(
            testbed.env["CONFINFER_MAA_URL"] + "/attest/AzureGuest",
            params={"api-version": "2020-10-01"},
            json={},
            verify=testbed.env["CONFINFER_CA_BUNDLE"],
            timeout=10,
        )
        assert attest.status_code == 400  # served again: empty evidence is refused
    finally:
        testbed.cli("fault", "--clear")
    usage = testbed.cli("fault", "imds", check=False)
    assert usage.returncode == 1 and usage.stderr.startswith("testbed: usage: ")


def test_pcr_extend_changes_the_pcr(testbed: RunningTestbed) -> None:
    before7, before0 = pcr(testbed, 7), pcr(testbed, 0)
    testbed.cli("pcr-extend")
    after7 = pcr(testbed, 7)
    assert after7 != before7
    assert pcr(testbed, 0) == before0
    testbed.cli("pcr-extend", "--index", "0", "--data", "a later boot stage")
    assert pcr(testbed, 0) != before0
    assert pcr(testbed, 7) == after7


# ---- lifecycle ------------------------------------------------------------------------------


def swtpm_for(directory: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if (
            state != "Z"
            and os.path.basename(argv[0]).startswith(b"swtpm")
            and any(str(directory).encode() in arg for arg in argv)
        ):
            found.append(int(entry.name))
    return found


def test_down_leaves_no_process_behind(
    tmp_path: Path, testbed_factory: TestbedFactory, testbed_cli: Cli
) -> None:
    directory = tmp_path / "tb"
    tb = testbed_factory(directory)
    records = RunRecords(directory).processes()
    assert len(records) == 3 and all(r.alive() for r in records)
    assert swtpm_for(directory)
    assert tb.startup_s > 0
    testbed_cli("down", "--dir", str(directory))
    assert not any(ProcessRecord(r.name, r.pid, r.start).alive() for r in records)
    assert swtpm_for(directory) == []
    assert RunRecords(directory).processes() == []
    assert testbed_cli("down", "--dir", str(directory)).returncode == 0  # safe twice
    status = testbed_cli("status", "--dir", str(directory), check=False)
    assert status.returncode == 1
    assert json.loads(status.stdout)["processes"] == {}
    # the same directory comes up again as a fresh machine
    again = testbed_factory(directory)
    assert again.env["CONFINFER_KEY_ID"] != tb.env["CONFINFER_KEY_ID"]
    assert testbed_cli("status", "--dir", str(directory)).returncode == 0


def test_a_failed_up_stops_what_it_started(tmp_path: Path, testbed_cli: Cli) -> None:
    # swtpm is on PATH, gcc is not: the vTPM and the services start, the GPU build fails.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("swtpm", "swtpm_ioctl"):
        real = subprocess.run(
            ["bash", "-c", f"command -v {tool}"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        (bin_dir / tool).symlink_to(real)
    directory = tmp_path / "tb"
    env = {**os.environ, "PATH": str(bin_dir)}
    try:
        proc = testbed_cli("up", "--dir", str(directory), check=False, env=env)
        assert proc.returncode == 1
        assert proc.stderr.startswith("testbed: gpu-build-failed: gcc not found")
        assert len(proc.stderr.strip().splitlines()) == 1
        assert RunRecords(directory).processes() == []
        assert swtpm_for(directory) == []
        assert not (directory / "testbed.env").exists()
    finally:
        testbed_cli("down", "--dir", str(directory), check=False)


def test_down_on_an_empty_dir_is_harmless(tmp_path: Path, testbed_cli: Cli) -> None:
    assert testbed_cli("down", "--dir", str(tmp_path)).returncode == 0
