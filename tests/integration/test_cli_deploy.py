"""``confinfer deploy`` against the testbed's strict stand-in ``az`` (testbed/az.py) on PATH:
the calls it makes, in order and spelled as az takes them, the parameters and user data it
hands over, and the usual failures named before any deployment starts."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

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
        self.config = tmp / "deploy.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    def deploy(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(CONFINFER), "deploy", *args, "--config", str(self.config)],
            capture_output=True, text=True, timeout=120, env=self.env, input=input, check=False,
        )  # fmt: skip

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


def test_a_deployment_checks_first_then_creates_and_prints_the_outputs(tmp_path: Path) -> None:
    bed = make(tmp_path)
    done = bed.deploy()
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == OUTPUTS
    heads = [" ".join(call[:3]) for call in bed.calls()]
    assert heads == [
        "account show -o",
        "provider show --namespace",
        "vm list-skus --location",
        "vm list-usage --location",
        "keyvault key show",
        "group create --name",
        "deployment group create",
        "deployment group show",
    ]
    create = bed.calls()[6]
    assert create[create.index("--template-file") + 1] == str(ROOT / "bicep-wrapper/main.bicep")
    values = bed.state()["deployments"]["confinfer/confinfer"]["parameters"]
    assert values["vmSize"] == SIZE and values["instanceCount"] == 1
    assert values["sshPublicKey"].startswith("ssh-ed25519 ")
    assert values["sshSourceRange"] == ""  # SSH stays closed
    data = values["userData"]
    assert data.startswith("#cloud-config\n") and len(data.encode()) <= 65535
    body = data.split("content: |\n", 1)[1]
    toml = tomllib.loads("".join(line[6:] + "\n" for line in body.splitlines()))
    assert toml["key_id"] == "https://cinf-kv-0001.vault.azure.net/keys/model-kek"
    assert toml["model_source"] == "https://acct.blob.core.windows.net/models/m"
    # The parameters file (it carries the user data) was private and is gone.
    params = create[create.index("--parameters") + 1].removeprefix("@")
    assert not Path(params).exists()


def test_a_dry_run_prints_every_command_and_runs_none(tmp_path: Path) -> None:
    bed = make(tmp_path)
    done = bed.deploy("--dry-run")
    assert done.returncode == 0, done.stderr
    assert bed.calls() == []
    printed = done.stdout.splitlines()
    assert printed[0] == "az account show -o json"
    assert any(
        line.startswith("az deployment group create --resource-group confinfer") for line in printed
    )
    assert any(
        line.startswith("az group create --name confinfer --location eastus2") for line in printed
    )


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


def test_az_errors_are_one_line(tmp_path: Path) -> None:
    bed = make(tmp_path)
    done = bed.deploy("outputs")  # no such deployment yet
    assert done.returncode == 69
    assert done.stderr.startswith("confinfer: deploy-az-failed: `az deployment group show` failed")
    assert "could not be found" in done.stderr


@pytest.mark.parametrize(
    ("appliance", "reason"),
    [
        ('no_such_key = "x"', "config-invalid"),
        ('maa_url = "https://other.attest.azure.net"', "config-invalid"),
        ('key_id = "https://other.vault.azure.net/keys/k"', "config-invalid"),
        (
            "serving_args = [" + ", ".join(['"' + "x" * 1200 + '"'] * 60) + "]",
            "deploy-user-data-too-large",
        ),
    ],
)
def test_bad_appliance_settings(tmp_path: Path, appliance: str, reason: str) -> None:
    bed = make(tmp_path)
    bed.config.write_text(bed.config.read_text() + appliance + "\n")
    done = bed.deploy()
    assert done.stderr.startswith(f"confinfer: {reason}: "), done.stderr
    assert not any(call[:2] == ["deployment", "group"] for call in bed.calls())
