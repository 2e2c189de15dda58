"""The stand-in AzureAttestSKR (testbed.azureattestskr): the real tool's CLI contract and output
quirks, what it refuses and what it logs, run in-process against a testbed directory on disk."""

from __future__ import annotations

import base64
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from testbed import azureattestskr as skr
from testbed.env import RUN_DIR, write_json
from testbed.faults import Fault, Faults
from testbed.identities import Identities
from testbed.keystore import KeyStore, StoredPolicy
from testbed.pki import Trust, rsa_key

pytestmark = pytest.mark.unit

PROG = "/opt/skr/AzureAttestSKR"
VAULT = "https://127.0.0.1:49443"
MAA = "https://127.0.0.1:49444"
CVM_POLICY = {
    "version": "1.0.0",
    "anyOf": [
        {
            "authority": MAA,
            "allOf": [{"claim": "x-ms-isolation-tee.x-ms-attestation-type", "equals": "sevsnpvm"}],
        }
    ],
}


@pytest.fixture(scope="module")
def trust() -> Trust:
    return Trust.create()


@pytest.fixture(scope="module")
def kek() -> rsa.RSAPrivateKey:
    return rsa_key()


@dataclass
class Bed:
    dir: Path
    kid: str
    kek: rsa.RSAPrivateKey
    identities: Identities
    cwd: Path

    def run(
        self, *args: str, env: dict[str, str] | None = None, stdin: str | None = None
    ) -> tuple[int, bytes, str]:
        out, err = io.BytesIO(), io.BytesIO()
        old_env = dict(os.environ)
        old_cwd = os.getcwd()
        try:
            for name in (*skr.ENV_READ, *skr.ENV_NOT_READ, "POSIXLY_CORRECT"):
                os.environ.pop(name, None)
            os.environ.update(env or {})
            os.chdir(self.cwd)
            code = skr.main([PROG, *args], testbed_dir=self.dir, stdout=out, stderr=err)
        finally:
            os.chdir(old_cwd)
            os.environ.clear()
            os.environ.update(old_env)
        return code, out.getvalue(), err.getvalue().decode()

    def log(self) -> list[dict[str, Any]]:
        path = self.dir / RUN_DIR / skr.LOG_FILE
        return [json.loads(line) for line in path.read_text().splitlines()]


def wrap(
    kek: rsa.RSAPrivateKey,
    data: bytes,
    algorithm: hashes.HashAlgorithm | None = None,
    mgf1: hashes.HashAlgorithm | None = None,
) -> str:
    algorithm = algorithm or hashes.SHA256()
    wrapped = kek.public_key().encrypt(
        data, padding.OAEP(padding.MGF1(mgf1 or algorithm), algorithm, None)
    )
    return base64.b64encode(wrapped).decode()


@pytest.fixture
def bed(
    tmp_path: Path, trust: Trust, kek: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> Bed:
    # The "system CA bundle" the tool links to, whatever this host has.
    system = tmp_path / "system-ca.pem"
    system.write_text("bundle")
    monkeypatch.setattr(skr, "CA_CANDIDATES", (str(tmp_path / "absent.pem"), str(system)))
    directory = tmp_path / "tb"
    directory.mkdir()
    trust.save(directory / "pki")
    identities = Identities.create().save(directory)
    store = KeyStore(directory / "keyvault")
    policy = StoredPolicy(json.dumps(CVM_POLICY).encode())
    kv = store.add(
        "model-kek",
        "RSA-HSM",
        kek,
        key_ops=("wrapKey", "unwrapKey"),
        exportable=True,
        release_policy=policy,
    )
    store.add("plain", "RSA-HSM", rsa_key(), exportable=False)
    # The services "run": this process stands in for the services process.
    write_json(
        directory / RUN_DIR / "services.json",
        {
            "pid": os.getpid(),
            "ports": {},
            "urls": {"maa": MAA, "keyvault": VAULT, "imds": "http://127.0.0.1:1"},
        },
    )
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return Bed(directory, kv.kid(VAULT), kek, identities, cwd)


def unwrap_args(bed: Bed, wrapped: str, *extra: str) -> tuple[str, ...]:
    return ("-a", MAA, "-k", bed.kid, "-c", "imds", "-s", wrapped, "-u", *extra)


# --- -u: the contract the caller parses ---------------------------------------------------------


@pytest.mark.parametrize(
    ("dek", "printed"),
    [
        (bytes(range(1, 33)), bytes(range(1, 33))),
        (b"\x07" * 30 + b" \n", b"\x07" * 30 + b" \n"),  # trailing whitespace is kept
        (b"\x01\x00\x02" + b"\x00" * 5, b"\x01\x00\x02"),  # trailing zero bytes are not
        (b"\x00" * 32, b""),
    ],
)
def test_unwrap_prints_the_key_without_trailing_zero_bytes(
    bed: Bed, dek: bytes, printed: bytes
) -> None:
    code, out, err = bed.run(*unwrap_args(bed, wrap(bed.kek, dek)))
    assert (code, out) == (0, printed + b"\n"), err
    assert err == f"Info: created CA symlink ./curl-ca-bundle.crt -> {skr.CA_CANDIDATES[1]}\n"


@pytest.mark.parametrize(
    ("flags", "oaep", "mgf1"),
    [
        ((), hashes.SHA256(), hashes.SHA256()),
        (("-H", "SHA-1"), hashes.SHA1(), hashes.SHA1()),  # noqa: S303 - what -H sha1 means
        (("-H", "sha384", "-G", "sha1"), hashes.SHA384(), hashes.SHA1()),  # noqa: S303
    ],
)
def test_unwrap_hashes(
    bed: Bed, flags: tuple[str, ...], oaep: hashes.HashAlgorithm, mgf1: hashes.HashAlgorithm
) -> None:
    dek = os.urandom(32).replace(b"\x00", b"\x01")
    code, out, err = bed.run(*unwrap_args(bed, wrap(bed.kek, dek, oaep, mgf1), *flags))
    assert (code, out) == (0, dek + b"\n"), err


def test_trace_goes_to_stdout_before_the_key(bed: Bed) -> None:
    dek = b"k" * 32
    code, out, err = bed.run(*unwrap_args(bed, wrap(bed.kek, dek)), env={"SKR_TRACE_ON": "1"})
    assert code == 0, err
    lines = out.split(b"\n")
    assert lines[0] == b"Tracing is enabled"
    assert (
        lines[1]
        == (f"Level: Info Tag: AttestatationClientLib Attest:136:Attestation URL - {MAA}").encode()
    )
    assert all(line.startswith(b"Level: Info Tag: AttestatationClientLib ") for line in lines[1:-2])
    assert lines[-2:] == [dek, b""]
    # The tool's own TRACE_OUT lines go to stderr; at level 1 secrets are shortened.
    assert "Main started\n" in err and f"key_enc_key_url: {bed.kid}\n" in err
    token_line = next(line for line in err.splitlines() if line.startswith("Access Token: "))
    assert token_line.endswith("...") and len(token_line) < 400
    _, _, err2 = bed.run(*unwrap_args(bed, wrap(bed.kek, dek)), env={"SKR_TRACE_ON": "2"})
    token_line = next(line for line in err2.splitlines() if line.startswith("Access Token: "))
    assert token_line.count(".") == 2 and not token_line.endswith("...")


@pytest.mark.parametrize("value", ["3", "yes", "0"])
def test_an_invalid_trace_switch_exits_255(bed: Bed, value: str) -> None:
    code, out, err = bed.run(*unwrap_args(bed, "AAAA"), env={"SKR_TRACE_ON": value})
    assert (code, out) == (255, b"")
    assert err.endswith("Invalid value for SKR_TRACE_ON!\n")


def test_an_empty_trace_switch_is_off(bed: Bed) -> None:
    code, out, _ = bed.run(*unwrap_args(bed, wrap(bed.kek, b"x" * 16)), env={"SKR_TRACE_ON": ""})
    assert (code, out) == (0, b"x" * 16 + b"\n")


def test_ca_bundle_symlink_in_the_working_directory(bed: Bed, tmp_path: Path) -> None:
    system = tmp_path / "system-ca.pem"
    code, _, err = bed.run(*unwrap_args(bed, wrap(bed.kek, b"x" * 16)))
    link = bed.cwd / "curl-ca-bundle.crt"
    assert code == 0 and link.is_symlink() and os.readlink(link) == str(system)
    assert err == f"Info: created CA symlink ./curl-ca-bundle.crt -> {system}\n"
    # Made once: an existing one is left alone, silently.
    code, _, err = bed.run(*unwrap_args(bed, wrap(bed.kek, b"x" * 16)))
    assert (code, err) == (0, "")


# --- the run log --------------------------------------------------------------------------------


def test_each_run_logs_argv_without_the_secret_and_the_environment_it_reads(bed: Bed) -> None:
    wrapped = wrap(bed.kek, b"s" * 32)
    env = {
        "IMDS_CLIENT_ID": bed.identities.default.client_id,
        "AKV_SKR_CLIENT_SECRET": "hush",
        "https_proxy": "http://proxy:3128",
        "CURL_CA_BUNDLE": "/x.pem",
        "CONFINFER_TPM_TCTI": "swtpm:port=1",
        "UNRELATED": "1",
    }
    bed.run("-a", MAA, "-k", bed.kid, "-c", "imds", "-s", wrapped, "-u", env=env)
    bed.run(f"-s{wrapped}", "-uk", bed.kid, "-a", MAA)
    first, second = bed.log()
    assert first["argv0"] == PROG
    assert first["argv"] == [
        "-a",
        MAA,
        "-k",
        bed.kid,
        "-c",
        "imds",
        "-s",
        f"<{len(wrapped)} chars>",
        "-u",
    ]
    assert first["env"] == {
        "IMDS_CLIENT_ID": bed.identities.default.client_id,
        "AKV_SKR_CLIENT_SECRET": "<4 chars>",
        "https_proxy": "http://proxy:3128",
    }
    assert first["env_not_read"] == ["CURL_CA_BUNDLE", "CONFINFER_TPM_TCTI"]
    assert first["cwd"] == str(bed.cwd) and first["pid"] == os.getpid()
    assert wrapped not in json.dumps(first) and "hush" not in json.dumps(first)
    assert second["argv"] == [f"-s<{len(wrapped)} chars>", "-uk", bed.kid, "-a", MAA]


def test_a_run_that_fails_early_is_logged_too(bed: Bed) -> None:
    bed.run("-x", "-s", "secret-plaintext")
    (entry,) = bed.log()
    assert entry["argv"] == ["-x", "-s", "<16 chars>"]


# --- usage --------------------------------------------------------------------------------------


def test_no_operation_prints_the_usage(bed: Bed) -> None:
    code, out, err = bed.run("-a", MAA, "-k", bed.kid)
    assert (code, err) == (
        1,
        f"Info: created CA symlink ./curl-ca-bundle.crt -> {skr.CA_CANDIDATES[1]}\n",
    )
    assert out.decode().startswith(
        f"Usage: \n\tRelease RSA or EC key:\n\t\t{PROG} -a <attestation-endpoint>"
    )
    assert "-B <json-file|-|inline>" in out.decode()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("-x",), f"{PROG}: invalid option -- 'x'"),
        (("-u", "-k"), f"{PROG}: option requires an argument -- 'k'"),
        (("--help",), f"{PROG}: unrecognized option '--help'"),
    ],
)
def test_usage_errors(bed: Bed, args: tuple[str, ...], message: str) -> None:
    code, out, err = bed.run(*args)
    assert code == 1
    assert err.splitlines()[-1] == message
    assert out.decode().startswith("Usage: \n")


def test_getopt_is_gnu_getopt() -> None:
    opts = skr.getopt([PROG, "operand", "-uwra", "URL", "-kKID", "--", "-s", "x"])
    assert [(o.letter, o.value) for o in opts] == [
        ("u", None),
        ("w", None),
        ("r", None),
        ("a", "URL"),
        ("k", "KID"),
    ]
    assert skr.getopt([PROG, "-s", "-u"])[0].value == "-u"  # a value may look like an option
    assert skr.redacted_argv([PROG, "-us", "abcd"], skr.getopt([PROG, "-us", "abcd"])) == [
        "-us",
        "<4 chars>",
    ]


def test_posixly_correct_stops_at_the_first_operand(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSIXLY_CORRECT", "1")
    assert [o.letter for o in skr.getopt([PROG, "-u", "operand", "-r"])] == ["u"]


def test_the_last_operation_wins_and_c_falls_back_to_imds(bed: Bed) -> None:
    wrapped = wrap(bed.kek, b"z" * 32)
    code, out, err = bed.run("-r", "-a", MAA, "-k", bed.kid, "-c", "other", "-s", wrapped, "-u")
    assert (code, out) == (0, b"z" * 32 + b"\n"), err


# --- refusals, as the real tool reports them ----------------------------------------------------


def test_the_key_must_exist_under_that_vault_name_and_version(bed: Bed) -> None:
    wrapped = wrap(bed.kek, b"q" * 32)
    name, version = bed.kid.split("/")[-2:]
    for kid in (
        f"{VAULT}/keys/{name}",
        f"{VAULT}/keys/MODEL-KEK/{version.upper()}",
        f"{VAULT}/keys/{name}/",
    ):
        assert bed.run("-a", MAA, "-k", kid, "-s", wrapped, "-u")[:2] == (0, b"q" * 32 + b"\n"), kid
    code, out, err = bed.run(
        "-a", MAA, "-k", f"{VAULT}/keys/{name}/{'0' * 32}", "-s", wrapped, "-u"
    )
    assert (code, out) == (4, b"")
    assert err.splitlines()[-1].startswith(
        'SKR HTTP request failed: HTTP 404: {"error":{'
        '"code":"KeyNotFound","message":"A key with '
        f"(name/id) {name}/{'0' * 32} was not found"
    )
    code, _, err = bed.run("-a", MAA, "-k", f"{VAULT}/keys/other-kek", "-s", wrapped, "-u")
    assert code == 4 and '"code":"KeyNotFound"' in err


@pytest.mark.parametrize(
    ("kid", "code", "last_line"),
    [
        (
            "https://myvault.vault.azure.net/keys/model-kek",
            6,
            "SKR curl_easy_perform() failed: Couldn't resolve host name (Could not resolve host: "
            "myvault.vault.azure.net)",
        ),
        (
            "https://127.0.0.1:1/keys/model-kek?x=.vault.azure.net",
            6,
            "SKR curl_easy_perform() failed: Couldn't connect to server (Failed to connect to "
            "127.0.0.1 port 1 after 0 ms: Couldn't connect to server)",
        ),
        (
            "https://10.1.2.3/keys/model-kek",
            1,
            "Invalid resource suffix found in KEKUrl: https://10.1.2.3/keys/model-kek",
        ),
        (
            VAULT + "/secrets/model-kek",
            4,
            'SKR HTTP request failed: HTTP 404: {"error":{"code":"NotFound","message":'
            '"No operation POST /secrets/model-kek/release on this vault."}}',
        ),
    ],
)
def test_key_urls_outside_the_testbed_vault(bed: Bed, kid: str, code: int, last_line: str) -> None:
    got, out, err = bed.run("-a", MAA, "-k", kid, "-s", wrap(bed.kek, b"1" * 32), "-u")
    assert (got, out) == (code, b""), err
    assert err.splitlines()[-1] == last_line
    if code == 1:
        assert err.splitlines()[-2] == (
            f"Error occured in AttestationUtil.cpp:getResourceUrl on line 245. Msg={last_line}"
        )


@pytest.mark.parametrize(
    "url", [None, "https://sharedeus2.eus2.attest.azure.net", "https://127.0.0.1:2"]
)
def test_attestation_must_reach_the_testbed_maa(bed: Bed, url: str | None) -> None:
    args = ("-k", bed.kid, "-s", wrap(bed.kek, b"1" * 32), "-u")
    code, out, err = bed.run(*(("-a", url) if url else ()), *args)
    assert (code, out) == (2, b"")
    assert err.splitlines()[-1].startswith(
        "MAA attestation failed: Failed sending curl request with error:Couldn't"
    )
    # One trailing slash is the same provider.
    assert bed.run("-a", MAA + "/", *args)[0] == 0


def test_attestation_fails_when_the_testbed_is_down(bed: Bed) -> None:
    write_json(
        bed.dir / RUN_DIR / "services.json",
        {"pid": 2**22 + 12345, "urls": {"maa": MAA, "keyvault": VAULT}},
    )
    code, _, err = bed.run(*unwrap_args(bed, wrap(bed.kek, b"1" * 32)))
    assert code == 2
    assert err.splitlines()[-1] == (
        "MAA attestation failed: Failed sending curl request with error:Couldn't connect to server"
    )


def test_identity_and_role_come_from_imds_variables(bed: Bed) -> None:
    args = unwrap_args(bed, wrap(bed.kek, b"1" * 32))
    noroles = bed.identities.named("noroles")
    code, _, err = bed.run(*args, env={"IMDS_CLIENT_ID": noroles.client_id})
    assert code == 4
    assert '"innererror":{"code":"ForbiddenByRbac"}' in err
    assert "Missing role: 'Key Vault Crypto Service Release User'" in err
    code, _, err = bed.run(*args, env={"IMDS_OBJECT_ID": noroles.object_id})
    assert code == 4 and "ForbiddenByRbac" in err
    code, _, err = bed.run(
        *args, env={"IMDS_CLIENT_ID": "", "IMDS_MSI_RES_ID": bed.identities.default.resource_id}
    )
    assert code == 0, err
    code, _, err = bed.run(*args, env={"IMDS_CLIENT_ID": "00000000-0000-4000-8000-000000000000"})
    assert code == 3
    assert err.splitlines()[-1] == "IMDS token request failed: HTTP 400: Identity not found"


def test_service_principal_credentials(bed: Bed) -> None:
    args = ("-a", MAA, "-k", bed.kid, "-c", "sp", "-s", wrap(bed.kek, b"1" * 32), "-u")
    code, _, err = bed.run(*args)
    assert code == 3
    assert err.splitlines()[-1] == (
        "AAD service principal env vars not set. Need "
        "AKV_SKR_CLIENT_ID, AKV_SKR_CLIENT_SECRET, AKV_SKR_TENANT_ID"
    )
    sp = {"AKV_SKR_CLIENT_ID": "c", "AKV_SKR_CLIENT_SECRET": "s", "AKV_SKR_TENANT_ID": "t"}
    code, _, err = bed.run(*args, env=sp)
    assert code == 6
    assert err.splitlines()[-1].startswith(
        "AAD curl_easy_perform() failed: Couldn't resolve "
        "host name (Could not resolve host: "
        "login.microsoftonline.com)"
    )


def test_keys_the_vault_would_not_release(bed: Bed) -> None:
    wrapped = wrap(bed.kek, b"1" * 32)
    code, _, err = bed.run("-a", MAA, "-k", f"{VAULT}/keys/plain", "-s", wrapped, "-u")
    assert code == 4 and '"innererror":{"code":"KeyNotExportable"}' in err
    store = KeyStore(bed.dir / "keyvault")
    other = {
        "version": "1.0.0",
        "anyOf": [
            {"authority": "https://other.attest.azure.net", "allOf": [{"claim": "a", "equals": 1}]}
        ],
    }
    kv = store.add(
        "elsewhere",
        "RSA-HSM",
        rsa_key(),
        exportable=True,
        release_policy=StoredPolicy(json.dumps(other).encode()),
    )
    code, _, err = bed.run("-a", MAA, "-k", kv.kid(VAULT), "-s", wrapped, "-u")
    assert code == 4 and '"innererror":{"code":"UntrustedAuthority"}' in err
    store.update(store.get("model-kek") or kv, enabled=False)
    code, _, err = bed.run(*unwrap_args(bed, wrapped))
    assert code == 4 and '"innererror":{"code":"KeyDisabled"}' in err


def test_unwrap_failures(bed: Bed) -> None:
    code, out, err = bed.run(*unwrap_args(bed, "not base64!"))
    assert (code, out) == (1, b"")
    assert err.splitlines()[-1] == (
        "Exception occured. Details: attempt to decode a value not in base64 char set"
    )
    code, _, err = bed.run(*unwrap_args(bed, wrap(rsa_key(), b"1" * 32)))
    assert code == 5 and err.splitlines()[-1] == "OpenSSL error: "
    code, _, err = bed.run(*unwrap_args(bed, wrap(bed.kek, b"1" * 32), "-H", "md5"))
    assert code == 1
    assert err.splitlines()[-1] == (
        "Exception occured. Details: Unsupported hash algorithm: "
        "md5. Supported: sha1, sha256, sha384, sha512"
    )


def test_base64_is_decoded_the_lenient_boost_way() -> None:
    assert skr.boost_base64("aGk=") == b"hi"
    assert skr.boost_base64("aGk") == b"hi"
    assert skr.boost_base64("a=G=k") == b"hi"
    with pytest.raises(skr.Unexpected, match="not in base64 char set"):
        skr.boost_base64("aG k")
    with pytest.raises(skr.Unexpected, match="not in base64 char set"):
        skr.boost_base64("aGk-")


# --- the other operations -----------------------------------------------------------------------


def test_wrap_release_and_batch(bed: Bed) -> None:
    code, out, err = bed.run("-a", MAA, "-k", bed.kid, "-s", "my symmetric key", "-w")
    assert code == 0, err and out.endswith(b"\n")
    wrapped = base64.b64decode(out.strip(), validate=True)
    assert (
        bed.kek.decrypt(wrapped, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
        == b"my symmetric key"
    )
    code, out, err = bed.run("-a", MAA, "-k", bed.kid, "-r")
    assert (code, out) == (0, b"")
    assert err == (
        "The released key is of type RSA. It can be used for wrapKey/unwrapKey operations.\n"
    )
    batch = {
        "keys": [
            {"id": "a", "wrapped": wrap(bed.kek, b"first\x00")},
            {"wrapped": wrap(bed.kek, b"second")},
            {"id": "c"},
            {"id": "d", "wrapped": wrap(rsa_key(), b"x")},
        ]
    }
    code, out, err = bed.run("-a", MAA, "-k", bed.kid, "-B", json.dumps(batch))
    assert code == 0, err
    assert (
        out.decode()
        == json.dumps(
            {
                "results": [
                    {"id": "a", "unwrapped": "first"},
                    {"id": "1", "unwrapped": "second"},
                    {"error": 'missing or invalid "wrapped" field', "id": "c"},
                    {"error": "EVP_PKEY_decrypt failed", "id": "d"},
                ]
            },
            indent=2,
        )
        + "\n"
    )
    code, _, err = bed.run("-a", MAA, "-k", bed.kid, "-B", str(bed.cwd / "absent.json"))
    assert code == 1
    assert err.splitlines()[-1] == f"Failed to open batch JSON file: {bed.cwd / 'absent.json'}"
    code, _, err = bed.run("-a", MAA, "-k", bed.kid, "-B", '{"keys": 1}')
    assert code == 1 and err.splitlines()[-1] == 'UnwrapKeyBatch: JSON must contain a "keys" array'
    binary = {"keys": [{"id": "b", "wrapped": wrap(bed.kek, b"\xff\xfe")}]}
    code, _, err = bed.run("-a", MAA, "-k", bed.kid, "-B", json.dumps(binary))
    assert code == 1
    assert err.splitlines()[-1] == (
        "Exception occured. Details: [json.exception.type_error.316] "
        "invalid UTF-8 byte at index 0: 0xFF"
    )


# --- fault knobs --------------------------------------------------------------------------------


def test_fail_fault_exits_4_with_a_long_stderr(bed: Bed) -> None:
    Faults(bed.dir / "faults.json").arm(skr.FAULT, Fault(status=403, count=1))
    wrapped = wrap(bed.kek, b"1" * 32)
    code, out, err = bed.run(*unwrap_args(bed, wrapped))
    assert (code, out) == (4, b"")
    assert len(err) > 2400
    assert err.splitlines()[-1] == (
        'SKR HTTP request failed: HTTP 403: {"error":{"code":'
        '"Forbidden","message":"injected fault: HTTP 403"}}'
    )
    assert wrapped in err  # the traced run shows -s, as the real tool's trace does
    assert bed.run(*unwrap_args(bed, wrapped))[0] == 0  # used up


def test_sleep_and_down_faults(bed: Bed) -> None:
    faults = Faults(bed.dir / "faults.json")
    faults.arm(skr.FAULT, Fault(latency_s=0.4, count=1))
    started = time.monotonic()
    code, out, _ = bed.run(*unwrap_args(bed, wrap(bed.kek, b"1" * 32)))
    assert (code, out) == (0, b"1" * 32 + b"\n")
    assert time.monotonic() - started >= 0.4
    faults.arm(skr.FAULT, Fault(down=True))
    code, _, err = bed.run(*unwrap_args(bed, wrap(bed.kek, b"1" * 32)))
    assert code == 6
    assert err.splitlines()[-1] == (
        "SKR curl_easy_perform() failed: Couldn't connect to server "
        "(Failed to connect to 127.0.0.1 port 49443 after 0 ms: "
        "Couldn't connect to server)"
    )
