"""``unseal --skr --skr-tool``: the AzureAttestSKR backend against the testbed's stand-in tool,
which behaves as the real one does (trailing zero bytes of the key stripped, a newline, its
trace on stdout, a file written into its working directory)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from confinfer import config
from confinfer.config import Config
from confinfer.errors import KeyReleaseError, Reason, ServiceError
from confinfer.keyvault import KeyId
from loader import azureattestskr
from tests.cli import assert_refused, run_confinfer
from tests.integration.conftest import RunningTestbed
from tests.tutorial_pkg import files_of, make_archive, write_package

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def no_faults_left(testbed: RunningTestbed) -> Any:
    yield
    testbed.cli("fault", "--clear")


def tool(testbed: RunningTestbed) -> Path:
    return Path(testbed.env["CONFINFER_TESTBED_SKR_TOOL"])


def runs(testbed: RunningTestbed) -> list[dict[str, Any]]:
    log = testbed.dir / "run" / "azureattestskr.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture(scope="module")
def kek(testbed: RunningTestbed) -> rsa.RSAPublicKey:
    """The testbed KEK's public key, read with the unmodified Azure SDK."""
    from azure.identity import ManagedIdentityCredential
    from azure.keyvault.keys import KeyClient

    kid = KeyId.parse(testbed.env["CONFINFER_KEY_ID"])
    saved = os.environ.get("AZURE_POD_IDENTITY_AUTHORITY_HOST")
    os.environ["AZURE_POD_IDENTITY_AUTHORITY_HOST"] = testbed.env["CONFINFER_IMDS_URL"]
    try:
        jwk = _get_key(kid, testbed, ManagedIdentityCredential, KeyClient)
    finally:
        if saved is None:
            del os.environ["AZURE_POD_IDENTITY_AUTHORITY_HOST"]
        else:
            os.environ["AZURE_POD_IDENTITY_AUTHORITY_HOST"] = saved
    assert jwk.e is not None and jwk.n is not None
    return rsa.RSAPublicNumbers(
        int.from_bytes(jwk.e, "big"), int.from_bytes(jwk.n, "big")
    ).public_key()


def _get_key(kid: KeyId, testbed: RunningTestbed, credential: Any, client_class: Any) -> Any:
    with client_class(
        kid.vault_url,
        credential(),
        connection_verify=testbed.env["CONFINFER_CA_BUNDLE"],
        verify_challenge_resource=False,
    ) as client:
        return client.get_key(kid.name, version=kid.version).key


def model(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    root.mkdir()
    (root / "weights.bin").write_bytes(os.urandom(200_000))
    (root / "config.json").write_text('{"n": 1}', encoding="utf-8")
    return root


@pytest.mark.parametrize(
    "tail",
    [b"", b"\0", b"\0\0\0", b"\n", b"\n\0"],
    ids=["plain", "one-zero", "three-zeros", "newline", "newline-zero"],
)
def test_the_tutorial_layout_unseals_through_the_tool(
    testbed: RunningTestbed, kek: rsa.RSAPublicKey, tmp_path: Path, tail: bytes
) -> None:
    """DEKs ending in zero bytes (one in 256 does) come back whole."""
    src, pkg, dest = model(tmp_path), tmp_path / "pkg", tmp_path / "dest"
    dek = os.urandom(32 - len(tail)).replace(b"\0", b"\1") + tail
    write_package(pkg, make_archive(src, tmp_path), kek, dek=dek)
    before = len(runs(testbed))
    done = run_confinfer(
        "unseal",
        pkg,
        "--dest",
        dest,
        "--skr",
        "--skr-tool",
        tool(testbed),
        env=testbed.environ(SKR_TRACE_ON="1"),
    )
    assert done.returncode == 0, done.stderr
    assert files_of(src) == files_of(dest / src.name)
    (run,) = runs(testbed)[before:]
    # The configured key and MAA reached the tool; the trace switch did not.
    argv = run["argv"]
    assert argv[argv.index("-k") + 1] == testbed.env["CONFINFER_KEY_ID"]
    assert argv[argv.index("-a") + 1] == testbed.env["CONFINFER_MAA_URL"].rstrip("/")
    assert "SKR_TRACE_ON" not in run["env"]
    # It ran in a private working directory (its CA-bundle link is not left in ours).
    assert Path(run["cwd"]) != Path.cwd()
    assert not Path(run["cwd"]).exists()
    assert not (Path.cwd() / "curl-ca-bundle.crt").exists()


def test_the_managed_identity_choice_reaches_the_tool(
    testbed: RunningTestbed, kek: rsa.RSAPublicKey, tmp_path: Path
) -> None:
    src, pkg = model(tmp_path), tmp_path / "pkg"
    write_package(pkg, make_archive(src, tmp_path), kek)
    client_id = testbed.env["CONFINFER_TESTBED_CLIENT_ID"]
    before = len(runs(testbed))
    done = run_confinfer(
        "unseal",
        pkg,
        "--dest",
        tmp_path / "d",
        "--skr",
        "--skr-tool",
        tool(testbed),
        env=testbed.environ(
            CONFINFER_MANAGED_IDENTITY_CLIENT_ID=client_id,
            CONFINFER_TPM_TCTI="swtpm:host=127.0.0.1,port=1",
        ),
    )
    assert done.returncode == 0, done.stderr
    assert "AzureAttestSKR does not take tpm_tcti" in done.stderr
    (run,) = runs(testbed)[before:]
    assert run["env"].get("IMDS_CLIENT_ID") == client_id


def test_a_failing_tool_is_one_line_with_its_stderr_tail(
    testbed: RunningTestbed, kek: rsa.RSAPublicKey, tmp_path: Path
) -> None:
    src, pkg, dest = model(tmp_path), tmp_path / "pkg", tmp_path / "dest"
    write_package(pkg, make_archive(src, tmp_path), kek)
    testbed.cli("fault", "azureattestskr", "--status", "403")
    # Only what the tool can use: no settings it would ignore (they earn a warning line).
    ignored = (
        "CONFINFER_TPM_TCTI",
        "CONFINFER_IMDS_URL",
        "CONFINFER_CA_BUNDLE",
        "AZURE_POD_IDENTITY_AUTHORITY_HOST",
    )
    env = {k: v for k, v in testbed.environ().items() if k not in ignored}
    done = run_confinfer(
        "unseal", pkg, "--dest", dest, "--skr", "--skr-tool", tool(testbed), env=env
    )
    assert_refused(done, "skr-tool-failed")
    assert "exited with status 4" in done.stderr
    # Its trace shows its tokens; they stay out of our message.
    assert "Bearer <redacted>" in done.stderr
    assert "eyJ" not in done.stderr
    assert "<base64 wrapped DEK, 256 bytes>" in done.stderr
    assert not dest.exists() or not any(dest.iterdir())


def test_a_hanging_tool_is_bounded(testbed: RunningTestbed, cfg_for: Any) -> None:
    testbed.cli("fault", "azureattestskr", "--latency", "30")
    with pytest.raises(ServiceError) as err:
        azureattestskr.unwrap_dek(
            tool(testbed),
            cfg_for(testbed),
            testbed.env["CONFINFER_KEY_ID"],
            bytes(256),
            timeout_s=0.5,
        )
    assert err.value.reason == Reason.SKR_TOOL_TIMEOUT


def test_a_key_the_vault_does_not_hold_fails_in_the_tool(
    testbed: RunningTestbed, cfg_for: Any
) -> None:
    cfg = cfg_for(testbed)
    assert cfg.key_id
    other = cfg.key_id.split("/keys/")[0] + "/keys/no-such-key"
    with pytest.raises(KeyReleaseError) as err:
        azureattestskr.unwrap_dek(tool(testbed), cfg, other, bytes(256))
    assert err.value.reason == Reason.SKR_TOOL_FAILED


@pytest.fixture
def cfg_for() -> Any:
    def load(testbed: RunningTestbed) -> Config:
        return config.load(testbed.dir / "no-config", environ=testbed.env)

    return load
