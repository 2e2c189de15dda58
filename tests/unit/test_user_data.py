"""The cloud-init user data ``confinfer deploy`` renders (confinfer/deploy.py,
confinfer/userdata.py, cloud-init/*.tmpl): its structure key by key (``cloud-init schema`` does
not flag unknown keys), its size with a realistic configuration, Caddy's environment file and
the API key, and hostile values refused or quoted so that they stay values."""

from __future__ import annotations

import json
import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from confinfer import deploy, userdata
from confinfer.errors import ConfigError

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DIGEST = "9a1e94954b59589aa98e48c90552072dcdbfa142372260faaf0c89a28cfbddbe"
AZURE = {
    "resource_group": "confinfer",
    "location": "eastus2",
    "name_prefix": "cinf",
    "vault_name": "cinf-kv-0001",
}
# What cloud-init's modules take, for the keys this user data uses (cloud-init's docs:
# cc_package_update_upgrade_install, cc_write_files, cc_runcmd).
TOP_KEYS = {"package_update", "packages", "write_files", "runcmd"}
API_KEY = "Test-Key_0123456789abcdefghijklmnopqrstuvwxyz"  # a test value, 44 characters
FILES = [
    "/etc/confinfer/confinfer.toml",
    "/etc/confinfer/caddy.env",
    "/etc/confinfer/api-key",
]
CADDY = {"acme_email": "ops@example.com"}
WRITE_FILE_KEYS = {"path", "content", "owner", "permissions", "encoding", "append", "defer"}
REALISTIC = {
    "model_source": "https://contosomodels.blob.core.windows.net/models/llama-3-8b-instruct",
    "maa_allowed_issuers": ["https://sharedeus.eus.attest.azure.net"],
    "keyvault_allowed_keys": [
        f"https://cinf-kv-0001.vault.azure.net/keys/model-kek-{i}" for i in range(20)
    ],
    "skr_algorithm": "RSA_AES_KEY_WRAP_256",
    "managed_identity_client_id": "11111111-2222-3333-4444-555555555555",
    "http_timeout_s": 30,
    "max_retries": 4,
    "gpu_expected_count": 1,
    "gpu_evidence_interval_s": 900,
    "vtpm_attest_interval_s": 900,
    "attestd_socket_group": "caddy",
    "serving_image": "docker.io/vllm/vllm-openai:v0.30.0@sha256:" + "8a" * 32,
    "serving_model_name": "llama-3-8b-instruct",
    "serving_args": ["--max-model-len", "8192", "--gpu-memory-utilization", "0.92"] * 8,
    "onboard_nvattest_url": "https://developer.download.nvidia.com/compute/cuda/repos/"
    "ubuntu2204/x86_64/nvattest_1.2.2-1_amd64.deb",
    "onboard_nvattest_sha256": "ab" * 32,
}
MODEL = {"model_source": "https://acct.blob.core.windows.net/models/m"}


def toml_value(value: Any) -> str:
    """A TOML value for the test's own deploy.toml (TOML takes \\U escapes, not JSON's pairs)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        escaped = json.dumps(value, ensure_ascii=False)
        return "".join(ch if ord(ch) < 0x80 else f"\\U{ord(ch):08x}" for ch in escaped)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def plan_file(
    tmp_path: Path,
    appliance: dict[str, Any] | None = None,
    bootstrap: dict[str, str] | None = None,
    name: str = "deploy.toml",
    caddy: dict[str, Any] | None = None,
    azure: dict[str, Any] | None = None,
) -> Path:
    key = tmp_path / "id.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI x@y\n")
    settings = {**AZURE, "ssh_public_key": str(key), **(azure or {})}
    lines = ["[azure]"] + [f"{k} = {toml_value(v)}" for k, v in settings.items()]
    values = MODEL | (appliance or {})
    lines += ["[appliance]"] + [
        f"{k} = {toml_value(v)}" for k, v in values.items() if v is not None
    ]
    lines += ["[caddy]"] + [
        f"{k} = {toml_value(v)}" for k, v in (CADDY if caddy is None else caddy).items()
    ]
    if bootstrap is not None:
        lines += ["[bootstrap]"] + [f"{k} = {json.dumps(v)}" for k, v in bootstrap.items()]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def bootstrap(url: str = "https://acct.blob.core.windows.net/releases/wh.tar.gz") -> dict[str, str]:
    return {"wheelhouse_url": url, "wheelhouse_sha256": DIGEST}


def render(path: Path) -> tuple[str, dict[str, Any]]:
    data = deploy.user_data(deploy.load_plan(path), api_key=API_KEY)
    doc = yaml.safe_load(data)
    assert isinstance(doc, dict)
    return data, doc


def files(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["path"]: item for item in doc["write_files"]}


def test_the_bootstrap_user_data_has_exactly_the_expected_structure(tmp_path: Path) -> None:
    data, doc = render(plan_file(tmp_path, {"onboard_hardware": "testbed"}, bootstrap()))
    assert data.startswith("#cloud-config\n")
    assert "##" not in data and not re.search(r"@[A-Z_]+@", data)
    assert set(doc) == TOP_KEYS  # and nothing that disables Azure's networking
    assert doc["package_update"] is True
    assert {"docker.io", "caddy", "python3-venv", "curl", "ca-certificates"} <= set(doc["packages"])
    written = files(doc)
    assert list(written) == [*FILES, deploy.BOOTSTRAP_PATH]
    for item in written.values():
        assert set(item) <= WRITE_FILE_KEYS
        assert item["owner"] == "root:root"
    assert written[deploy.BOOTSTRAP_PATH]["permissions"] == "0755"
    assert written["/etc/confinfer/confinfer.toml"]["permissions"] == "0644"
    assert written["/etc/confinfer/caddy.env"]["permissions"] == "0644"
    assert written["/etc/confinfer/api-key"]["permissions"] == "0600"
    assert written["/etc/confinfer/api-key"]["content"] == API_KEY + "\n"
    label = deploy.dns_label("cinf", "confinfer", "confinfer")
    assert written["/etc/confinfer/caddy.env"]["content"] == (
        "# written by `confinfer deploy`; read by caddy.service (EnvironmentFile=)\n"
        f'CONFINFER_DOMAIN="{label}.eastus2.cloudapp.azure.com"\n'
        'CONFINFER_CADDY_TLS="ops@example.com"\n'
        'CONFINFER_HTTPS_PORT="443"\n'
        'CONFINFER_HTTP_PORT="80"\n'
        'CONFINFER_SERVING_PORT="8000"\n'
    )
    assert (
        written[deploy.BOOTSTRAP_PATH]["content"] == (ROOT / "cloud-init/bootstrap.sh").read_text()
    )
    config = tomllib.loads(written["/etc/confinfer/confinfer.toml"]["content"])
    assert config["onboard_hardware"] == "testbed"
    assert config["key_id"] == "https://cinf-kv-0001.vault.azure.net/keys/model-kek"
    assert doc["runcmd"] == [
        [
            deploy.BOOTSTRAP_PATH,
            "--wheelhouse",
            "https://acct.blob.core.windows.net/releases/wh.tar.gz",
            "--sha256",
            DIGEST,
        ]
    ]


def test_without_bootstrap_only_the_configuration_is_written(tmp_path: Path) -> None:
    data, doc = render(plan_file(tmp_path, {"model_source": "/srv/model"}))
    assert data.startswith("#cloud-config\n")
    assert set(doc) == {"write_files"}
    assert list(files(doc)) == FILES
    assert files(doc)["/etc/confinfer/api-key"]["permissions"] == "0600"
    assert files(doc)["/etc/confinfer/api-key"]["content"] == API_KEY + "\n"
    assert (
        tomllib.loads(files(doc)["/etc/confinfer/confinfer.toml"]["content"])["model_source"]
        == "/srv/model"
    )


def test_a_realistic_configuration_fits_azures_custom_data_limit(tmp_path: Path) -> None:
    caddy = {"acme_email": "x" * 60 + "@" + "d" * 60 + ".example.com", "domain": "a" * 63 + ".ex"}
    path = plan_file(tmp_path, REALISTIC, bootstrap(), caddy=caddy)
    data, doc = render(path)
    size = len(data.encode())
    assert size < deploy.CUSTOM_DATA_LIMIT // 4  # room to spare: a quarter of the limit
    config = tomllib.loads(files(doc)["/etc/confinfer/confinfer.toml"]["content"])
    assert config["serving_args"] == REALISTIC["serving_args"]
    plan = deploy.load_plan(path)
    parameters = deploy.parameters(plan, data)
    assert parameters["parameters"]["userData"]["value"] == data
    # The longest key caddy-run takes still leaves room.
    longest = deploy.user_data(plan, api_key="k" * 512)
    assert len(longest.encode()) < deploy.CUSTOM_DATA_LIMIT // 4


@pytest.mark.parametrize(
    "value",
    [
        "llama\n- path: /etc/shadow",
        "x\r\nruncmd: [[reboot]]",
        "a\u2028b",  # a line break to YAML 1.1
        "a\x85b",  # NEL
        "\x1b[2J",
    ],
)
def test_a_config_value_that_could_break_a_line_is_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        deploy.user_data(deploy.load_plan(plan_file(tmp_path, {"serving_model_name": value})))
    assert info.value.reason == "config-invalid"


@pytest.mark.parametrize(
    "value",
    [
        "x: |\\n  evil",
        "@CONFIG@",
        "'; reboot; '",
        '" + $(reboot) + `reboot` + "',
        "}} {{ jinja }} {% raw %}",
        "\u00e9t\u00e9 \U0001f600",  # non-ASCII goes in as TOML escapes
        "#cloud-config",
        "  - leading spaces",
    ],
)
def test_printable_hostile_config_values_stay_values(tmp_path: Path, value: str) -> None:
    appliance = {"serving_model_name": value, "serving_args": [value, "--x"]}
    _, doc = render(plan_file(tmp_path, appliance, bootstrap()))
    assert set(doc) == TOP_KEYS
    assert len(doc["write_files"]) == 4 and len(doc["runcmd"]) == 1
    config = tomllib.loads(files(doc)["/etc/confinfer/confinfer.toml"]["content"])
    assert config["serving_model_name"] == value
    assert config["serving_args"] == [value, "--x"]
    assert (
        files(doc)[deploy.BOOTSTRAP_PATH]["content"]
        == (ROOT / "cloud-init/bootstrap.sh").read_text()
    )


@pytest.mark.parametrize(
    "url",
    [
        "https://h.example/$(reboot)",
        "https://h.example/a'b';reboot;'",
        "https://acct.blob.core.windows.net/r/wh.tar.gz?sv=2024&sig=abc%2Bdef&se=x",
        "file:///srv/confinfer/wheelhouse.tar.gz",
        "/srv/confinfer/wheelhouse.tar.gz",
    ],
)
def test_odd_but_valid_wheelhouse_urls_are_one_argument(tmp_path: Path, url: str) -> None:
    _, doc = render(plan_file(tmp_path, {}, bootstrap(url)))
    assert doc["runcmd"][0][2] == url
    assert len(doc["runcmd"][0]) == 5


@pytest.mark.parametrize(
    ("table", "needle"),
    [
        ({"wheelhouse_url": "https://h/x.tgz"}, "[bootstrap] needs wheelhouse_sha256"),
        ({**bootstrap(), "extra": "x"}, "[bootstrap] unknown key 'extra'"),
        ({**bootstrap(), "wheelhouse_sha256": DIGEST.upper()}, "64 lower-case"),
        ({**bootstrap(), "wheelhouse_sha256": DIGEST[:-1]}, "64 lower-case"),
        (bootstrap("http://h.example/wh.tar.gz"), "must be an https:// URL"),
        (bootstrap("ftp://h.example/wh.tar.gz"), "must be an https:// URL"),
        (bootstrap("wheelhouse.tar.gz"), "must be an https:// URL"),
        (bootstrap("https://user@h.example/wh.tar.gz"), "must be an https:// URL"),
        (bootstrap("https:///wh.tar.gz"), "must be an https:// URL"),
        (bootstrap("/srv/../etc/shadow"), "must be an https:// URL"),
        (bootstrap("https://h.example/a b"), "a character a URL cannot"),
        (bootstrap('https://h.example/a"b'), "a character a URL cannot"),
        (bootstrap("https://h.example/a\nb"), "a character a URL cannot"),
        (bootstrap("https://h.example/`reboot`"), "a character a URL cannot"),
        (bootstrap("https://h.example/\u00e9"), "a character a URL cannot"),
    ],
)
def test_a_bad_bootstrap_table_is_refused(
    tmp_path: Path, table: dict[str, str], needle: str
) -> None:
    with pytest.raises(ConfigError) as info:
        deploy.load_plan(plan_file(tmp_path, {}, table))
    assert info.value.reason == "config-invalid"
    assert needle in info.value.message


def test_a_hostile_file_name_stays_in_its_comment(tmp_path: Path) -> None:
    path = plan_file(tmp_path, {}, bootstrap(), name="d\nruncmd: [[reboot]]\n#.toml")
    data, doc = render(path)
    assert set(doc) == TOP_KEYS
    assert doc["runcmd"][0][0] == deploy.BOOTSTRAP_PATH
    assert data.splitlines()[1].startswith('# confinfer: rendered by `confinfer deploy` from "d\\n')


@pytest.mark.parametrize(
    ("template", "values", "needle"),
    [
        ("a: @X@\n", {}, "has no value"),
        ("a: @X@\nb: @X@\n", {"X": "1"}, "appears twice"),
        ("a: 1\n", {"X": "1"}, "unused values"),
        ("a: @X@ b\n", {"X": "1"}, "must end its line"),
        ("a: @X@\n", {"X": "1\n2"}, "one printable ASCII line"),
        ("c: |\n  @CONFIG@\n", {"CONFIG": "  indented first"}, "start with text"),
        ("c: |\n  @CONFIG@\n", {"CONFIG": "x\n\u00e9"}, "printable ASCII"),
        ("c: |\n  @CONFIG@\n", {"CONFIG": "x\ty"}, "printable ASCII"),
        ("c: | @CONFIG@\n", {"CONFIG": "x"}, "stand alone"),
    ],
)
def test_the_renderer_refuses_what_could_change_the_documents_shape(
    template: str, values: dict[str, str], needle: str
) -> None:
    with pytest.raises(ValueError, match=needle):
        userdata.render(template, values)


def test_the_renderer_indents_every_block_line_and_drops_template_notes() -> None:
    out = userdata.render(
        "## a note\nc: |\n  @CONFIG@\nd: @X@\n", {"CONFIG": "a\n\nb: c", "X": '"q"'}
    )
    assert out == 'c: |\n  a\n\n  b: c\nd: "q"\n'
    assert yaml.safe_load(out) == {"c": "a\n\nb: c\n", "d": "q"}


# --- [caddy]: caddy.env and the API key ------------------------------------------------------


def caddy_env(doc: dict[str, Any]) -> dict[str, str]:
    """caddy.env as systemd's EnvironmentFile= reads it (KEY="value", # comments)."""
    out = {}
    for line in files(doc)["/etc/confinfer/caddy.env"]["content"].splitlines():
        if line.startswith("#"):
            continue
        match = re.fullmatch(r'([A-Z_]+)="([^"\\$`]*)"', line)
        assert match, line
        out[match.group(1)] = match.group(2)
    return out


def test_caddy_follows_the_caddy_table_and_the_engines_port(tmp_path: Path) -> None:
    caddy = {
        "tls": "internal",
        "domain": "API.Example.COM",
        "https_port": 8443,
        "http_port": 8080,
        "bind": "127.0.0.1",
    }
    _, doc = render(plan_file(tmp_path, {"serving_port": 9000}, caddy=caddy))
    assert caddy_env(doc) == {
        "CONFINFER_DOMAIN": "api.example.com",
        "CONFINFER_CADDY_TLS": "internal",
        "CONFINFER_HTTPS_PORT": "8443",
        "CONFINFER_HTTP_PORT": "8080",
        "CONFINFER_SERVING_PORT": "9000",
        "CONFINFER_CADDY_BIND": "127.0.0.1",
    }


def test_the_default_domain_is_the_fqdn_azure_gives_the_dns_label(tmp_path: Path) -> None:
    plan = deploy.load_plan(plan_file(tmp_path, azure={"deployment_name": "blue"}))
    label = deploy.dns_label("cinf", "confinfer", "blue")
    assert plan.caddy.domain == f"{label}.eastus2.cloudapp.azure.com"
    parameters = deploy.parameters(plan, "#cloud-config\n")["parameters"]
    assert parameters["dnsLabel"]["value"] == label != deploy.dns_label("cinf", "confinfer", "x")


AZURE_LABEL = re.compile(r"[a-z][a-z0-9-]{1,61}[a-z0-9]")  # the public IP's domainNameLabel


@given(
    st.from_regex(r"[A-Za-z][A-Za-z0-9-]{2,15}", fullmatch=True),
    st.text(min_size=1, max_size=90),
    st.text(min_size=1, max_size=64),
)
def test_every_dns_label_is_one_azure_takes(prefix: str, group: str, deployment: str) -> None:
    label = deploy.dns_label(prefix, group, deployment)
    assert AZURE_LABEL.fullmatch(label) and len(label) <= 23


@pytest.mark.parametrize(
    ("caddy", "needle"),
    [
        ({}, "[caddy] needs acme_email"),
        ({"acme_email": 'a"b@example.com'}, "expected an e-mail address"),
        ({"acme_email": "ops@example.com\nCONFINFER_X=1"}, "expected an e-mail address"),
        ({"acme_email": "ops@example.com$(reboot)"}, "expected an e-mail address"),
        ({"acme_email": "ops"}, "expected an e-mail address"),
        ({"tls": "internal", "acme_email": "ops@example.com"}, "goes with tls"),
        ({"tls": "off"}, "[caddy] tls = 'off': expected \"acme\""),
        ({**CADDY, "domain": "a.example\n- path: /etc/shadow"}, "expected a DNS name"),
        ({**CADDY, "domain": 'x" y'}, "expected a DNS name"),
        ({**CADDY, "domain": "-x.example"}, "expected a DNS name"),
        ({**CADDY, "domain": "a" * 64 + ".example"}, "expected a DNS name"),
        ({**CADDY, "domain": "*.example.com"}, "expected a DNS name"),
        ({**CADDY, "https_port": True}, "[caddy] https_port: wrong type"),
        ({**CADDY, "https_port": 0}, "must be 1 to 65535"),
        ({**CADDY, "http_port": 70000}, "must be 1 to 65535"),
        ({**CADDY, "http_port": 443}, "must differ"),
        ({**CADDY, "https_port": 8000}, "the engine's serving_port"),
        ({**CADDY, "bind": "0.0.0.0\nX=1"}, "expected an IP address"),
        ({**CADDY, "bind": "localhost"}, "expected an IP address"),
        ({**CADDY, "api_key_file": "k\n"}, "control characters"),
        ({**CADDY, "extra": 1}, "[caddy] unknown key 'extra'"),
    ],
)
def test_a_bad_caddy_table_is_refused(tmp_path: Path, caddy: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        deploy.load_plan(plan_file(tmp_path, caddy=caddy))
    assert info.value.reason == "config-invalid"
    assert needle in info.value.message
    assert "\n" not in info.value.one_line()


def key_file(tmp_path: Path, content: bytes, mode: int = 0o600) -> deploy.Plan:
    plan = deploy.load_plan(plan_file(tmp_path))
    path = plan.caddy.api_key_file
    assert path == tmp_path / "confinfer.api-key"  # <deployment_name>.api-key beside deploy.toml
    path.write_bytes(content)
    path.chmod(mode)
    return plan


def test_the_key_file_is_read_as_caddy_run_reads_it(tmp_path: Path) -> None:
    plan = key_file(tmp_path, API_KEY.encode() + b"\n")
    assert deploy.read_api_key(plan) == API_KEY
    _, doc = render(plan.path)  # an explicit key wins over the file
    assert files(doc)["/etc/confinfer/api-key"]["content"] == API_KEY + "\n"
    data = deploy.user_data(plan)
    assert files(yaml.safe_load(data))["/etc/confinfer/api-key"]["content"] == API_KEY + "\n"


@pytest.mark.parametrize(
    ("content", "mode", "needle"),
    [
        (b"short\n", 0o600, "not an API key"),
        (b"x" * 40 + b"\nsecond-line-of-the-secret\n", 0o600, "not an API key"),
        (b"x" * 40 + b'"\n', 0o600, "not an API key"),
        ("\u00e9".encode() * 40, 0o600, "not an API key"),
        (API_KEY.encode(), 0o644, "readable by others (mode 0644); chmod 600 it"),
    ],
)
def test_a_bad_key_file_is_refused_without_showing_it(
    tmp_path: Path, content: bytes, mode: int, needle: str
) -> None:
    plan = key_file(tmp_path, content, mode)
    with pytest.raises(ConfigError) as info:
        deploy.read_api_key(plan)
    assert needle in info.value.message
    for secret in (API_KEY, "second-line-of-the-secret", "x" * 40):
        assert secret not in info.value.one_line()


def test_a_new_key_file_is_private_and_never_replaces_one(tmp_path: Path) -> None:
    plan = deploy.load_plan(plan_file(tmp_path))
    assert deploy.read_api_key(plan) is None
    with pytest.raises(ConfigError, match="no such file"):
        deploy.user_data(plan)
    deploy.write_api_key(plan, API_KEY)
    assert stat.S_IMODE(os.stat(plan.caddy.api_key_file).st_mode) == 0o600
    assert deploy.read_api_key(plan) == API_KEY
    with pytest.raises(ConfigError, match="cannot create"):
        deploy.write_api_key(plan, "other" * 10)
    assert deploy.read_api_key(plan) == API_KEY


def test_the_placeholder_names_the_file_in_printable_ascii(tmp_path: Path) -> None:
    plan = deploy.load_plan(
        plan_file(tmp_path, caddy={**CADDY, "api_key_file": "\u00e9t\u00e9.key"})
    )
    placeholder = deploy.key_placeholder(plan)
    assert placeholder == f"<api key from {tmp_path}/\\xe9t\\xe9.key>"
    data = deploy.user_data(plan, api_key=placeholder)
    assert files(yaml.safe_load(data))["/etc/confinfer/api-key"]["content"] == placeholder + "\n"


@pytest.mark.parametrize("value", ['a"b', "a\\b", "a b", "a\nb", "$HOME", "`x`", "\u00e9"])
def test_the_environment_file_writer_refuses_what_it_would_have_to_escape(value: str) -> None:
    with pytest.raises(ValueError, match="plain ASCII"):
        userdata.environment_file({"CONFINFER_DOMAIN": value})
    with pytest.raises(ValueError, match="not an environment variable name"):
        userdata.environment_file({"A=B": "x"})


# --- [appliance] and model_source, named as deploy.toml names them -----------------------------


@pytest.mark.parametrize(
    ("appliance", "azure", "needle"),
    [
        ({"model_source": None}, {}, "model_source is not set"),
        ({"model_source": "relative/pkg"}, {}, "an absolute path on the VM"),
        ({"model_source": "http://acct.blob.core.windows.net/models/m"}, {}, "must be https"),
        (
            {"model_source": "https://acct.blob.core.windows.net/models/m?sv=2024&sig=SECRET"},
            {},
            "no SAS token",
        ),
        ({"model_source": "https://acct.blob.core.windows.net/models/m#x"}, {}, "no SAS token"),
        ({"model_source": "https://u:p@acct.blob.core.windows.net/models/m"}, {}, "user info"),
        ({"model_source": "https://acct.blob.core.windows.net/M_odels/m"}, {}, "container name"),
        ({"model_source": "https://acct.blob.core.windows.net/models/a/../b"}, {}, "plain path"),
        (
            {"model_source": "https://other.blob.core.windows.net/models/m"},
            {"model_storage_account": "acct"},
            "is not in acct/models",
        ),
        (
            {"model_source": "https://acct.blob.core.windows.net/weights/m"},
            {"model_storage_account": "acct"},
            "is not in acct/models",
        ),
    ],
)
def test_a_model_source_the_vm_would_refuse_is_refused_at_deploy_time(
    tmp_path: Path, appliance: dict[str, Any], azure: dict[str, Any], needle: str
) -> None:
    path = plan_file(tmp_path, appliance, azure=azure)
    with pytest.raises(ConfigError) as info:
        deploy.load_plan(path)
    assert info.value.reason == "model-source-invalid"
    assert info.value.message.startswith(f"{path}: [appliance] model_source ")
    assert needle in info.value.message and "SECRET" not in info.value.message


def test_a_model_source_in_the_deployments_account_is_taken(tmp_path: Path) -> None:
    source = "https://acct.blob.core.windows.net/models/llama3"
    path = plan_file(tmp_path, {"model_source": source}, azure={"model_storage_account": "acct"})
    assert deploy.load_plan(path).appliance["model_source"] == source


@pytest.mark.parametrize(
    ("appliance", "azure", "message"),
    [
        ({"max_bytes": "lots"}, {}, "[appliance] max_bytes = 'lots': "),
        ({"http_timeout_s": 0}, {}, "[appliance] http_timeout_s = 0: "),
        (
            {},
            {"maa_authority": "sharedeus2.eus2.attest.azure.net"},
            "[azure] maa_authority = 'sharedeus2.eus2.attest.azure.net': expected an https:// URL",
        ),
    ],
)
def test_value_errors_name_deploy_toml_and_its_key(
    tmp_path: Path, appliance: dict[str, Any], azure: dict[str, Any], message: str
) -> None:
    path = plan_file(tmp_path, appliance, azure=azure)
    with pytest.raises(ConfigError) as info:
        deploy.load_plan(path)
    assert info.value.message.startswith(f"{path}: {message}"), info.value.message


def test_ssh_on_a_scale_set_is_refused(tmp_path: Path) -> None:
    azure = {"instance_count": 2, "ssh_source_range": "203.0.113.7/32"}
    with pytest.raises(ConfigError, match="reaches no instance of a scale set"):
        deploy.load_plan(plan_file(tmp_path, azure=azure))
    one = deploy.load_plan(plan_file(tmp_path, azure={"ssh_source_range": "203.0.113.7/32"}))
    assert one.get("ssh_source_range") == "203.0.113.7/32"


def test_the_serving_image_defaults_to_vllms_digest_pin(tmp_path: Path) -> None:
    pin = tomllib.loads((deploy.SERVING_PIN).read_text())["vllm"]
    _, doc = render(plan_file(tmp_path, {}, bootstrap()))
    config = tomllib.loads(files(doc)["/etc/confinfer/confinfer.toml"]["content"])
    assert config["serving_image"] == pin["reference"]
    assert config["serving_image"].endswith("@" + pin["digest"])  # what onboarding may pull
    _, doc = render(plan_file(tmp_path, {"serving_image": "local/vllm:1"}, bootstrap()))
    config = tomllib.loads(files(doc)["/etc/confinfer/confinfer.toml"]["content"])
    assert config["serving_image"] == "local/vllm:1"  # the operator's choice wins
