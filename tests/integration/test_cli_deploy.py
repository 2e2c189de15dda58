"""``confinfer deploy`` against the testbed's strict stand-in ``az`` (testbed/az.py) on PATH:
the calls it makes, in order and spelled as az takes them, the parameters and user data it
hands over, and the usual failures named before any deployment starts."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CONFINFER = ROOT / ".venv" / "bin" / "confinfer"
SIZE = "Standard_NCC40ads_H100_v5"
FAMILY = "standardNCCadsH100v5Family"
OUTPUTS = {
    "fqdn": "cinf-abc123.eastus2.cloudapp.azure.com",
    "keyId": "https://cinf-kv-0001.vault.azure.net/keys/model-kek/0123",
    "principalId": "11111111-2222-3333-4444-555555555555",
}


def scenario(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "logged_in": True,
        "subscription": {"id": "00000000-0000-0000-0000-000000000001", "name": "test"},
        "providers": {"Microsoft.KeyVault": "Registered"},
        "skus": {"eastus2": [{"name": SIZE, "family": FAMILY, "vcpus": 40}]},
        "usage": {"eastus2": {FAMILY: [0, 40]}},
        "keys": {},
        "outputs": OUTPUTS,
    }
    return base | changes


class Bed:
    def __init__(self, tmp: Path, state: dict[str, Any], azure: dict[str, Any]) -> None:
        self.dir = tmp
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        self.scenario = tmp / "az-scenario.json"
        self.scenario.write_text(json.dumps(state))
        az = bin_dir / "az"
        az.write_text(
            f"#!{sys.executable} -I\n"
            f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
            "from testbed.az import main\n"
            f"sys.exit(main(sys.argv, scenario={str(self.scenario)!r}))\n"
        )
        az.chmod(az.stat().st_mode | stat.S_IXUSR)
        key = tmp / "id.pub"
        key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ8 operator@laptop\n")
        settings = {
            "resource_group": "confinfer",
            "location": "eastus2",
            "name_prefix": "cinf",
            "vault_name": "cinf-kv-0001",
            "ssh_public_key": str(key),
        } | azure
        lines = ["[azure]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
        lines += ["[appliance]", 'model_source = "https://acct.blob.core.windows.net/models/m"']
        lines += ["[caddy]", 'acme_email = "ops@example.com"']
        self.config = tmp / "deploy.toml"
        self.api_key = tmp / "confinfer.api-key"
        self.parameters = tmp / "confinfer.parameters.json"
        self.config.write_text("\n".join(lines) + "\n")
        self.env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    def deploy(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(CONFINFER), "deploy", *args, "--config", str(self.config)],
            capture_output=True, text=True, timeout=120, env=self.env, input=input, check=False,
        )  # fmt: skip
        if self.api_key.exists():  # the API key is never printed
            key = self.api_key.read_text().strip()
            assert key not in done.stdout and key not in done.stderr, "the API key was printed"
        return done

    def add(self, text: str, table: str = "[appliance]") -> None:
        """Lines added to one table of deploy.toml."""
        self.config.write_text(self.config.read_text().replace(table, f"{table}\n{text}", 1))

    def calls(self) -> list[list[str]]:
        log = self.scenario.with_suffix(".log")
        if not log.exists():
            return []
        return [json.loads(line)["argv"] for line in log.read_text().splitlines()]

    def state(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.scenario.read_text())
        return loaded


def make(tmp_path: Path, azure: dict[str, Any] | None = None, **state: Any) -> Bed:
    return Bed(tmp_path, scenario(**state), azure or {})


def user_data_files(data: str) -> dict[str, Any]:
    doc = yaml.safe_load(data)
    return {item["path"]: item for item in doc["write_files"]}


def test_a_deployment_checks_first_then_creates_and_prints_the_outputs(tmp_path: Path) -> None:
    bed = make(tmp_path)
    done = bed.deploy()
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == OUTPUTS
    heads = [" ".join(call[:3]) for call in bed.calls()]
    assert heads == [
        "account show -o",
        "provider show --namespace",
        "group exists --name",
        "vm list-skus --location",
        "vm list-usage --location",
        "keyvault key show",
        "group create --name",
        "deployment group create",
        "deployment group show",
    ]
    create = bed.calls()[7]
    assert create[create.index("--template-file") + 1] == str(ROOT / "bicep-wrapper/main.bicep")
    values = bed.state()["deployments"]["confinfer/confinfer"]["parameters"]
    assert values["vmSize"] == SIZE and values["instanceCount"] == 1
    assert values["sshPublicKey"].startswith("ssh-ed25519 ")
    assert values["sshSourceRange"] == ""  # SSH stays closed
    label = values["dnsLabel"]
    assert re.fullmatch(r"cinf-[0-9a-f]{6}", label)
    data = values["userData"]
    assert data.startswith("#cloud-config\n") and len(data.encode()) <= 65535
    files = user_data_files(data)
    toml = tomllib.loads(files["/etc/confinfer/confinfer.toml"]["content"])
    assert toml["key_id"] == "https://cinf-kv-0001.vault.azure.net/keys/model-kek"
    assert toml["model_source"] == "https://acct.blob.core.windows.net/models/m"
    env = files["/etc/confinfer/caddy.env"]["content"].splitlines()
    assert f'CONFINFER_DOMAIN="{label}.eastus2.cloudapp.azure.com"' in env
    assert 'CONFINFER_CADDY_TLS="ops@example.com"' in env
    # The API key: made on the first create, 0600, its path said, the key itself never.
    key = bed.api_key.read_text().strip()
    assert stat.S_IMODE(bed.api_key.stat().st_mode) == 0o600 and len(key) >= 32
    assert files["/etc/confinfer/api-key"] == {
        "path": "/etc/confinfer/api-key",
        "owner": "root:root",
        "permissions": "0600",
        "content": key + "\n",
    }
    assert f"wrote a new API key to {bed.api_key}" in done.stderr
    assert "deploying confinfer to confinfer (az deployment group create" in done.stderr
    # The parameters file is kept next to deploy.toml, private, and names itself in the call.
    assert create[create.index("--parameters") + 1] == f"@{bed.parameters}"
    assert stat.S_IMODE(bed.parameters.stat().st_mode) == 0o600
    assert json.loads(bed.parameters.read_text())["parameters"]["userData"]["value"] == data


def test_a_second_create_keeps_the_key_and_counts_its_own_vm(tmp_path: Path) -> None:
    bed = make(tmp_path)
    assert bed.deploy().returncode == 0
    key = bed.api_key.read_text()
    assert bed.state()["usage"]["eastus2"][FAMILY] == [40, 40]  # the VM is running now
    again = bed.deploy()
    assert again.returncode == 0, again.stderr
    assert bed.api_key.read_text() == key and "API key" not in again.stderr
    assert ["vm", "list", "--resource-group", "confinfer", "-o", "json"] in bed.calls()
    assert [
        "group",
        "create",
        "--name",
        "confinfer",
        "--location",
        "eastus2",
        "-o",
        "json",
    ] not in (bed.calls()[9:])  # the group exists: not created again
    data = bed.state()["deployments"]["confinfer/confinfer"]["parameters"]["userData"]
    assert user_data_files(data)["/etc/confinfer/api-key"]["content"] == key


@pytest.mark.parametrize(("current", "limit", "ok"), [(80, 120, True), (80, 100, False)])
def test_growing_a_scale_set_asks_only_for_the_added_vcpus(
    tmp_path: Path, current: int, limit: int, ok: bool
) -> None:
    bed = make(
        tmp_path,
        {"instance_count": 3},
        usage={"eastus2": {FAMILY: [current, limit]}},
        groups={"confinfer": "eastus2"},
        scale_sets={"confinfer": [{"name": "cinf-vmss", "size": SIZE, "capacity": 2}]},
    )
    done = bed.deploy()
    assert ["vmss", "list", "--resource-group", "confinfer", "-o", "json"] in bed.calls()
    if ok:
        assert done.returncode == 0, done.stderr
        assert bed.state()["scale_sets"]["confinfer"][0]["capacity"] == 3
    else:
        assert done.returncode == 77
        assert done.stderr.startswith(
            "confinfer: deploy-no-quota: no quota for 40 vCPUs of "
            f"{FAMILY} in eastus2 (20 free; this deployment has 2 of its 3 already)"
        ), done.stderr


def test_a_dry_run_prints_every_command_and_runs_and_writes_nothing(tmp_path: Path) -> None:
    bed = make(tmp_path)
    done = bed.deploy("--dry-run")
    assert done.returncode == 0, done.stderr
    assert bed.calls() == []
    assert not bed.api_key.exists() and not bed.parameters.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "az-scenario.json", "bin", "deploy.toml", "id.pub",
    ]  # fmt: skip
    printed = done.stdout.splitlines()
    assert printed[0] == "az account show -o json"
    assert "az group exists --name confinfer -o json" in printed
    assert any(
        line.startswith("az group create --name confinfer --location eastus2") for line in printed
    )
    create = next(line for line in printed if line.startswith("az deployment group create"))
    assert create.startswith("az deployment group create --resource-group confinfer")
    assert f"--parameters @{bed.parameters} -o json" in create
    # The parameters it would write, as comments, with the key's place shown.
    shown = "\n".join(line.removeprefix("#   ") for line in printed if line.startswith("#   "))
    data = json.loads(shown)["parameters"]["userData"]["value"]
    assert user_data_files(data)["/etc/confinfer/api-key"]["content"] == (
        f"<api key from {bed.api_key}>\n"
    )


def test_a_dry_run_never_shows_an_existing_key(tmp_path: Path) -> None:
    bed = make(tmp_path)
    bed.api_key.write_text("k" * 43 + "\n")
    bed.api_key.chmod(0o600)
    done = bed.deploy("--dry-run")
    assert done.returncode == 0, done.stderr
    assert "k" * 43 not in done.stdout and f"<api key from {bed.api_key}>" in done.stdout


def test_what_if_before_the_group_exists_says_so_and_shows_the_parameters(
    tmp_path: Path,
) -> None:
    bed = make(tmp_path)
    done = bed.deploy("what-if")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(
        "the resource group confinfer does not exist yet: az deployment group what-if needs it"
    )
    assert '  namePrefix: "cinf"' in lines
    assert any(re.fullmatch(r"  userData: <secure, \d+ bytes>", line) for line in lines)
    assert not any(
        call[:2] in (["deployment", "group"], ["group", "create"]) for call in bed.calls()
    )
    assert not bed.api_key.exists() and not bed.parameters.exists()  # what-if writes no key


@pytest.mark.parametrize(
    ("state", "azure", "reason", "code"),
    [
        ({"logged_in": False}, {}, "deploy-not-logged-in", 77),
        (
            {"providers": {"Microsoft.KeyVault": "NotRegistered"}},
            {},
            "deploy-provider-unregistered",
            77,
        ),
        ({"skus": {"eastus2": []}}, {}, "deploy-size-unavailable", 77),
        (
            {
                "skus": {
                    "eastus2": [{"name": SIZE, "family": FAMILY, "vcpus": 40, "restricted": True}]
                }
            },
            {},
            "deploy-size-unavailable",
            77,
        ),
        ({"usage": {"eastus2": {FAMILY: [20, 40]}}}, {}, "deploy-no-quota", 77),
        ({"usage": {"eastus2": {FAMILY: [0, 40]}}}, {"instance_count": 2}, "deploy-no-quota", 77),
        ({"usage": {"eastus2": {}}}, {}, "deploy-no-quota", 77),
        (
            {"keys": {"cinf-kv-0001/model-kek": {"release_policy": False}}},
            {},
            "deploy-key-without-policy",
            77,
        ),
    ],
)
def test_the_usual_failures_are_named_before_any_deployment(
    tmp_path: Path, state: dict[str, Any], azure: dict[str, Any], reason: str, code: int
) -> None:
    bed = make(tmp_path, azure, **state)
    done = bed.deploy()
    assert done.returncode == code, done.stderr
    assert done.stderr.startswith(f"confinfer: {reason}: "), done.stderr
    assert not any(call[:2] == ["deployment", "group"] for call in bed.calls())
    assert not any(call[:2] == ["group", "create"] for call in bed.calls())


def test_a_key_with_its_release_policy_is_redeployed(tmp_path: Path) -> None:
    bed = make(tmp_path, keys={"cinf-kv-0001/model-kek": {"release_policy": True}})
    assert bed.deploy().returncode == 0


def test_what_if_outputs_and_destroy(tmp_path: Path) -> None:
    bed = make(tmp_path)
    assert bed.deploy().returncode == 0
    what_if = bed.deploy("what-if")
    assert what_if.returncode == 0, what_if.stderr
    assert bed.calls()[-1][:3] == ["deployment", "group", "what-if"]
    outputs = bed.deploy("outputs")
    assert json.loads(outputs.stdout) == OUTPUTS
    refused = bed.deploy("destroy", input="")
    assert refused.returncode == 64 and "--yes" in refused.stderr
    assert "confinfer" in bed.state()["groups"]
    done = bed.deploy("destroy", "--yes")
    assert done.returncode == 0, done.stderr
    assert bed.calls()[-1] == ["group", "delete", "--name", "confinfer", "--yes"]
    assert "confinfer" not in bed.state()["groups"]
    assert "deleted resource group confinfer; the Key Vault cinf-kv-0001" in done.stderr
    assert "soft-deleted for 90 days" in done.stderr


def test_a_declined_destroy_exits_1_and_deletes_nothing(tmp_path: Path) -> None:
    bed = make(tmp_path, groups={"confinfer": "eastus2"})
    script = (
        "import sys\n"
        "from confinfer import deploy\n"
        "plan = deploy.load_plan(__import__('pathlib').Path(sys.argv[1]))\n"
        "print(deploy.destroy(plan, deploy.Az(), yes=False, ask=lambda q: print(q) or 'n'))\n"
    )
    done = subprocess.run(
        [str(ROOT / ".venv/bin/python"), "-c", script, str(bed.config)],
        capture_output=True, text=True, timeout=60, env=bed.env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "stays soft-deleted, its name taken, for 90 days)? [y/N]" in done.stdout
    assert done.stdout.splitlines()[-1] == "False"
    assert bed.calls() == [] and "confinfer" in bed.state()["groups"]
    cli = bed.deploy("destroy", input="n\n")  # no terminal: refused before asking
    assert cli.returncode == 64


def test_az_errors_are_one_line(tmp_path: Path) -> None:
    bed = make(tmp_path)
    done = bed.deploy("outputs")  # no such deployment yet
    assert done.returncode == 69
    assert done.stderr.startswith("confinfer: deploy-az-failed: `az deployment group show` failed")
    assert "could not be found" in done.stderr


@pytest.mark.parametrize(
    ("appliance", "reason", "message"),
    [
        ('no_such_key = "x"', "config-invalid", "[appliance] 'no_such_key' is not a confinfer"),
        (
            'maa_url = "https://other.attest.azure.net"',
            "config-invalid",
            "[appliance] maa_url comes",
        ),
        ('key_id = "https://other.vault.azure.net/keys/k"', "config-invalid", "[appliance] key_id"),
        (
            'max_bytes = "lots"',
            "config-invalid",
            "[appliance] max_bytes = 'lots': ",
        ),
        (
            "serving_args = [" + ", ".join(['"' + "x" * 1200 + '"'] * 60) + "]",
            "deploy-user-data-too-large",
            "the rendered user data is ",
        ),
    ],
)
def test_bad_appliance_settings_are_refused_before_any_az_call(
    tmp_path: Path, appliance: str, reason: str, message: str
) -> None:
    bed = make(tmp_path)
    bed.add(appliance)
    done = bed.deploy()
    assert done.stderr.startswith(f"confinfer: {reason}: "), done.stderr
    assert message in done.stderr, done.stderr
    assert "/tmp/tmp" not in done.stderr and "confinfer.toml" not in done.stderr
    assert bed.calls() == []
    assert not bed.api_key.exists()


@pytest.mark.parametrize(
    ("table", "line", "reason", "message"),
    [
        ("[azure]", 'maa_authority = "sharedeus2.eus2.attest.azure.net"', "config-invalid",
         "deploy.toml: [azure] maa_authority = 'sharedeus2.eus2.attest.azure.net': expected an "
         "https:// URL"),
        ("[azure]", 'ssh_source_range = "203.0.113.7/32"\ninstance_count = 2', "config-invalid",
         "[azure] ssh_source_range reaches no instance of a scale set"),
        ("[azure]", 'model_storage_account = "cinfmodels"', "model-source-invalid",
         "[appliance] model_source = 'https://acct.blob.core.windows.net/models/m' is not in "
         "cinfmodels/models"),
        ("[azure]", 'name_prefix = "9-lives"', "config-invalid", "[azure] name_prefix = '9-lives'"),
        ("[azure]", 'location = "East US 2"', "config-invalid", "[azure] location = 'East US 2'"),
    ],
)  # fmt: skip
def test_bad_azure_settings_are_refused_before_any_az_call(
    tmp_path: Path, table: str, line: str, reason: str, message: str
) -> None:
    bed = make(tmp_path)
    text = bed.config.read_text()
    key = line.split(" = ")[0]
    text = re.sub(rf"^{key} = .*\n", "", text, flags=re.MULTILINE)  # a key given twice: replaced
    bed.config.write_text(text.replace(table, f"{table}\n{line}", 1))
    done = bed.deploy()
    assert done.stderr.startswith(f"confinfer: {reason}: {bed.config}: "), done.stderr
    assert message in done.stderr, done.stderr
    assert bed.calls() == []


def test_a_missing_ssh_key_is_refused_before_any_az_call(tmp_path: Path) -> None:
    bed = make(tmp_path, {"ssh_public_key": str(tmp_path / "nope.pub")})
    done = bed.deploy()
    assert done.returncode == 78
    assert f"[azure] ssh_public_key {tmp_path / 'nope.pub'}: cannot read" in done.stderr
    assert bed.calls() == []
