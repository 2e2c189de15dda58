"""Secure Key Release against the testbed: swtpm vTPM, MAA, Key Vault and IMDS stand-ins.

The happy paths run ``confinfer seal --key-id`` / ``confinfer unseal --skr`` as processes;
the failure paths drive the steps in-process (attest, release, decrypt) so that a fault can be
put between two of them. The AzureAttestSKR backend runs a fake tool that checks the real
tool's command line.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from confinfer import config, keyvault, skr, skr_compat
from confinfer.config import SKR_ALGORITHMS, Config
from confinfer.errors import (
    AttestationError,
    ConfinferError,
    KeyReleaseError,
    Reason,
    ServiceError,
    TpmError,
)
from confinfer.maa import AttestationResult
from confinfer.tpm import Vtpm
from testbed import jwks
from testbed.pki import Trust
from tests.cli import run_confinfer
from tests.integration.conftest import RunningTestbed, TestbedFactory
from tests.tutorial_pkg import files_of, make_archive, write_package

pytestmark = pytest.mark.integration

CVM_CLAIMS = (
    ("x-ms-isolation-tee.x-ms-attestation-type", "sevsnpvm"),
    ("x-ms-isolation-tee.x-ms-compliance-status", "azure-compliant-cvm"),
)


# --- helpers -------------------------------------------------------------------------------


@pytest.fixture
def cfg(testbed: RunningTestbed, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Config:
    """The configuration a VM pointed at the testbed loads (and its environment, restored)."""
    for name, value in testbed.env.items():
        monkeypatch.setenv(name, value)
    return config.load(tmp_path / "no-config", environ=testbed.env)


@pytest.fixture(autouse=True)
def no_faults_left(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "testbed" in request.fixturenames:
        request.getfixturevalue("testbed").cli("fault", "--clear")


def key_client(cfg: Config) -> Any:
    from azure.identity import ManagedIdentityCredential
    from azure.keyvault.keys import KeyClient

    assert cfg.keyvault_url and cfg.ca_bundle
    return KeyClient(cfg.keyvault_url, ManagedIdentityCredential(),
                     connection_verify=str(cfg.ca_bundle), verify_challenge_resource=False)


def policy(authority: str, claims: tuple[tuple[str, Any], ...] = CVM_CLAIMS) -> dict[str, Any]:
    return {
        "version": "1.0.0",
        "anyOf": [{
            "authority": authority,
            "allOf": [{"claim": claim, "equals": value} for claim, value in claims],
        }],
    }


def create_kek(cfg: Config, name: str, release_policy: dict[str, Any]) -> str:
    """An exportable RSA-HSM KEK under ``release_policy``, created through the Azure SDK."""
    from azure.keyvault.keys import KeyReleasePolicy

    with key_client(cfg) as client:
        key = client.create_rsa_key(
            name, size=2048, hardware_protected=True, exportable=True,
            key_operations=["encrypt", "decrypt", "wrapKey", "unwrapKey"],
            release_policy=KeyReleasePolicy(json.dumps(release_policy).encode()),
        )
    return str(key.id)


def kek_public(cfg: Config, kid: str) -> rsa.RSAPublicKey:
    parsed = keyvault.KeyId.parse(kid)
    with key_client(cfg) as client:
        jwk = client.get_key(parsed.name, version=parsed.version).key
    return rsa.RSAPublicNumbers(
        int.from_bytes(jwk.e, "big"), int.from_bytes(jwk.n, "big")
    ).public_key()


def confinfer(testbed: RunningTestbed, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_confinfer(*args, env=testbed.environ(**env))


def model(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    (root / "tokenizer").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(os.urandom(700_000))
    (root / "config.json").write_text('{"hidden_size": 128}', encoding="utf-8")
    (root / "tokenizer" / "tokenizer.json").write_text('{"v": 1}', encoding="utf-8")
    return root


def expect(exc_type: type[ConfinferError], reason: str, fn: Any, *args: Any,
           **kwargs: Any) -> ConfinferError:
    with pytest.raises(exc_type) as err:
        fn(*args, **kwargs)
    assert err.value.reason == reason, err.value.one_line()
    return err.value


# --- the whole flow, as processes ----------------------------------------------------------


def test_seal_with_key_vault_then_unseal_with_skr(testbed: RunningTestbed, tmp_path: Path) -> None:
    src, pkg, dest = model(tmp_path), tmp_path / "pkg", tmp_path / "dest"
    kid = testbed.env["CONFINFER_KEY_ID"]
    sealed = confinfer(testbed, "seal", str(src), "--out", str(pkg), "--key-id", kid)
    assert sealed.returncode == 0, sealed.stderr
    # The key id comes from the package header: no --key-id, and none configured.
    done = confinfer(testbed, "unseal", str(pkg), "--dest", str(dest), "--skr",
                     CONFINFER_KEY_ID="")
    assert done.returncode == 0, done.stderr
    assert files_of(src) == files_of(dest)
    assert f"released KEK {kid} (RSA_AES_KEY_WRAP_256)" in done.stderr


def test_tutorial_layout_unseals_with_skr(
    testbed: RunningTestbed, cfg: Config, tmp_path: Path
) -> None:
    src, pkg = model(tmp_path), tmp_path / "pkg"
    kid = testbed.env["CONFINFER_KEY_ID"]
    write_package(pkg, make_archive(src, tmp_path), kek_public(cfg, kid))

    missing = confinfer(testbed, "unseal", str(pkg), "--dest", str(tmp_path / "d0"), "--skr",
                        CONFINFER_KEY_ID="")
    assert missing.returncode == Reason.NO_KEY_ID.exit_code
    assert missing.stderr.startswith("confinfer: no-key-id: no Key Vault key to release")
    assert not any((tmp_path / "d0").glob("*"))

    for dest, args, env in (
        (tmp_path / "d1", ["--key-id", kid], {"CONFINFER_KEY_ID": ""}),
        (tmp_path / "d2", [], {}),  # CONFINFER_KEY_ID from testbed.env
    ):
        done = confinfer(testbed, "unseal", str(pkg), "--dest", str(dest), "--skr", *args,
                         **env)
        assert done.returncode == 0, done.stderr
        assert files_of(src) == files_of(dest / src.name)


def test_offline_sealed_package_needs_the_released_kek_to_match(
    testbed: RunningTestbed, cfg: Config, tmp_path: Path
) -> None:
    # Sealed with a public key only: the header names the KEK's fingerprint, not a key id.
    src = model(tmp_path)
    kid = testbed.env["CONFINFER_KEY_ID"]
    for name, public in (("right", kek_public(cfg, kid)),
                         ("wrong", rsa.generate_private_key(65537, 2048).public_key())):
        pem = tmp_path / f"{name}.pem"
        pem.write_bytes(public.public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo))
        sealed = confinfer(testbed, "seal", str(src), "--out", str(tmp_path / name),
                           "--kek-public-key", str(pem))
        assert sealed.returncode == 0, sealed.stderr
    done = confinfer(testbed, "unseal", str(tmp_path / "right"), "--dest", str(tmp_path / "d1"),
                     "--skr")
    assert done.returncode == 0, done.stderr
    assert files_of(src) == files_of(tmp_path / "d1")
    done = confinfer(testbed, "unseal", str(tmp_path / "wrong"), "--dest", str(tmp_path / "d2"),
                     "--skr")
    assert done.returncode == Reason.KEY_MISMATCH.exit_code
    assert "confinfer: key-mismatch: the package was sealed for the KEK sha256:" in done.stderr
    assert not any((tmp_path / "d2").glob("*"))


def test_skr_and_a_private_key_are_exclusive(testbed: RunningTestbed, tmp_path: Path) -> None:
    done = confinfer(testbed, "unseal", str(tmp_path), "--dest", str(tmp_path / "d"), "--skr",
                     "--kek-private-key", str(tmp_path / "k.pem"))
    assert done.returncode == Reason.USAGE.exit_code
    assert "--skr and --kek-private-key are two different key sources" in done.stderr


@pytest.mark.parametrize("algorithm", SKR_ALGORITHMS)
def test_every_wrapping_algorithm_releases_the_kek(
    testbed: RunningTestbed, cfg: Config, algorithm: str
) -> None:
    kid = testbed.env["CONFINFER_KEY_ID"]
    timings = skr.Timings()
    with Vtpm(cfg.tpm_tcti) as vtpm, skr.release_kek(
        cfg, kid, vtpm, algorithm=algorithm, timings=timings
    ) as kek:
        assert kek.public_key().public_numbers() == kek_public(cfg, kid).public_numbers()
        dek = os.urandom(32)
        wrapped = kek.public_key().encrypt(
            dek, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
        assert skr.unwrap_dek(kek, wrapped) == dek
    assert list(timings.totals()) == [*skr.STEPS, "total"]


# --- refusals ------------------------------------------------------------------------------


def test_release_policy_refusal_names_the_claim(
    testbed: RunningTestbed, cfg: Config, tmp_path: Path
) -> None:
    strict = (CVM_CLAIMS[0], ("x-ms-isolation-tee.x-ms-compliance-status", "azure-strict-cvm"))
    kid = create_kek(cfg, "strict-kek", policy(cfg.maa_url, strict))
    src, pkg = model(tmp_path), tmp_path / "pkg"
    assert confinfer(testbed, "seal", str(src), "--out", str(pkg), "--key-id", kid).returncode == 0

    done = confinfer(testbed, "unseal", str(pkg), "--dest", str(tmp_path / "dest"), "--skr")
    assert done.returncode == Reason.RELEASE_REFUSED.exit_code
    line = done.stderr.strip().splitlines()[-2]
    assert line.startswith(f"confinfer: release-refused: Key Vault refused to release {kid}: ")
    assert "x-ms-isolation-tee.x-ms-compliance-status" in line
    assert "azure-strict-cvm" in line
    assert not any((tmp_path / "dest").glob("*"))


def test_policy_of_another_authority_is_refused(testbed: RunningTestbed, cfg: Config) -> None:
    kid = create_kek(cfg, "elsewhere-kek", policy("https://sharedeus.eus.attest.azure.net"))
    with Vtpm(cfg.tpm_tcti) as vtpm:
        err = expect(KeyReleaseError, "release-refused", skr.release_kek, cfg, kid, vtpm)
    assert "UntrustedAuthority" in err.message
    assert "https://sharedeus.eus.attest.azure.net" in err.message
    assert err.details["claim"] == "iss"  # the local check of the policy agrees


def test_identity_without_the_release_role(testbed: RunningTestbed, cfg: Config) -> None:
    norole = config.override(
        cfg, managed_identity_client_id=testbed.env["CONFINFER_TESTBED_NOROLE_CLIENT_ID"])
    with Vtpm(cfg.tpm_tcti) as vtpm:
        err = expect(KeyReleaseError, "keyvault-forbidden", skr.release_kek, norole,
                     cfg.key_id, vtpm)
    assert "Crypto Service Release User" in err.message


def test_unknown_key(cfg: Config) -> None:
    assert cfg.key_id
    kid = keyvault.KeyId.parse(cfg.key_id)
    missing = keyvault.KeyId(kid.vault_url, "no-such-kek", None)
    with Vtpm(cfg.tpm_tcti) as vtpm:
        expect(KeyReleaseError, "key-not-found", skr.release_kek, cfg, missing, vtpm)


def test_expired_token(testbed: RunningTestbed, cfg: Config) -> None:
    assert cfg.key_id
    with Vtpm(cfg.tpm_tcti) as vtpm:
        fresh = skr.attest_for_release(cfg, vtpm)
    # The same claims, signed by the testbed's MAA key, an hour past their expiry.
    now = int(dt.datetime.now(dt.UTC).timestamp())
    claims = fresh.claims | {"iat": now - 7200, "nbf": now - 7200, "exp": now - 3600}
    trust = Trust.load(testbed.dir / "pki")
    stale = jwks.sign(claims, trust.maa_signing, kid=fresh.header["kid"],
                      extra_header={"jku": fresh.header["jku"], "typ": "JWT"})
    expired = AttestationResult(token=stale, claims=claims, header=fresh.header)
    with Vtpm(cfg.tpm_tcti) as vtpm:
        # Not spent on a release at all...
        expect(AttestationError, "maa-token-expired", skr.release_kek, cfg, cfg.key_id, vtpm,
               attestation=expired)
    # ...and Key Vault refuses it too.
    err = expect(KeyReleaseError, "release-refused", keyvault.release_key, cfg, cfg.key_id,
                 stale)
    assert "expired" in err.message


def test_pcrs_changed_after_attestation(
    testbed_factory: TestbedFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    own = testbed_factory(tmp_path / "tb")
    for name, value in own.env.items():
        monkeypatch.setenv(name, value)
    cfg = config.load(tmp_path / "no-config", environ=own.env)
    with Vtpm(cfg.tpm_tcti) as vtpm:
        attested = skr.attest_for_release(cfg, vtpm)
        own.cli("pcr-extend", "--index", "7")
        err = expect(TpmError, "tpm-pcr-policy", skr.release_kek, cfg, cfg.key_id, vtpm,
                     attestation=attested)
    assert "PCR" in err.message


# --- unreachable and failing services ------------------------------------------------------


def test_imds_down_between_attestation_and_release(
    testbed: RunningTestbed, cfg: Config
) -> None:
    cfg = config.override(cfg, max_retries=1)
    with Vtpm(cfg.tpm_tcti) as vtpm:
        attested = skr.attest_for_release(cfg, vtpm)
        testbed.cli("fault", "imds", "--down")
        err = expect(ServiceError, "imds-unavailable", skr.release_kek, cfg, cfg.key_id, vtpm,
                     attestation=attested)
    assert cfg.imds in err.message
    assert err.hint and "managed identity" in err.hint


def test_imds_down_from_the_start(
    testbed: RunningTestbed, cfg: Config, tmp_path: Path
) -> None:
    pkg, kid = tmp_path / "pkg", testbed.env["CONFINFER_KEY_ID"]
    write_package(pkg, make_archive(model(tmp_path), tmp_path), kek_public(cfg, kid))
    testbed.cli("fault", "imds", "--down")
    done = confinfer(testbed, "unseal", str(pkg), "--dest", str(tmp_path / "d"), "--skr",
                     CONFINFER_MAX_RETRIES="1")
    assert done.returncode == Reason.IMDS_UNAVAILABLE.exit_code
    # The VCEK chain (IMDS THIM) is the first thing attestation needs from IMDS.
    assert "\nconfinfer: imds-unavailable: imds at " in done.stderr


def test_maa_throttling_is_waited_out(testbed: RunningTestbed, cfg: Config) -> None:
    testbed.cli("fault", "maa", "--status", "429", "--retry-after", "1", "--count", "1")
    with Vtpm(cfg.tpm_tcti) as vtpm:
        skr.release_kek(cfg, cfg.key_id or "", vtpm).close()


def test_maa_throttling_is_bounded(testbed: RunningTestbed, cfg: Config) -> None:
    testbed.cli("fault", "maa", "--status", "429", "--retry-after", "1", "--count", "-1")
    with Vtpm(cfg.tpm_tcti) as vtpm:
        expect(ServiceError, "maa-unavailable", skr.release_kek,
               config.override(cfg, max_retries=1), cfg.key_id, vtpm)


@pytest.fixture
def token(cfg: Config) -> str:
    with Vtpm(cfg.tpm_tcti) as vtpm:
        return skr.attest_for_release(cfg, vtpm).token


def test_keyvault_5xx_retried_then_released(
    testbed: RunningTestbed, cfg: Config, token: str
) -> None:
    testbed.cli("fault", "keyvault", "--status", "503", "--count", "2")
    waits: list[float] = []
    released = keyvault.release_key(cfg, cfg.key_id or "", token, nonce="fresh",
                                    sleep=waits.append)
    assert waits == [0.5, 1.0]
    assert released.payload["request"]["nonce"] == "fresh"


def test_keyvault_5xx_retries_are_bounded(
    testbed: RunningTestbed, cfg: Config, token: str
) -> None:
    testbed.cli("fault", "keyvault", "--status", "500", "--count", "-1")
    waits: list[float] = []
    err = expect(ServiceError, "keyvault-unavailable", keyvault.release_key, cfg,
                 cfg.key_id or "", token, sleep=waits.append)
    assert waits == [0.5, 1.0, 2.0, 4.0][: cfg.max_retries]
    assert "(500)" in err.message


def test_keyvault_throttling_waits_for_retry_after(
    testbed: RunningTestbed, cfg: Config, token: str
) -> None:
    testbed.cli("fault", "keyvault", "--status", "429", "--retry-after", "2", "--count", "1")
    waits: list[float] = []
    keyvault.release_key(cfg, cfg.key_id or "", token, sleep=waits.append)
    assert waits == [2.0]


def test_keyvault_throttling_beyond_the_cap_fails_at_once(
    testbed: RunningTestbed, cfg: Config, token: str
) -> None:
    testbed.cli("fault", "keyvault", "--status", "429", "--retry-after", "600", "--count", "-1")
    waits: list[float] = []
    err = expect(ServiceError, "keyvault-throttled", keyvault.release_key, cfg,
                 cfg.key_id or "", token, sleep=waits.append)
    assert waits == []
    assert err.hint == "retry in 600 s"


def test_keyvault_unreachable(cfg: Config, token: str) -> None:
    assert cfg.key_id
    kid = keyvault.KeyId.parse(cfg.key_id)
    closed = keyvault.KeyId("https://127.0.0.1:9", kid.name, kid.version)
    waits: list[float] = []
    expect(ServiceError, "keyvault-unreachable", keyvault.release_key, cfg, closed, token,
           sleep=waits.append)
    assert len(waits) == cfg.max_retries


def test_release_signed_by_an_untrusted_ca_is_refused(
    cfg: Config, token: str, tmp_path: Path
) -> None:
    # The testbed's Key Vault signs with a certificate from its own CA; with any other trust
    # anchor its answer must not be believed, whatever TLS said.
    other = tmp_path / "other-ca.pem"
    other.write_bytes(Trust.create().ca.cert_pem)
    assert cfg.key_id and cfg.ca_bundle
    kid = keyvault.KeyId.parse(cfg.key_id)
    from azure.keyvault.keys import KeyClient

    with KeyClient(kid.vault_url, keyvault.managed_identity_credential(cfg),
                   connection_verify=str(cfg.ca_bundle),
                   verify_challenge_resource=False) as client:
        jws = client.release_key(kid.name, token, version=kid.version).value
    keyvault.verify_release(jws, kid, roots=keyvault.trust_anchors(cfg.ca_bundle))
    err = expect(KeyReleaseError, "release-signature-invalid", keyvault.verify_release, jws, kid,
                 roots=keyvault.trust_anchors(other))
    assert "does not lead to a trusted root" in err.message


def test_unseal_refuses_a_release_answer_from_outside_the_configured_roots(
    testbed: RunningTestbed, tmp_path: Path
) -> None:
    """TLS to the vault is trusted, but its signed answer must lead to the release roots."""
    src, pkg = model(tmp_path), tmp_path / "pkg"
    kid = testbed.env["CONFINFER_KEY_ID"]
    assert confinfer(testbed, "seal", str(src), "--out", str(pkg), "--key-id", kid).returncode == 0
    other = tmp_path / "other-ca.pem"
    other.write_bytes(Trust.create().ca.cert_pem)
    refused = confinfer(testbed, "unseal", str(pkg), "--dest", str(tmp_path / "dest"), "--skr",
                        CONFINFER_KEYVAULT_RELEASE_CA_BUNDLE=str(other))
    assert refused.returncode == Reason.RELEASE_SIGNATURE_INVALID.exit_code
    assert refused.stderr.splitlines()[-2].startswith(
        "confinfer: release-signature-invalid: Key Vault's release answer does not verify"
    ), refused.stderr
    assert not (tmp_path / "dest").exists() or not any((tmp_path / "dest").iterdir())


# --- the AzureAttestSKR backend ------------------------------------------------------------

FAKE_TOOL = r'''#!{python}
"""Fake AzureAttestSKR: -a URL -k KID -c imds|sp [-n NONCE] -s B64 -u (unwrap mode only)."""
import base64, getopt, os, sys, time
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

def die(msg, code=1):
    sys.stderr.write(msg + "\n")
    sys.exit(code)

try:
    opts, rest = getopt.getopt(sys.argv[1:], "a:k:c:n:s:uwrBH:G:")
except getopt.GetoptError as exc:
    die(f"Usage error: {{exc}}", 2)
if rest:
    die(f"Usage error: unexpected arguments {{rest}}", 2)
o = dict(opts)
if "-u" not in o:
    die("Usage error: this fake only implements -u", 2)
for flag in ("-a", "-k", "-c", "-s"):
    if flag not in o:
        die(f"Usage error: {{flag}} is required", 2)
if not o["-a"].startswith("https://") or o["-a"].endswith("/"):
    die("attestation url must be https://host", 2)
if "/keys/" not in o["-k"]:
    die("key url must name /keys/<name>[/<version>]", 2)
if o["-c"] not in ("imds", "sp"):
    die("-c must be imds or sp", 2)
try:
    wrapped = base64.b64decode(o["-s"], validate=True)
except Exception:
    die("-s is not base64", 2)
with open(os.environ["FAKE_SKR_LOG"], "a") as log:
    log.write(" ".join(sys.argv[1:5]) + "\n")
if os.environ.get("FAKE_SKR_SLEEP"):
    time.sleep(float(os.environ["FAKE_SKR_SLEEP"]))
if os.environ.get("FAKE_SKR_FAIL"):
    sys.stderr.write("Entering Util::ReleaseKey()\n" * 200)
    die("SKR failed: " + os.environ["FAKE_SKR_FAIL"], 1)
with open(os.environ["FAKE_SKR_KEK"], "rb") as f:
    kek = serialization.load_pem_private_key(f.read(), None)
dek = kek.decrypt(wrapped, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
mode = os.environ.get("FAKE_SKR_OUTPUT", "base64")
if mode == "raw":
    sys.stdout.buffer.write(dek)
elif mode == "raw-newline":
    sys.stdout.buffer.write(dek + b"\n")
elif mode == "base64":
    sys.stdout.write(base64.b64encode(dek).decode() + "\n")
else:
    sys.stdout.write("The released key is of type RSA.\n")
'''
FAKE_KID = "https://myvault.vault.azure.net/keys/model-kek/0123456789abcdef"
FAKE_MAA = "https://sharedeus2.eus2.attest.azure.net"


@pytest.fixture(scope="module")
def fake_kek() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def tool(tmp_path: Path, fake_kek: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "AzureAttestSKR"
    path.write_text(FAKE_TOOL.format(python=sys.executable), encoding="utf-8")
    path.chmod(0o755)
    pem = tmp_path / "kek.pem"
    pem.write_bytes(fake_kek.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    monkeypatch.setenv("FAKE_SKR_KEK", str(pem))
    monkeypatch.setenv("FAKE_SKR_LOG", str(tmp_path / "calls.log"))
    return path


def wrap(kek: rsa.RSAPrivateKey, dek: bytes) -> bytes:
    return kek.public_key().encrypt(
        dek, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))


FAKE_CFG = Config(maa_url=FAKE_MAA + "/")


@pytest.mark.parametrize("mode", ["raw", "raw-newline", "base64"])
def test_tool_output_is_the_dek(
    tool: Path, fake_kek: rsa.RSAPrivateKey, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A DEK that ends in whitespace bytes must survive the raw output path intact.
    dek = os.urandom(30) + b" \n"
    monkeypatch.setenv("FAKE_SKR_OUTPUT", mode)
    assert skr_compat.unwrap_dek(tool, FAKE_CFG, FAKE_KID, wrap(fake_kek, dek)) == dek
    calls = (tool.parent / "calls.log").read_text(encoding="utf-8").splitlines()
    assert calls == [f"-a {FAKE_MAA} -k {FAKE_KID}"]


def test_tool_failure_shows_command_status_and_stderr_tail(
    tool: Path, fake_kek: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_SKR_FAIL", "AKV release: 403 Forbidden")
    wrapped = wrap(fake_kek, os.urandom(32))
    err = expect(KeyReleaseError, "skr-tool-failed", skr_compat.unwrap_dek, tool, FAKE_CFG,
                 FAKE_KID, wrapped)
    assert err.details == {"exit_code": 1}
    assert err.message.startswith(
        f"{tool} -a {FAKE_MAA} -k {FAKE_KID} -c imds -s '<base64 wrapped DEK, 256 bytes>' -u "
        "exited with status 1; stderr: ..."
    )
    assert err.message.endswith("SKR failed: AKV release: 403 Forbidden")
    assert base64.b64encode(wrapped).decode() not in err.message
    assert len(err.message) < 2400


def test_tool_printing_something_else_is_refused_without_echo(
    tool: Path, fake_kek: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_SKR_OUTPUT", "text")
    err = expect(KeyReleaseError, "skr-tool-output", skr_compat.unwrap_dek, tool, FAKE_CFG,
                 FAKE_KID, wrap(fake_kek, os.urandom(32)))
    assert "RSA" not in err.message


def test_tool_timeout_is_bounded(
    tool: Path, fake_kek: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_SKR_SLEEP", "30")
    expect(ServiceError, "skr-tool-timeout", skr_compat.unwrap_dek, tool, FAKE_CFG, FAKE_KID,
           wrap(fake_kek, os.urandom(32)), timeout_s=0.5)


def test_unseal_through_the_tool(
    tool: Path, fake_kek: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    src, pkg, dest = model(tmp_path), tmp_path / "pkg", tmp_path / "dest"
    write_package(pkg, make_archive(src, tmp_path), fake_kek.public_key())
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFINFER_")}
    done = run_confinfer(
        "unseal", pkg, "--dest", dest, "--skr", "--skr-tool", tool, "--key-id", FAKE_KID,
        "--maa-url", FAKE_MAA, env=env | {"FAKE_SKR_OUTPUT": "raw"},
    )
    assert done.returncode == 0, done.stderr
    assert files_of(src) == files_of(dest / src.name)
    calls = (tool.parent / "calls.log").read_text(encoding="utf-8").splitlines()
    assert calls == [f"-a {FAKE_MAA} -k {FAKE_KID}"]
