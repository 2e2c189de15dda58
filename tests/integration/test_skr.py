"""Secure Key Release against the testbed: swtpm vTPM, MAA, Key Vault and IMDS stand-ins.

The happy paths run ``confinfer seal --key-id`` / ``confinfer unseal --skr`` as processes;
the failure paths drive the steps in-process (attest, release, decrypt) so that a fault can be
put between two of them. The AzureAttestSKR backend runs a fake tool that checks the real
tool's command line.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from confinfer import config, imds, keyvault, log, maa, release
from confinfer.config import Config
from confinfer.errors import (
    AttestationError,
    ConfinferError,
    KeyReleaseError,
    Reason,
    ServiceError,
    TpmError,
)
from confinfer.http import Http
from confinfer.keyvault import SKR_ALGORITHMS, KeyId, KeyVault
from confinfer.maa import AttestationResult
from confinfer.tpm import Vtpm
from loader.keywrap import unwrap_dek
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
    return KeyClient(
        cfg.keyvault_url,
        ManagedIdentityCredential(),
        connection_verify=str(cfg.ca_bundle),
        verify_challenge_resource=False,
    )


def policy(authority: str, claims: tuple[tuple[str, Any], ...] = CVM_CLAIMS) -> dict[str, Any]:
    return {
        "version": "1.0.0",
        "anyOf": [
            {
                "authority": authority,
                "allOf": [{"claim": claim, "equals": value} for claim, value in claims],
            }
        ],
    }


def create_kek(cfg: Config, name: str, release_policy: dict[str, Any]) -> str:
    """An exportable RSA-HSM KEK under ``release_policy``, created through the Azure SDK."""
    from azure.keyvault.keys import KeyReleasePolicy

    with key_client(cfg) as client:
        key = client.create_rsa_key(
            name,
            size=2048,
            hardware_protected=True,
            exportable=True,
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


def configured(cfg: Config) -> KeyId:
    assert cfg.key_id
    return KeyId.parse(cfg.key_id)


def with_key(cfg: Config, kid: str) -> tuple[Config, KeyId]:
    """``cfg`` with ``kid`` as its key_id (as --key-id does), and the parsed id."""
    return config.override(cfg, key_id=kid), KeyId.parse(kid)


def attest(cfg: Config, vtpm: Vtpm) -> AttestationResult:
    return maa.attest(vtpm, cfg)


def release_key(
    cfg: Config, key: KeyId, token: str, *, nonce: str | None = None, sleep: Any = None
) -> keyvault.ReleasedKey:
    with Http(cfg, sleep=sleep or (lambda s: None)) as http, KeyVault(cfg, http=http) as vault:
        return vault.release(key, token, algorithm=cfg.skr_algorithm, nonce=nonce)


def expect(
    exc_type: type[ConfinferError], reason: str, fn: Any, *args: Any, **kwargs: Any
) -> ConfinferError:
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
    # The package names the key; it is accepted because it is the configured one.
    done = confinfer(testbed, "unseal", str(pkg), "--dest", str(dest), "--skr")
    assert done.returncode == 0, done.stderr
    assert files_of(src) == files_of(dest)
    assert f"released KEK {kid} (RSA_AES_KEY_WRAP_256)" in done.stderr


def test_tutorial_layout_unseals_with_skr(
    testbed: RunningTestbed, cfg: Config, tmp_path: Path
) -> None:
    src, pkg = model(tmp_path), tmp_path / "pkg"
    kid = testbed.env["CONFINFER_KEY_ID"]
    write_package(pkg, make_archive(src, tmp_path), kek_public(cfg, kid))

    missing = confinfer(
        testbed, "unseal", str(pkg), "--dest", str(tmp_path / "d0"), "--skr", CONFINFER_KEY_ID=""
    )
    assert missing.returncode == Reason.NO_KEY_ID.exit_code
    assert missing.stderr.startswith("confinfer: no-key-id: no Key Vault key is configured")
    assert not any((tmp_path / "d0").glob("*"))

    for dest, args, env in (
        (tmp_path / "d1", ["--key-id", kid], {"CONFINFER_KEY_ID": ""}),
        (tmp_path / "d2", [], {}),  # CONFINFER_KEY_ID from testbed.env
    ):
        done = confinfer(testbed, "unseal", str(pkg), "--dest", str(dest), "--skr", *args, **env)
        assert done.returncode == 0, done.stderr
        assert files_of(src) == files_of(dest / src.name)


def test_offline_sealed_package_needs_the_released_kek_to_match(
    testbed: RunningTestbed, cfg: Config, tmp_path: Path
) -> None:
    # Sealed with a public key only: the header names the KEK's fingerprint, not a key id.
    src = model(tmp_path)
    kid = testbed.env["CONFINFER_KEY_ID"]
    for name, public in (
        ("right", kek_public(cfg, kid)),
        ("wrong", rsa.generate_private_key(65537, 2048).public_key()),
    ):
        pem = tmp_path / f"{name}.pem"
        pem.write_bytes(
            public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        sealed = confinfer(
            testbed, "seal", str(src), "--out", str(tmp_path / name), "--kek-public-key", str(pem)
        )
        assert sealed.returncode == 0, sealed.stderr
    done = confinfer(
        testbed, "unseal", str(tmp_path / "right"), "--dest", str(tmp_path / "d1"), "--skr"
    )
    assert done.returncode == 0, done.stderr
    assert files_of(src) == files_of(tmp_path / "d1")
    done = confinfer(
        testbed, "unseal", str(tmp_path / "wrong"), "--dest", str(tmp_path / "d2"), "--skr"
    )
    assert done.returncode == Reason.KEY_MISMATCH.exit_code
    assert "confinfer: key-mismatch: the package was sealed for the KEK sha256:" in done.stderr
    assert not any((tmp_path / "d2").glob("*"))


def test_skr_and_a_private_key_are_exclusive(testbed: RunningTestbed, tmp_path: Path) -> None:
    done = confinfer(
        testbed,
        "unseal",
        str(tmp_path),
        "--dest",
        str(tmp_path / "d"),
        "--skr",
        "--kek-private-key",
        str(tmp_path / "k.pem"),
    )
    assert done.returncode == Reason.USAGE.exit_code
    assert "--skr and --kek-private-key are two different key sources" in done.stderr


@pytest.mark.parametrize("algorithm", SKR_ALGORITHMS)
def test_every_wrapping_algorithm_releases_the_kek(
    testbed: RunningTestbed, cfg: Config, algorithm: str
) -> None:
    kid = testbed.env["CONFINFER_KEY_ID"]
    with (
        log.recording() as steps,
        Vtpm(cfg.tpm_tcti) as vtpm,
        release.release_kek(cfg, configured(cfg), vtpm, algorithm=algorithm) as kek,
    ):
        assert kek.public_key().public_numbers() == kek_public(cfg, kid).public_numbers()
        dek = os.urandom(32)
        wrapped = kek.public_key().encrypt(
            dek, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
        )
        assert unwrap_dek(kek.private_key(), wrapped, kek.kid) == dek
    # The managed-identity token is cached in-process: only the first release asks IMDS.
    assert set(release.STEPS) - {"imds-token"} <= set(steps.totals()) <= set(release.STEPS)


# --- refusals ------------------------------------------------------------------------------


def test_release_policy_refusal_names_the_claim(
    testbed: RunningTestbed, cfg: Config, tmp_path: Path
) -> None:
    strict = (CVM_CLAIMS[0], ("x-ms-isolation-tee.x-ms-compliance-status", "azure-strict-cvm"))
    kid = create_kek(cfg, "strict-kek", policy(cfg.maa_url, strict))
    src, pkg = model(tmp_path), tmp_path / "pkg"
    assert confinfer(testbed, "seal", str(src), "--out", str(pkg), "--key-id", kid).returncode == 0

    done = confinfer(
        testbed, "unseal", str(pkg), "--dest", str(tmp_path / "dest"), "--skr", "--key-id", kid
    )
    assert done.returncode == Reason.RELEASE_REFUSED.exit_code
    line = done.stderr.strip().splitlines()[-2]
    assert line.startswith(f"confinfer: release-refused: Key Vault refused to release {kid}: ")
    assert "x-ms-isolation-tee.x-ms-compliance-status" in line
    assert "azure-strict-cvm" in line
    assert not any((tmp_path / "dest").glob("*"))


def test_policy_of_another_authority_is_refused(testbed: RunningTestbed, cfg: Config) -> None:
    kid = create_kek(cfg, "elsewhere-kek", policy("https://sharedeus.eus.attest.azure.net"))
    cfg, key = with_key(cfg, kid)
    with Vtpm(cfg.tpm_tcti) as vtpm:
        err = expect(KeyReleaseError, "release-refused", release.release_kek, cfg, key, vtpm)
    assert "UntrustedAuthority" in err.message
    assert "https://sharedeus.eus.attest.azure.net" in err.message
    assert err.details["claim"] == "iss"  # the local check of the policy agrees


def test_identity_without_the_release_role(testbed: RunningTestbed, cfg: Config) -> None:
    norole = config.override(
        cfg, managed_identity_client_id=testbed.env["CONFINFER_TESTBED_NOROLE_CLIENT_ID"]
    )
    with Vtpm(cfg.tpm_tcti) as vtpm:
        err = expect(
            KeyReleaseError,
            "keyvault-forbidden",
            release.release_kek,
            norole,
            configured(cfg),
            vtpm,
        )
    assert "Crypto Service Release User" in err.message


def test_unknown_key(cfg: Config) -> None:
    kid = configured(cfg)
    cfg, missing = with_key(cfg, f"{kid.vault_url}/keys/no-such-kek")
    with Vtpm(cfg.tpm_tcti) as vtpm:
        expect(KeyReleaseError, "key-not-found", release.release_kek, cfg, missing, vtpm)


def test_expired_token(testbed: RunningTestbed, cfg: Config) -> None:
    with Vtpm(cfg.tpm_tcti) as vtpm:
        fresh = attest(cfg, vtpm)
    # The same claims, signed by the testbed's MAA key, an hour past their expiry.
    now = int(dt.datetime.now(dt.UTC).timestamp())
    claims = fresh.claims | {"iat": now - 7200, "nbf": now - 7200, "exp": now - 3600}
    trust = Trust.load(testbed.dir / "pki")
    stale = jwks.sign(
        claims,
        trust.maa_signing,
        kid=fresh.header["kid"],
        extra_header={"jku": fresh.header["jku"], "typ": "JWT"},
    )
    expired = AttestationResult(token=stale, claims=claims, header=fresh.header)
    with Vtpm(cfg.tpm_tcti) as vtpm:
        # Not spent on a release at all...
        expect(
            AttestationError,
            "token-expired",
            release.release_kek,
            cfg,
            configured(cfg),
            vtpm,
            attestation=expired,
        )
    # ...and Key Vault refuses it too.
    err = expect(KeyReleaseError, "release-refused", release_key, cfg, configured(cfg), stale)
    assert "expired" in err.message


def test_pcrs_changed_after_attestation(
    testbed_factory: TestbedFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    own = testbed_factory(tmp_path / "tb")
    for name, value in own.env.items():
        monkeypatch.setenv(name, value)
    cfg = config.load(tmp_path / "no-config", environ=own.env)
    with Vtpm(cfg.tpm_tcti) as vtpm:
        attested = attest(cfg, vtpm)
        own.cli("pcr-extend", "--index", "7")
        err = expect(
            TpmError,
            "tpm-pcr-policy",
            release.release_kek,
            cfg,
            configured(cfg),
            vtpm,
            attestation=attested,
        )
    assert "PCR" in err.message


# --- unreachable and failing services ------------------------------------------------------


def test_imds_down_between_attestation_and_release(testbed: RunningTestbed, cfg: Config) -> None:
    cfg = config.override(cfg, max_retries=1)
    with Vtpm(cfg.tpm_tcti) as vtpm:
        attested = attest(cfg, vtpm)
        testbed.cli("fault", "imds", "--down")
        imds.forget_tokens()  # no managed-identity token cached from an earlier release
        err = expect(
            ServiceError,
            "imds-unavailable",
            release.release_kek,
            cfg,
            configured(cfg),
            vtpm,
            attestation=attested,
        )
    assert cfg.imds in err.message


def test_imds_down_from_the_start(testbed: RunningTestbed, cfg: Config, tmp_path: Path) -> None:
    pkg, kid = tmp_path / "pkg", testbed.env["CONFINFER_KEY_ID"]
    write_package(pkg, make_archive(model(tmp_path), tmp_path), kek_public(cfg, kid))
    testbed.cli("fault", "imds", "--down")
    done = confinfer(
        testbed,
        "unseal",
        str(pkg),
        "--dest",
        str(tmp_path / "d"),
        "--skr",
        CONFINFER_MAX_RETRIES="1",
    )
    assert done.returncode == Reason.IMDS_UNAVAILABLE.exit_code
    # The VCEK chain (IMDS THIM) is the first thing attestation needs from IMDS.
    assert "\nconfinfer: imds-unavailable: imds at " in done.stderr


def test_maa_throttling_is_waited_out(testbed: RunningTestbed, cfg: Config) -> None:
    testbed.cli("fault", "maa", "--status", "429", "--retry-after", "1", "--count", "1")
    with Vtpm(cfg.tpm_tcti) as vtpm:
        release.release_kek(cfg, configured(cfg), vtpm).close()


def test_maa_throttling_is_bounded(testbed: RunningTestbed, cfg: Config) -> None:
    testbed.cli("fault", "maa", "--status", "429", "--retry-after", "1", "--count", "-1")
    with Vtpm(cfg.tpm_tcti) as vtpm:
        expect(
            ServiceError,
            "maa-unavailable",
            release.release_kek,
            config.override(cfg, max_retries=1),
            configured(cfg),
            vtpm,
        )


@pytest.fixture
def token(cfg: Config) -> str:
    with Vtpm(cfg.tpm_tcti) as vtpm:
        return attest(cfg, vtpm).token


def test_keyvault_5xx_retried_then_released(
    testbed: RunningTestbed, cfg: Config, token: str
) -> None:
    testbed.cli("fault", "keyvault", "--status", "503", "--count", "2")
    waits: list[float] = []
    released = release_key(cfg, configured(cfg), token, nonce="fresh", sleep=waits.append)
    assert len(waits) == 2 and 0.25 <= waits[0] <= 0.5 and 0.5 <= waits[1] <= 1.0
    assert released.payload["request"]["nonce"] == "fresh"


def test_keyvault_5xx_retries_are_bounded(testbed: RunningTestbed, cfg: Config, token: str) -> None:
    testbed.cli("fault", "keyvault", "--status", "500", "--count", "-1")
    waits: list[float] = []
    err = expect(
        ServiceError,
        "keyvault-unavailable",
        release_key,
        cfg,
        configured(cfg),
        token,
        sleep=waits.append,
    )
    assert len(waits) == cfg.max_retries
    for wait, base in zip(waits, (0.5, 1.0, 2.0, 4.0), strict=False):
        assert base / 2 <= wait <= base
    assert "HTTP 500" in err.message


def test_keyvault_throttling_waits_for_retry_after(
    testbed: RunningTestbed, cfg: Config, token: str
) -> None:
    testbed.cli("fault", "keyvault", "--status", "429", "--retry-after", "2", "--count", "1")
    waits: list[float] = []
    release_key(cfg, configured(cfg), token, sleep=waits.append)
    assert waits == [2.0]


def test_keyvault_throttling_beyond_the_cap_fails_at_once(
    testbed: RunningTestbed, cfg: Config, token: str
) -> None:
    testbed.cli("fault", "keyvault", "--status", "429", "--retry-after", "600", "--count", "-1")
    waits: list[float] = []
    err = expect(
        ServiceError,
        "keyvault-unavailable",
        release_key,
        cfg,
        configured(cfg),
        token,
        sleep=waits.append,
    )
    assert waits == []
    assert err.hint == "the service is throttling; retry in 600 s"


def test_keyvault_unreachable(cfg: Config, token: str) -> None:
    kid = configured(cfg)
    cfg, closed = with_key(cfg, f"https://127.0.0.1:9/keys/{kid.name}/{kid.version}")
    waits: list[float] = []
    expect(
        ServiceError, "keyvault-unavailable", release_key, cfg, closed, token, sleep=waits.append
    )
    assert len(waits) == cfg.max_retries


def test_release_signed_by_an_untrusted_ca_is_refused(
    cfg: Config, token: str, tmp_path: Path
) -> None:
    # The testbed's Key Vault signs with a certificate from its own CA; with any other trust
    # anchor its answer must not be believed, whatever TLS said.
    other = tmp_path / "other-ca.pem"
    other.write_bytes(Trust.create().ca.cert_pem)
    kid = configured(cfg)
    jws = release_key(cfg, kid, token).jws
    alg = cfg.skr_algorithm
    keyvault.verify_release(jws, kid, roots=keyvault.trust_anchors(cfg.ca_bundle), algorithm=alg)
    err = expect(
        KeyReleaseError,
        "release-signature-invalid",
        keyvault.verify_release,
        jws,
        kid,
        roots=keyvault.trust_anchors(other),
        algorithm=alg,
    )
    assert "not valid for 127.0.0.1 under the trusted roots" in err.message


def test_unseal_refuses_a_release_answer_from_outside_the_configured_roots(
    testbed: RunningTestbed, tmp_path: Path
) -> None:
    """TLS to the vault is trusted, but its signed answer must lead to the release roots."""
    src, pkg = model(tmp_path), tmp_path / "pkg"
    kid = testbed.env["CONFINFER_KEY_ID"]
    assert confinfer(testbed, "seal", str(src), "--out", str(pkg), "--key-id", kid).returncode == 0
    other = tmp_path / "other-ca.pem"
    other.write_bytes(Trust.create().ca.cert_pem)
    refused = confinfer(
        testbed,
        "unseal",
        str(pkg),
        "--dest",
        str(tmp_path / "dest"),
        "--skr",
        CONFINFER_KEYVAULT_RELEASE_CA_BUNDLE=str(other),
    )
    assert refused.returncode == Reason.RELEASE_SIGNATURE_INVALID.exit_code
    assert refused.stderr.splitlines()[-2].startswith(
        "confinfer: release-signature-invalid: Key Vault's release answer does not verify"
    ), refused.stderr
    assert not (tmp_path / "dest").exists() or not any((tmp_path / "dest").iterdir())
