"""The cloud-init user data ``confinfer deploy`` renders (confinfer/deploy.py, cloud-init/*.tmpl):
its structure key by key (``cloud-init schema`` does not flag unknown keys), its size with a
realistic configuration, and hostile values refused or quoted so that they stay values."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from confinfer import deploy
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


def toml_value(value: Any) -> str:
    """A TOML value for the test's own deploy.toml (TOML takes \\U escapes, not JSON's pairs)."""
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
) -> Path:
    key = tmp_path / "id.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI x@y\n")
    azure = {**AZURE, "ssh_public_key": str(key)}
    lines = ["[azure]"] + [f"{k} = {json.dumps(v)}" for k, v in azure.items()]
    lines += ["[appliance]"] + [f"{k} = {toml_value(v)}" for k, v in (appliance or {}).items()]
    if bootstrap is not None:
        lines += ["[bootstrap]"] + [f"{k} = {json.dumps(v)}" for k, v in bootstrap.items()]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def bootstrap(url: str = "https://acct.blob.core.windows.net/releases/wh.tar.gz") -> dict[str, str]:
    return {"wheelhouse_url": url, "wheelhouse_sha256": DIGEST}


def render(path: Path) -> tuple[str, dict[str, Any]]:
    data = deploy.user_data(deploy.load_plan(path))
    doc = yaml.safe_load(data)
    assert isinstance(doc, dict)
    return data, doc


def files(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["path"]: item for item in doc["write_files"]}


def test_the_bootstrap_user_data_has_exactly_the_expected_structure(tmp_path: Path) -> None:
    data, doc = render(plan_file(tmp_path, {"onboard_hardware": "testbed"}, bootstrap()))
    assert data.startswith("#cloud-config\n")
    assert "##" not in data and "@" not in data.replace("@ccc", "")
    assert set(doc) == TOP_KEYS  # and nothing that disables Azure's networking
    assert doc["package_update"] is True
    assert {"docker.io", "caddy", "python3-venv", "curl", "ca-certificates"} <= set(doc["packages"])
    written = files(doc)
    assert list(written) == ["/etc/confinfer/confinfer.toml", deploy.BOOTSTRAP_PATH]
    for item in written.values():
        assert set(item) <= WRITE_FILE_KEYS
        assert item["owner"] == "root:root"
    assert written[deploy.BOOTSTRAP_PATH]["permissions"] == "0755"
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
    assert list(files(doc)) == ["/etc/confinfer/confinfer.toml"]
    assert (
        tomllib.loads(files(doc)["/etc/confinfer/confinfer.toml"]["content"])["model_source"]
        == "/srv/model"
    )


def test_a_realistic_configuration_fits_azures_custom_data_limit(tmp_path: Path) -> None:
    path = plan_file(tmp_path, REALISTIC, bootstrap())
    data, doc = render(path)
    size = len(data.encode())
    assert size < deploy.CUSTOM_DATA_LIMIT // 4  # room to spare: a quarter of the limit
    config = tomllib.loads(files(doc)["/etc/confinfer/confinfer.toml"]["content"])
    assert config["serving_args"] == REALISTIC["serving_args"]
    plan = deploy.load_plan(path)
    parameters = deploy.parameters(plan, data)
    assert parameters["parameters"]["userData"]["value"] == data


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
    assert len(doc["write_files"]) == 2 and len(doc["runcmd"]) == 1
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
        deploy.render(template, values)


def test_the_renderer_indents_every_block_line_and_drops_template_notes() -> None:
    out = deploy.render(
        "## a note\nc: |\n  @CONFIG@\nd: @X@\n", {"CONFIG": "a\n\nb: c", "X": '"q"'}
    )
    assert out == 'c: |\n  a\n\n  b: c\nd: "q"\n'
    assert yaml.safe_load(out) == {"c": "a\n\nb: c\n", "d": "q"}
