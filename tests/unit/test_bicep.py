"""The Bicep templates parse, and say what the trust model needs: a Premium vault with purge
protection, an exportable RSA-HSM KEK whose release policy (in confinfer.policy's grammar)
admits only an attested confidential VM, confidential VMs with vTPM and secure boot, an NSG
that denies the engine's port, and a release role scoped to the key, not the vault.

The Bicep compiler cannot run here, so the files are read with pycep-parser: a value that is a
parameter or variable reads as its name, a literal as itself."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from pycep import BicepParser

from confinfer import policy

ROOT = Path(__file__).resolve().parents[2] / "bicep-wrapper"
FILES = sorted(ROOT.rglob("*.bicep"))
KEY_RELEASE_ROLE = "08bbd89e-9f13-488c-ac41-acfcb10c90ab"  # Key Vault Crypto Service Release User
BLOB_READER_ROLE = "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1"  # Storage Blob Data Reader


@cache
def parsed(name: str) -> dict[str, Any]:
    tree: dict[str, Any] = dict(BicepParser().parse(file_path=ROOT / name))
    return tree


def resource(name: str, symbol: str) -> dict[str, Any]:
    found: dict[str, Any] = parsed(name)["resources"][symbol]
    return found


def config(name: str, symbol: str) -> dict[str, Any]:
    value: dict[str, Any] = resource(name, symbol)["config"]
    return value


def default(name: str, parameter: str) -> Any:
    return parsed(name)["parameters"][parameter]["default"]


def test_every_template_parses() -> None:
    assert {p.relative_to(ROOT).as_posix() for p in FILES} == {
        "main.bicep",
        "modules/cvm.bicep",
        "modules/cvmss.bicep",
        "modules/keyvault.bicep",
        "modules/network.bicep",
        "modules/roles.bicep",
    }
    for path in FILES:
        assert parsed(path.relative_to(ROOT).as_posix())


def test_the_vault_is_premium_with_rbac_soft_delete_and_purge_protection() -> None:
    vault = config("modules/keyvault.bicep", "vault")["properties"]
    assert vault["sku"]["name"] == "premium"
    assert vault["enableRbacAuthorization"] is True
    assert vault["enableSoftDelete"] is True
    assert vault["enablePurgeProtection"] is True
    acls = vault["networkAcls"]
    assert acls["defaultAction"] == "Deny"
    assert acls["virtualNetworkRules"] == [{"id": "subnetId"}]


def test_the_kek_is_an_exportable_hsm_key_under_the_release_policy() -> None:
    kek = resource("modules/keyvault.bicep", "kek")
    assert kek["type"] == "Microsoft.KeyVault/vaults/keys"
    props = kek["config"]["properties"]
    assert props["kty"] == "RSA-HSM"
    assert props["attributes"]["exportable"] is True
    assert set(props["keyOps"]) >= {"wrapKey", "unwrapKey"}
    release = props["release_policy"]
    assert release["contentType"] == "application/json; charset=utf-8"
    # data = base64url(string(releasePolicy))
    text = json.dumps(release["data"])
    assert '"type": "base64"' in text and '"value_to_convert": "releasePolicy"' in text
    for old, new in (("+", "-"), ("/", "_"), ("=", "")):
        assert f'"old_string": "{old}", "new_string": "{new}"' in text
    rules = parsed("modules/keyvault.bicep")["variables"]["releasePolicy"]["value"]
    assert rules == {
        "version": "1.0.0",
        "anyOf": [{"authority": "maaAuthority", "allOf": "releaseClaims"}],
    }


def test_the_default_release_policy_is_confinfers_grammar_and_demands_a_cvm() -> None:
    authority = default("main.bicep", "maaAuthority")
    claims = default("main.bicep", "releaseClaims")
    assert authority.startswith("https://")
    document = {"version": "1.0.0", "anyOf": [{"authority": authority, "allOf": claims}]}
    parsed_policy = policy.parse(document)
    tee = {
        "x-ms-isolation-tee": {
            "x-ms-attestation-type": "sevsnpvm",
            "x-ms-compliance-status": "azure-compliant-cvm",
        }
    }
    policy.evaluate(parsed_policy, tee, authority)
    not_a_cvm = {
        "x-ms-isolation-tee": {**tee["x-ms-isolation-tee"], "x-ms-attestation-type": "vbs"}
    }
    with pytest.raises(Exception, match="x-ms-attestation-type"):
        policy.evaluate(parsed_policy, not_a_cvm, authority)


@pytest.mark.parametrize(
    ("name", "symbol", "profile"),
    [
        ("modules/cvm.bicep", "vm", ("properties",)),
        ("modules/cvmss.bicep", "vmss", ("properties", "virtualMachineProfile")),
    ],
)
def test_the_vms_are_confidential_with_vtpm_and_secure_boot(
    name: str, symbol: str, profile: tuple[str, ...]
) -> None:
    vm = config(name, symbol)
    assert vm["identity"]["type"] == "SystemAssigned"
    node = vm
    for key in profile:
        node = node[key]
    security = node["securityProfile"]
    assert security["securityType"] == "ConfidentialVM"
    assert security["uefiSettings"] == {"secureBootEnabled": True, "vTpmEnabled": True}
    disk = node["storageProfile"]["osDisk"]["managedDisk"]["securityProfile"]
    assert disk["securityEncryptionType"] == "DiskWithVMGuestState"
    os_profile = node["osProfile"]
    assert os_profile["customData"] == {
        "function": {"type": "base64", "parameters": {"input_string": "userData"}}
    }
    assert os_profile["linuxConfiguration"]["disablePasswordAuthentication"] is True
    assert os_profile["allowExtensionOperations"] is False


def test_the_defaults_are_the_h100_cvm_and_ubuntus_cvm_image() -> None:
    assert default("main.bicep", "vmSize") == "Standard_NCC40ads_H100_v5"
    image = default("main.bicep", "image")
    assert image["publisher"] == "Canonical"
    assert "confidential-vm" in image["offer"] and image["sku"].endswith("-cvm")
    assert default("main.bicep", "sshSourceRange") == ""


def test_the_nsg_admits_https_and_acme_and_denies_the_engine_port() -> None:
    rules = config("modules/network.bicep", "nsg")["properties"]["securityRules"]
    fixed = rules["function"]["parameters"]["arg_1"]  # concat(fixed rules, optional SSH)
    by_port = {r["properties"]["destinationPortRange"]: r["properties"] for r in fixed}
    assert by_port["443"]["access"] == "Allow"
    assert by_port["80"]["access"] == "Allow"
    assert by_port["8000"]["access"] == "Deny"
    assert by_port["8000"]["direction"] == "Inbound"
    assert "22" not in by_port  # SSH only through the conditional rule below
    ssh = rules["function"]["parameters"]["arg_2"]["operator"]["operands"]
    assert ssh["true_value"] == []  # empty(sshSourceRange) -> no SSH rule
    assert ssh["false_value"] == "sshRule"
    ssh_rule = parsed("modules/network.bicep")["variables"]["sshRule"]["value"][0]["properties"]
    assert ssh_rule["destinationPortRange"] == "22"
    assert ssh_rule["sourceAddressPrefix"] == "sshSourceRange"  # never "*" or Internet


def test_the_scale_sets_probe_asks_for_readiness_not_a_listening_port() -> None:
    lb = config("modules/cvmss.bicep", "lb")["properties"]
    (probe,) = lb["probes"]
    assert probe["properties"]["protocol"] == "Http"  # a TCP probe cannot see Caddy's 503
    assert (probe["properties"]["port"], probe["properties"]["requestPath"]) == (80, "/readyz")
    rule = lb["loadBalancingRules"]["config"]["properties"]
    assert rule["probe"]["id"]["function"]["parameters"]["resource_name_2"] == probe["name"]


def test_the_release_role_is_scoped_to_the_key_and_the_reader_to_the_container() -> None:
    release = config("modules/roles.bicep", "release")
    assert release["scope"] == "kek"
    assert KEY_RELEASE_ROLE in json.dumps(parsed("modules/roles.bicep")["variables"])
    assert resource("modules/roles.bicep", "kek")["type"] == "Microsoft.KeyVault/vaults/keys"
    read = config("modules/roles.bicep", "read")  # conditional: only with a model account
    assert read["config"]["scope"] == "container"
    container = resource("modules/roles.bicep", "container")
    assert container["type"] == "Microsoft.Storage/storageAccounts/blobServices/containers"
    assert BLOB_READER_ROLE in json.dumps(parsed("modules/roles.bicep")["variables"])


def test_main_outputs_the_fqdn_the_key_id_and_the_identity() -> None:
    assert {"fqdn", "keyId", "principalId"} <= set(parsed("main.bicep")["outputs"])
    assert set(parsed("main.bicep")["modules"]) == {
        "keyvault",
        "network",
        "single",
        "scaleSet",
        "roles",
    }


def decorators(name: str, parameter: str) -> dict[str, Any]:
    found = parsed(name)["parameters"][parameter].get("decorators", [])
    return {d["type"]: d.get("argument") for d in found}


def test_the_parameters_deploy_passes_are_declared_and_the_dns_label_fits(tmp_path: Path) -> None:
    """`confinfer deploy` names only main.bicep's parameters, the user data and the SSH key go
    to @secure() ones, and the DNS label it computes fits dnsLabel's bounds."""
    from confinfer import deploy

    key = tmp_path / "id.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI x@y\n")
    path = tmp_path / "deploy.toml"
    path.write_text(
        '[azure]\nresource_group = "confinfer"\nlocation = "eastus2"\n'
        'name_prefix = "a-sixteen-chars1"\nvault_name = "cinf-kv-0001"\n'
        f'ssh_public_key = "{key}"\nmaa_authority = "https://sharedeus2.eus2.attest.azure.net"\n'
        '[appliance]\nmodel_source = "/srv/model"\n[caddy]\ntls = "internal"\n'
    )
    plan = deploy.load_plan(path)
    document = deploy.parameters(plan, "#cloud-config\n")
    declared = parsed("main.bicep")["parameters"]
    assert set(document["parameters"]) <= set(declared)
    for name in deploy.SECURE_PARAMETERS:
        assert "secure" in decorators("main.bicep", name)
    label = document["parameters"]["dnsLabel"]["value"]
    bounds = decorators("main.bicep", "dnsLabel")
    assert bounds["min_length"] <= len(label) <= bounds["max_length"] == 63
    assert plan.caddy.domain == f"{label}.eastus2.cloudapp.azure.com"
