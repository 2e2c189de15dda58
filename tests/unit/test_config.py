"""Configuration loading: precedence, the settings table, and errors that name origin, key and
value."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from confinfer import config, configvalues
from confinfer.errors import ConfigError, UsageError

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def refusal(tmp_path: Path, text: str) -> tuple[Path, ConfigError]:
    """Load a directory holding one file with ``text``; return the file and the error."""
    path = tmp_path / "50-bad.toml"
    path.write_text(text + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path, environ={})
    assert info.value.reason == "config-invalid"
    return path, info.value


def env_refusal(tmp_path: Path, var: str, value: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path, environ={var: value})
    assert info.value.reason == "config-invalid"
    return info.value


def test_defaults_without_files_or_env(tmp_path: Path) -> None:
    cfg = config.load(tmp_path / "none", environ={})
    assert cfg.tpm_tcti == "device:/dev/tpmrm0"
    assert cfg.skr_algorithm == "RSA_AES_KEY_WRAP_256"
    assert cfg.keyvault_verify_challenge_resource is True
    assert cfg.imds == "http://169.254.169.254"
    assert cfg.issuers == ("https://sharedeus.eus.attest.azure.net",)
    assert cfg.keyvault_allowed_keys == ()
    assert cfg.azure_credential == "auto"
    assert cfg.http_max_response_bytes == 4 << 20
    assert cfg == config.Config()


def test_env_overrides_file_and_flags_override_env(tmp_path: Path) -> None:
    (tmp_path / "10-site.toml").write_text(
        'maa_url = "https://file.example"\nmax_retries = 2\n', encoding="utf-8"
    )
    cfg = config.load(tmp_path, environ={"CONFINFER_MAA_URL": "https://env.example/"})
    assert cfg.maa_url == "https://env.example/"
    assert cfg.max_retries == 2
    assert cfg.sources["maa_url"] == "$CONFINFER_MAA_URL"
    cfg2 = config.override(cfg, maa_url="https://flag.example", key_id=None)
    assert cfg2.maa_url == "https://flag.example"
    assert cfg2.sources["maa_url"] == "--maa-url"
    assert cfg2.issuers == ("https://flag.example",)


def test_env_strings_are_coerced(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x", encoding="utf-8")
    cfg = config.load(
        tmp_path / "none",
        environ={
            "CONFINFER_KEYVAULT_VERIFY_CHALLENGE_RESOURCE": "0",
            "CONFINFER_CA_BUNDLE": str(ca),
            "CONFINFER_MAA_ALLOWED_ISSUERS": "https://a.example/, https://b.example",
            "CONFINFER_MAX_BYTES": "1024",
            "AZURE_POD_IDENTITY_AUTHORITY_HOST": "http://127.0.0.1:9/",
        },
    )
    assert cfg.keyvault_verify_challenge_resource is False
    assert cfg.ca_bundle == ca
    assert cfg.issuers == ("https://a.example", "https://b.example")
    assert cfg.max_bytes == 1024
    assert cfg.imds == "http://127.0.0.1:9"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('maa_url = "http://plain.example"', "key 'maa_url' = 'http://plain.example'"),
        ("max_retries = -1", "key 'max_retries' = -1: must not be negative"),
        ('max_retries = "many"', "key 'max_retries' = 'many': expected an integer"),
        ('skr_algorithm = "RSA1_5"', "expected one of RSA_AES_KEY_WRAP_256"),
        ('colour = "blue"', "unknown key 'colour'"),
        ("maa_url = ", "cannot parse"),
        ('ca_bundle = "/nonexistent/ca.pem"', "no such file"),
        ("keyvault_verify_challenge_resource = 3", "expected a boolean"),
    ],
)
def test_bad_file_values_name_file_key_and_value(tmp_path: Path, text: str, needle: str) -> None:
    path, err = refusal(tmp_path, text)
    assert str(path) in err.message
    assert needle in err.message


def test_bad_env_value_names_the_variable(tmp_path: Path) -> None:
    err = env_refusal(tmp_path, "CONFINFER_HTTP_TIMEOUT_S", "0")
    assert err.message.startswith("$CONFINFER_HTTP_TIMEOUT_S: key 'http_timeout_s'")


def test_override_rejects_unknown_key(tmp_path: Path) -> None:
    cfg = config.load(tmp_path, environ={})
    with pytest.raises(ConfigError, match="unknown configuration key 'nope'"):
        config.override(cfg, nope=1)


def test_unknown_file_key_suggests_the_near_one(tmp_path: Path) -> None:
    path, err = refusal(tmp_path, 'maa_ur = "https://x.example"')
    assert err.message == f"{path}: unknown key 'maa_ur'"
    assert err.hint == "did you mean 'maa_url'?"


def test_empty_variable_means_unset_and_sizes_take_suffixes(tmp_path: Path) -> None:
    cfg = config.load(tmp_path, environ={"CONFINFER_MAX_BYTES": "", "CONFINFER_KEY_ID": ""})
    assert cfg.max_bytes is None and cfg.key_id is None
    cfg = config.load(tmp_path, environ={"CONFINFER_MAX_BYTES": "64G"})
    assert cfg.max_bytes == 64 << 30
    (tmp_path / "a.toml").write_text('max_bytes = "2MiB"\n', encoding="utf-8")
    assert config.load(tmp_path, environ={}).max_bytes == 2 << 20
    with pytest.raises(ConfigError, match="expected an integer or a size like 64G"):
        config.load(tmp_path, environ={"CONFINFER_MAX_BYTES": "lots"})


@pytest.mark.parametrize(
    ("text", "value"),
    [("4194304", 4194304), ("4M", 4 << 20), ("4MiB", 4 << 20), ("1 g", 1 << 30), ("7B", 7)],
)
def test_parse_size(text: str, value: int) -> None:
    assert configvalues.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "4X", "-1", "1.5G", "M", "4iB", "\u0664M", "9" * 31])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        configvalues.parse_size(text)


def test_release_roots_default_to_the_tls_bundle(tmp_path: Path) -> None:
    tls, release = tmp_path / "tls.pem", tmp_path / "release.pem"
    tls.write_text("x", encoding="utf-8")
    release.write_text("y", encoding="utf-8")
    assert config.load(tmp_path, environ={}).release_roots is None
    cfg = config.load(tmp_path, environ={"CONFINFER_CA_BUNDLE": str(tls)})
    assert cfg.release_roots == tls
    cfg = config.override(cfg, keyvault_release_ca_bundle=release)
    assert cfg.release_roots == release
    with pytest.raises(UsageError, match=r"key 'keyvault_release_ca_bundle' = '/no/such\.pem'"):
        config.override(cfg, keyvault_release_ca_bundle=Path("/no/such.pem"))


def test_existence_is_checked_on_the_final_value_only(tmp_path: Path) -> None:
    """A file's missing CA bundle may be cancelled for one run by an empty variable."""
    cfg = config.load(tmp_path, environ={"CONFINFER_CA_BUNDLE": ""})
    assert cfg.ca_bundle is None and cfg.sources["ca_bundle"] == "$CONFINFER_CA_BUNDLE"


# --- refusals: exact message shape "<origin>: key '<key>' = <value>: <why>" -----------------

SECONDS = "expected a finite number of seconds > 0"


@pytest.mark.parametrize("text", ["nan", "+nan", "-nan", "inf", "+inf", "-inf"])
def test_non_finite_numbers_in_a_file_are_refused(tmp_path: Path, text: str) -> None:
    path, err = refusal(tmp_path, f"http_timeout_s = {text}")
    shown = "-inf" if text == "-inf" else "inf" if "inf" in text else "nan"
    assert err.message == f"{path}: key 'http_timeout_s' = {shown}: {SECONDS}"


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "-1e999"])
def test_non_finite_numbers_in_the_environment_are_refused(tmp_path: Path, text: str) -> None:
    err = env_refusal(tmp_path, "CONFINFER_HTTP_TIMEOUT_S", text)
    assert err.message == f"$CONFINFER_HTTP_TIMEOUT_S: key 'http_timeout_s' = {text!r}: {SECONDS}"


def test_non_finite_numbers_from_a_flag_are_refused(tmp_path: Path) -> None:
    cfg = config.load(tmp_path, environ={})
    with pytest.raises(UsageError) as info:
        config.override(cfg, http_timeout_s=math.inf)
    assert info.value.message == f"--http-timeout-s: key 'http_timeout_s' = inf: {SECONDS}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("http_timeout_s = 0", f"key 'http_timeout_s' = 0: {SECONDS}"),
        ("http_timeout_s = -0.5", f"key 'http_timeout_s' = -0.5: {SECONDS}"),
        ("http_timeout_s = 3601", "key 'http_timeout_s' = 3601: must be at most 3600 seconds"),
        ("http_timeout_s = 1e300", "key 'http_timeout_s' = 1e+300: must be at most 3600 seconds"),
        ("http_timeout_s = true", f"key 'http_timeout_s' = True: {SECONDS}, not a boolean"),
        ('http_timeout_s = "30s"', f"key 'http_timeout_s' = '30s': {SECONDS}"),
    ],
)
def test_seconds_are_finite_positive_and_bounded(tmp_path: Path, text: str, message: str) -> None:
    path, err = refusal(tmp_path, text)
    assert err.message == f"{path}: {message}"


def test_seconds_accept_integers_and_decimal_text(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("http_timeout_s = 30\n", encoding="utf-8")
    assert config.load(tmp_path, environ={}).http_timeout_s == 30.0
    cfg = config.load(tmp_path, environ={"CONFINFER_HTTP_TIMEOUT_S": " 2.5 "})
    assert cfg.http_timeout_s == 2.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_retries = true", "key 'max_retries' = True: expected an integer, not a boolean"),
        (
            "max_bytes = false",
            "key 'max_bytes' = False: expected an integer or a size like 64G, not a boolean",
        ),
        (
            "keyvault_verify_challenge_resource = 1",
            "key 'keyvault_verify_challenge_resource' = 1: "
            "expected a boolean (true or false), not an integer",
        ),
        (
            "keyvault_verify_challenge_resource = 0.0",
            "key 'keyvault_verify_challenge_resource' = 0.0: "
            "expected a boolean (true or false), not a floating-point number",
        ),
    ],
)
def test_booleans_and_numbers_do_not_stand_in_for_each_other(
    tmp_path: Path, text: str, message: str
) -> None:
    path, err = refusal(tmp_path, text)
    assert err.message == f"{path}: {message}"


@pytest.mark.parametrize(
    ("text", "value"),
    [(t, True) for t in ("1", "true", "yes", "on", "TRUE", "Yes")]
    + [(t, False) for t in ("0", "false", "no", "off", "OFF")],
)
def test_boolean_words_in_the_environment(tmp_path: Path, text: str, value: bool) -> None:
    var = "CONFINFER_KEYVAULT_VERIFY_CHALLENGE_RESOURCE"
    assert config.load(tmp_path, environ={var: text}).keyvault_verify_challenge_resource is value


@pytest.mark.parametrize("text", ["2", "-1", "", "y", "enabled", " true"])
def test_other_boolean_words_are_refused(tmp_path: Path, text: str) -> None:
    var = "CONFINFER_KEYVAULT_VERIFY_CHALLENGE_RESOURCE"
    err = env_refusal(tmp_path, var, text)
    assert err.message == (
        f"${var}: key 'keyvault_verify_challenge_resource' = {text!r}: "
        "expected a boolean (true or false)"
    )


@pytest.mark.parametrize("text", ["max_retries = 2.5", "max_retries = 3.0", "max_retries = 1e2"])
def test_fractional_integers_in_a_file_are_refused(tmp_path: Path, text: str) -> None:
    path, err = refusal(tmp_path, text)
    value = text.split(" = ")[1].replace("1e2", "100.0")
    assert err.message == (
        f"{path}: key 'max_retries' = {value}: expected an integer, not a floating-point number"
    )


@pytest.mark.parametrize("text", ["2.5", "3.0", "1e2", "0x10", "1_000", "\u0663", "four"])
def test_fractional_or_odd_integers_in_the_environment_are_refused(
    tmp_path: Path, text: str
) -> None:
    err = env_refusal(tmp_path, "CONFINFER_MAX_RETRIES", text)
    assert err.message == (
        f"$CONFINFER_MAX_RETRIES: key 'max_retries' = {text!r}: expected an integer"
    )


def test_fractional_sizes_are_refused(tmp_path: Path) -> None:
    path, err = refusal(tmp_path, "max_bytes = 1.5e9")
    assert err.message == (
        f"{path}: key 'max_bytes' = 1500000000.0: "
        "expected an integer or a size like 64G, not a floating-point number"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_retries = 101", "key 'max_retries' = 101: must be at most 100"),
        ("max_retries = 9223372036854775807", "= 9223372036854775807: must be at most 100"),
        (
            "max_retries = " + "9" * 60,
            "= 999999999999999999...9999999999999999999: must be at most 100",
        ),
        (
            "max_bytes = 1125899906842625",
            "key 'max_bytes' = 1125899906842625: must be at most 1 PiB",
        ),
        ('max_bytes = "2048T"', "key 'max_bytes' = '2048T': must be at most 1 PiB"),
        ("http_max_response_bytes = 0", "key 'http_max_response_bytes' = 0: must be at least 1"),
        ('http_max_response_bytes = "2G"', "= '2G': must be at most 1 GiB"),
    ],
)
def test_integers_are_bounded(tmp_path: Path, text: str, message: str) -> None:
    path, err = refusal(tmp_path, text)
    assert err.message.startswith(f"{path}: key ")
    assert message in err.message


@pytest.mark.parametrize("digits", [30, 41, 1000, 10_000])
def test_long_digit_strings_in_the_environment_are_over_the_bound(
    tmp_path: Path, digits: int
) -> None:
    err = env_refusal(tmp_path, "CONFINFER_MAX_RETRIES", "9" * digits)
    assert err.message.endswith("': must be at most 100")
    assert len(err.message) < 160


@pytest.mark.parametrize(
    "value", ["[" * 10_000 + "]" * 10_000, "{a = " * 10_000 + "1" + "}" * 10_000]
)
def test_deep_nesting_is_a_config_error_naming_the_file(tmp_path: Path, value: str) -> None:
    path, err = refusal(tmp_path, f"maa_url = {value}")
    assert err.message == f"{path}: cannot parse: values nested too deeply"
    assert err.one_line().startswith(f"config-invalid: {path}: ")


def test_integers_too_long_for_python_are_a_parse_error(tmp_path: Path) -> None:
    path, err = refusal(tmp_path, "max_retries = " + "9" * 5000)
    assert err.message.startswith(f"{path}: cannot parse: ")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "maa_url = " + "[" * 200 + "]" * 200,
            "key 'maa_url' = [[[[...]]]]: expected an https:// URL, not a list",
        ),
        ("maa_url = {a = 1}", "key 'maa_url' = {'a': 1}: expected an https:// URL, not a table"),
        ("[tpm_tcti]\nx = 1", "key 'tpm_tcti' = {'x': 1}: expected a string, not a table"),
        ("max_retries = [1]", "key 'max_retries' = [1]: expected an integer, not a list"),
        (
            "skr_tool = 1979-05-27",
            "key 'skr_tool' = datetime.date(1979, 5, 27): expected a path, not a date",
        ),
        (
            'maa_allowed_issuers = ["https://a.example", ["https://b.example"]]',
            "key 'maa_allowed_issuers' = ['https://a.example', ['https://b.example']]: "
            "expected a list of strings",
        ),
        (
            "keyvault_allowed_keys = " + "[" * 300 + "]" * 300,
            "key 'keyvault_allowed_keys' = [[[[...]]]]: expected a list of strings",
        ),
        (
            'azure_credential = ["cli"]',
            "key 'azure_credential' = ['cli']: "
            "expected one of auto, managed-identity, cli, default, not a list",
        ),
    ],
)
def test_nested_values_where_a_scalar_is_expected(tmp_path: Path, text: str, message: str) -> None:
    path, err = refusal(tmp_path, text)
    assert err.message == f"{path}: {message}"


def test_values_are_shown_cut_short(tmp_path: Path) -> None:
    wide = "[" + ", ".join(f'"{"x" * 50}"' for _ in range(50)) + "]"
    path, err = refusal(tmp_path, f"maa_url = {wide}")
    shown = err.message.removeprefix(f"{path}: key 'maa_url' = ").split(": expected")[0]
    assert len(shown) <= 80 and shown.endswith("...")
    path, err = refusal(tmp_path, f'maa_url = "https://{"a" * 5000}"')
    assert len(err.message) < len(str(path)) + 200


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("maa_url", "https://maa.example\n/x"),
        ("maa_url", "https://maa.example\t"),
        ("keyvault_url", "https://vault.example/\x1b[2J"),
        ("imds_url", "http://127.0.0.1\x00:80"),
        ("key_id", "https://v.vault.azure.net/keys/k\r"),
        ("keyvault_allowed_keys", "https://v.vault.azure.net/keys/k\x7f"),
        ("maa_allowed_issuers", "https://a.example\u202e"),
        ("ca_bundle", "/etc/ssl/ca\n.pem"),
        ("skr_tool", "/usr/bin/skr\x00"),
        ("tpm_tcti", "device:/dev/tpmrm0\x1b"),
        ("managed_identity_client_id", "id\u2028"),
    ],
)
def test_control_characters_are_refused(tmp_path: Path, key: str, value: str) -> None:
    setting = config.BY_NAME[key]
    err = env_refusal(tmp_path, setting.env, value)
    prefix = f"${setting.env}: key {key!r} = {value!r}: "
    assert err.message.startswith(prefix)
    assert "control" in err.message.removeprefix(prefix)


@pytest.mark.parametrize(
    "value",
    [
        "https://user:pw@maa.example",
        "https://maa.example/?x=1",
        "https://maa.example/#f",
        "https://maa.example?",
        "https://maa.example:99999",
        "https://[::1",
        "https://maa example",
        "https://ma\u00e4.example",
        "https:///path",
        "ftp://maa.example",
        "maa.example",
    ],
)
def test_urls_are_plain_https_with_a_host(tmp_path: Path, value: str) -> None:
    err = env_refusal(tmp_path, "CONFINFER_MAA_URL", value)
    assert err.message.startswith(
        f"$CONFINFER_MAA_URL: key 'maa_url' = {value!r}: expected an https:// URL"
    )


def test_imds_url_from_the_azure_variable_is_checked_too(tmp_path: Path) -> None:
    err = env_refusal(tmp_path, "AZURE_POD_IDENTITY_AUTHORITY_HOST", "169.254.169.254")
    assert err.message == (
        "$AZURE_POD_IDENTITY_AUTHORITY_HOST: key 'imds_url' = '169.254.169.254': "
        "expected an http(s):// URL"
    )


def test_oversized_files_are_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "MAX_FILE_BYTES", 16)
    path, err = refusal(tmp_path, 'tpm_tcti = "device:/dev/tpmrm0"')
    assert err.message == f"{path}: cannot parse: larger than 16"


def test_flags_are_parsed_like_everything_else(tmp_path: Path) -> None:
    cfg = config.load(tmp_path, environ={})
    with pytest.raises(UsageError) as info:
        config.override(cfg, max_retries=True)
    assert info.value.message == (
        "--max-retries: key 'max_retries' = True: expected an integer, not a boolean"
    )
    with pytest.raises(UsageError) as info:
        config.override(cfg, max_retries=10**5000)
    assert info.value.message == (
        "--max-retries: key 'max_retries' = <16610-bit integer>: must be at most 100"
    )
    cfg = config.override(cfg, skr_tool=Path("/opt/skr"), max_bytes=1 << 30, max_retries="3")
    assert (cfg.skr_tool, cfg.max_bytes, cfg.max_retries) == (Path("/opt/skr"), 1 << 30, 3)
    assert cfg.sources["max_bytes"] == "--max-bytes"


# --- the new keys -----------------------------------------------------------------------------

VAULT_KID = "https://contoso.vault.azure.net/keys/model-kek/0123456789abcdef0123456789abcdef"
HSM_KID = "https://contoso.managedhsm.azure.net/keys/kek"


def test_allowed_keys_from_a_file_and_from_the_environment(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text(
        f'keyvault_allowed_keys = ["{VAULT_KID}", "{HSM_KID}/"]\n', encoding="utf-8"
    )
    assert config.load(tmp_path, environ={}).keyvault_allowed_keys == (VAULT_KID, HSM_KID)
    var = "CONFINFER_KEYVAULT_ALLOWED_KEYS"
    cfg = config.load(tmp_path, environ={var: f" {HSM_KID} ,,{VAULT_KID}"})
    assert cfg.keyvault_allowed_keys == (HSM_KID, VAULT_KID)
    assert config.load(tmp_path, environ={var: ""}).keyvault_allowed_keys == ()


@pytest.mark.parametrize(
    "kid",
    [
        "http://contoso.vault.azure.net/keys/kek",
        "https:///keys/kek",
        "https://contoso.vault.azure.net/secrets/kek",
        "https://contoso.vault.azure.net/keys/",
        "https://contoso.vault.azure.net/keys//v1",
        "https://contoso.vault.azure.net/keys/kek/v1/extra",
        "https://contoso.vault.azure.net/keys/kek?api-version=7.4",
        "https://contoso.vault.azure.net/keys/kek#v1",
        "https://me@contoso.vault.azure.net/keys/kek",
        "https://contoso.vault.azure.net/keys/k_e_k",
        "https://contoso.vault.azure.net/keys/kek/../other",
        "sha256:" + "0" * 64,
    ],
)
def test_allowed_keys_must_be_key_ids(tmp_path: Path, kid: str) -> None:
    path, err = refusal(tmp_path, f'keyvault_allowed_keys = ["{VAULT_KID}", "{kid}"]')
    assert err.message.startswith(f"{path}: key 'keyvault_allowed_keys' = ")
    assert f": item {kid!r}: expected a key id https://<vault>/keys/<name>[/<version>]" in (
        err.message
    )


def test_key_id_is_a_key_id_too(tmp_path: Path) -> None:
    assert config.load(tmp_path, environ={"CONFINFER_KEY_ID": VAULT_KID}).key_id == VAULT_KID
    err = env_refusal(tmp_path, "CONFINFER_KEY_ID", "https://contoso.vault.azure.net/kek")
    assert err.message == (
        "$CONFINFER_KEY_ID: key 'key_id' = 'https://contoso.vault.azure.net/kek': "
        "expected a key id https://<vault>/keys/<name>[/<version>]"
    )


def test_too_many_allowed_keys(tmp_path: Path) -> None:
    kids = ",".join(f"{HSM_KID}{i}" for i in range(configvalues.MAX_ITEMS + 1))
    err = env_refusal(tmp_path, "CONFINFER_KEYVAULT_ALLOWED_KEYS", kids)
    assert err.message.endswith(f": more than {configvalues.MAX_ITEMS} items")


@pytest.mark.parametrize("value", config.AZURE_CREDENTIALS)
def test_azure_credential_choices(tmp_path: Path, value: str) -> None:
    assert config.load(
        tmp_path, environ={"CONFINFER_AZURE_CREDENTIAL": value}
    ).azure_credential == (value)


@pytest.mark.parametrize("value", ["", "msi", "Auto", "managed_identity"])
def test_other_azure_credentials_are_refused(tmp_path: Path, value: str) -> None:
    err = env_refusal(tmp_path, "CONFINFER_AZURE_CREDENTIAL", value)
    assert err.message == (
        f"$CONFINFER_AZURE_CREDENTIAL: key 'azure_credential' = {value!r}: "
        "expected one of auto, managed-identity, cli, default"
    )


@pytest.mark.parametrize(("text", "value"), [("8M", 8 << 20), ("65536", 65536), ("1GiB", 1 << 30)])
def test_http_max_response_bytes_takes_sizes(tmp_path: Path, text: str, value: int) -> None:
    cfg = config.load(tmp_path, environ={"CONFINFER_HTTP_MAX_RESPONSE_BYTES": text})
    assert cfg.http_max_response_bytes == value


# --- the table --------------------------------------------------------------------------------


def test_onboarding_keys_default_to_the_azure_vm_without_pins(tmp_path: Path) -> None:
    cfg = config.load(tmp_path, environ={})
    assert (cfg.onboard_hardware, cfg.onboard_nvattest_url, cfg.onboard_nvattest_sha256) == (
        "azure",
        None,
        None,
    )
    digest = "AB" * 32
    (tmp_path / "a.toml").write_text(
        'onboard_hardware = "testbed"\n'
        'onboard_nvattest_url = "https://developer.download.nvidia.com/x/nvattest.deb"\n'
        f'onboard_nvattest_sha256 = "{digest}"\n',
        encoding="utf-8",
    )
    cfg = config.load(tmp_path, environ={})
    assert cfg.onboard_hardware == "testbed"
    assert cfg.onboard_nvattest_sha256 == digest.lower()  # one spelling, whatever was written
    cfg = config.load(tmp_path, environ={"CONFINFER_ONBOARD_HARDWARE": "azure"})
    assert cfg.onboard_hardware == "azure"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'onboard_hardware = "gcp"',
            "key 'onboard_hardware' = 'gcp': expected one of azure, testbed",
        ),
        ('onboard_hardware = "Azure"', "expected one of azure, testbed"),
        ("onboard_hardware = true", "expected one of azure, testbed, not a boolean"),
        (
            'onboard_nvattest_sha256 = "abc"',
            "key 'onboard_nvattest_sha256' = 'abc': expected a SHA-256 digest (64 hexadecimal "
            "digits)",
        ),
        ('onboard_nvattest_sha256 = "' + "g" * 64 + '"', "expected a SHA-256 digest"),
        ('onboard_nvattest_sha256 = "' + "a" * 65 + '"', "expected a SHA-256 digest"),
        (
            'onboard_nvattest_url = "http://developer.download.nvidia.com/nvattest.deb"',
            "expected an https:// URL",
        ),
    ],
)
def test_onboarding_values_are_refused_by_name(tmp_path: Path, text: str, message: str) -> None:
    path, err = refusal(tmp_path, text)
    assert err.message.startswith(f"{path}: key 'onboard_")
    assert message in err.message


def test_the_table_is_the_dataclass() -> None:
    fields = [f for f in dataclasses.fields(config.Config) if f.name != "sources"]
    assert [f.name for f in fields] == [s.name for s in config.SETTINGS]
    assert all(f.default == s.default for f, s in zip(fields, config.SETTINGS, strict=True))
    assert all(s.doc and "\n" not in s.doc for s in config.SETTINGS)
    assert config.BY_NAME["max_retries"].env == "CONFINFER_MAX_RETRIES"
    assert config.BY_NAME["max_retries"].flag == "--max-retries"


def test_every_default_parses_to_itself() -> None:
    for setting in config.SETTINGS:
        if setting.default is not None:
            assert setting.parse(setting.default) == setting.default, setting.name


def section(text: str, start: str, end: str) -> str:
    return text[text.index(start) : text.index(end, text.index(start))]


def test_the_docs_list_the_table_in_order() -> None:
    guide = (ROOT / "docs" / "operator-guide.md").read_text(encoding="utf-8")
    rows = re.findall(
        r"^\| `([a-z0-9_]+)` \| .* \| `(CONFINFER_[A-Z0-9_]+)` \|",
        section(guide, "### 1.2 Keys", "**Retries:**"),
        re.MULTILINE,
    )
    assert rows == [(s.name, s.env) for s in config.SETTINGS]
    man = (ROOT / "docs" / "confinfer.1.md").read_text(encoding="utf-8")
    rows = re.findall(
        r"^  \| `(CONFINFER_[A-Z0-9_]+)` \| ([a-z0-9_]+)",
        section(man, "## ENVIRONMENT", "**AZURE_POD_IDENTITY_AUTHORITY_HOST**"),
        re.MULTILINE,
    )
    assert rows == [(s.env, s.name) for s in config.SETTINGS]


# --- properties: one parser, whatever the source ------------------------------------------------


def toml_value(value: Any) -> str:
    """``value`` written as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        escaped = "".join(
            f"\\u{ord(ch):04x}" if ch in '"\\' or ord(ch) < 0x20 or ord(ch) == 0x7F else ch
            for ch in value
        )
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def as_text(value: Any) -> str:
    """How a variable would carry ``value``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


Outcome = tuple[Any, ...]


def outcome(call: Any, origin: str) -> Outcome:
    """("ok", value) or ("refused", message without its origin, the reason alone)."""
    try:
        return ("ok", call())
    except (ConfigError, UsageError) as exc:
        # A flag is a usage error (64); a file or variable a configuration error (78).
        flag = origin.startswith("--")
        assert exc.reason in (("usage", "key-id-invalid") if flag else ("config-invalid",))
        assert exc.message.startswith(f"{origin}: key "), exc.message
        assert exc.message.endswith(f": {exc.details['why']}")
        return ("refused", exc.message.removeprefix(f"{origin}: "), exc.details["why"])


def from_file(tmp: Path, key: str, value: Any) -> Outcome:
    path = tmp / "a.toml"
    path.write_text(f"{key} = {toml_value(value)}\n", encoding="utf-8")
    return outcome(lambda: getattr(config.load(tmp, environ={}), key), str(path))


def from_env(tmp: Path, key: str, text: str) -> Outcome:
    setting = config.BY_NAME[key]
    return outcome(
        lambda: getattr(config.load(tmp / "none", environ={setting.env: text}), key),
        f"${setting.env}",
    )


def from_flag(key: str, value: Any) -> Outcome:
    setting = config.BY_NAME[key]
    return outcome(
        lambda: getattr(config.override(config.Config(), **{key: value}), key), setting.flag
    )


def why(result: Outcome) -> Outcome:
    """The verdict without the value as shown (a variable shows '4' where a file shows 4)."""
    return result if result[0] == "ok" else ("refused", result[2])


KEYS = st.sampled_from([s.name for s in config.SETTINGS])
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
SCALARS = (
    st.booleans()
    | st.integers(-(10**45), 10**45)
    | st.integers(-5, 200)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.floats(0.001, 5000)
    | TEXT
    | st.sampled_from(
        [
            "",
            "https://a.example",
            "http://127.0.0.1:8",
            VAULT_KID,
            "auto",
            "cli",
            "64G",
            "4",
            "yes",
            "off",
            "device:/dev/tpmrm0",
            "/etc/hosts",
        ]
    )
)
VALUES = SCALARS | st.lists(SCALARS, max_size=3) | st.dictionaries(TEXT, SCALARS, max_size=2)


@given(key=KEYS, value=VALUES)
def test_a_file_and_a_flag_give_the_same_verdict(
    tmp_path_factory: pytest.TempPathFactory, key: str, value: Any
) -> None:
    tmp = tmp_path_factory.mktemp("cfg")
    if isinstance(value, float) and math.isnan(value):
        assert from_file(tmp, key, value)[0] == from_flag(key, value)[0] == "refused"
        return
    assert from_file(tmp, key, value) == from_flag(key, value)


@given(key=KEYS, text=TEXT | SCALARS.map(as_text))
def test_text_reads_the_same_from_a_file_a_variable_and_a_flag(
    tmp_path_factory: pytest.TempPathFactory, key: str, text: str
) -> None:
    tmp = tmp_path_factory.mktemp("cfg")
    file, env, flag = from_file(tmp, key, text), from_env(tmp, key, text), from_flag(key, text)
    assert file == env == flag


ITEM = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters=", "), min_size=1, max_size=30
) | st.sampled_from(["https://a.example/", VAULT_KID, HSM_KID])


INTEGERS = st.integers(-(10**45), 10**45) | st.integers(-5, 200)
NATIVE = {  # each key that TOML gives a non-string value for, and values of that kind
    "maa_allowed_issuers": st.lists(ITEM, max_size=4),
    "keyvault_allowed_keys": st.lists(ITEM, max_size=4),
    "keyvault_verify_challenge_resource": st.booleans(),
    "http_timeout_s": INTEGERS | st.floats(allow_nan=False) | st.floats(0.001, 5000),
    "max_retries": INTEGERS,
    "http_max_response_bytes": INTEGERS | st.integers(0, 1 << 31),
    "max_bytes": INTEGERS | st.integers(0, 1 << 51),
    "gpu_evidence_timeout_s": INTEGERS | st.floats(allow_nan=False) | st.floats(0.001, 5000),
    "gpu_evidence_max_age_s": INTEGERS | st.floats(allow_nan=False) | st.floats(0.001, 1e5),
    "gpu_expected_count": INTEGERS,
    "gpu_fast_check_s": INTEGERS | st.floats(allow_nan=False) | st.floats(0.001, 500),
    "gpu_evidence_interval_s": INTEGERS | st.floats(allow_nan=False) | st.floats(0.001, 1e5),
    "gpu_grace_s": INTEGERS | st.floats(allow_nan=False) | st.floats(0.001, 1e6),
    "gpu_reset_grace_s": INTEGERS | st.floats(allow_nan=False) | st.floats(0.001, 5000),
    "vtpm_attest_interval_s": INTEGERS | st.floats(allow_nan=False) | st.floats(0.001, 1e5),
    "vtpm_grace_s": INTEGERS | st.floats(allow_nan=False) | st.floats(0.001, 1e6),
    "ak_cert_renew_days": INTEGERS,
    "evidence_rate_per_min": INTEGERS,
    "model_tmpfs_bytes": INTEGERS | st.integers(0, 1 << 51),
    "model_allow_swap": st.booleans(),
    "serving_uid": INTEGERS,
    "serving_gid": INTEGERS,
    "loader_attestd_wait_s": INTEGERS | st.floats(allow_nan=False) | st.floats(0.001, 1e5),
    "loader_attestd_grace_s": INTEGERS | st.floats(allow_nan=False) | st.floats(0.001, 5000),
    "serving_port": INTEGERS,
    "serving_args": st.lists(ITEM, max_size=4),
    "serving_ready_timeout_s": INTEGERS | st.floats(allow_nan=False) | st.floats(0.001, 1e5),
    "serving_gpus": st.booleans(),
}


def test_every_non_string_key_has_a_native_strategy() -> None:
    textual = ("str", "str | None", "Path", "Path | None")
    fields = dataclasses.fields(config.Config)
    assert set(NATIVE) == {f.name for f in fields if f.type not in textual} - {"sources"}


@given(pair=st.one_of([st.tuples(st.just(k), v) for k, v in NATIVE.items()]))
def test_native_values_and_their_text_give_the_same_verdict(
    tmp_path_factory: pytest.TempPathFactory, pair: tuple[str, Any]
) -> None:
    """``max_retries = 4`` and ``CONFINFER_MAX_RETRIES=4``; a TOML array and comma-separated
    text; ``true`` and ``"true"``: accepted alike, or refused for the same reason."""
    key, value = pair
    tmp = tmp_path_factory.mktemp("cfg")
    file, env = from_file(tmp, key, value), from_env(tmp, key, as_text(value))
    if isinstance(value, list) and not value and file[0] == "refused":
        return  # an empty array is a list; empty text is "unset" (None) for optional keys
    assert why(file) == why(env)


def test_a_bad_flag_value_is_a_usage_error_with_the_same_message(tmp_path: Path) -> None:
    """`confinfer seal --key-id KeyEncryptionKey`: the command line is wrong (64), not the
    configuration (78); --key-id has its own reason."""
    cfg = config.load(tmp_path, environ={})
    with pytest.raises(UsageError) as info:
        config.override(cfg, key_id="KeyEncryptionKey")
    assert info.value.reason == "key-id-invalid" and info.value.exit_code == 64
    assert info.value.message == (
        "--key-id: key 'key_id' = 'KeyEncryptionKey': "
        "expected a key id https://<vault>/keys/<name>[/<version>]"
    )
    with pytest.raises(UsageError) as info:
        config.override(cfg, maa_url="sharedeus2.eus2.attest.azure.net")
    assert info.value.reason == "usage" and info.value.exit_code == 64
    assert info.value.message.startswith("--maa-url: key 'maa_url' = ")
    # A value from a file stays a configuration error, even when a flag is also given.
    with pytest.raises(ConfigError) as err:
        config.override(config.Config(ca_bundle=Path("/nonexistent/ca.pem")), max_retries=2)
    assert err.value.reason == "config-invalid"
