"""Configuration loading: precedence, coercion and errors that name file, key and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from confinfer import config
from confinfer.errors import ConfigError

pytestmark = pytest.mark.unit


def test_defaults_without_files_or_env(tmp_path: Path) -> None:
    cfg = config.load(tmp_path / "none", environ={})
    assert cfg.tpm_tcti == "device:/dev/tpmrm0"
    assert cfg.skr_algorithm == "RSA_AES_KEY_WRAP_256"
    assert cfg.keyvault_verify_challenge_resource is True
    assert cfg.imds == "http://169.254.169.254"
    assert cfg.issuers == ("https://sharedeus.eus.attest.azure.net",)


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
    path = tmp_path / "50-bad.toml"
    path.write_text(text + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path, environ={})
    assert str(path) in info.value.message
    assert needle in info.value.message
    assert info.value.reason == "config-invalid"


def test_bad_env_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path, environ={"CONFINFER_HTTP_TIMEOUT_S": "0"})
    assert info.value.message.startswith("$CONFINFER_HTTP_TIMEOUT_S: key 'http_timeout_s'")


def test_override_rejects_unknown_key(tmp_path: Path) -> None:
    cfg = config.load(tmp_path, environ={})
    with pytest.raises(ConfigError, match="unknown configuration key 'nope'"):
        config.override(cfg, nope=1)


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
    ("text", "value"), [("4194304", 4194304), ("4M", 4 << 20), ("4MiB", 4 << 20), ("1 g", 1 << 30)]
)
def test_parse_size(text: str, value: int) -> None:
    assert config.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "4X", "-1", "1.5G", "M"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        config.parse_size(text)


def test_release_roots_default_to_the_tls_bundle(tmp_path: Path) -> None:
    tls, release = tmp_path / "tls.pem", tmp_path / "release.pem"
    tls.write_text("x", encoding="utf-8")
    release.write_text("y", encoding="utf-8")
    assert config.load(tmp_path, environ={}).release_roots is None
    cfg = config.load(tmp_path, environ={"CONFINFER_CA_BUNDLE": str(tls)})
    assert cfg.release_roots == tls
    cfg = config.override(cfg, keyvault_release_ca_bundle=release)
    assert cfg.release_roots == release
    with pytest.raises(ConfigError, match=r"key 'keyvault_release_ca_bundle' = '/no/such\.pem'"):
        config.override(cfg, keyvault_release_ca_bundle=Path("/no/such.pem"))
