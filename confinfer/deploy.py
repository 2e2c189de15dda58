"""``confinfer deploy``: the Bicep templates of bicep-wrapper/ deployed through the ``az`` CLI.

The operator's machine compiles the Bicep (``az`` carries the compiler); this module reads
``deploy.toml`` and checks all of it before the first ``az`` call (the VM's configuration as the
VM would read it, the SSH key, Caddy's settings, the API key file), then what usually goes wrong
on Azure (not logged in, the Key Vault provider not registered, a region without the VM size, no
quota for its family once this deployment's own VMs are counted, a key of that name that exists
without a release policy), renders the VM's user data, writes the ARM parameters file next to
``deploy.toml`` and runs ``az deployment group create`` (or ``what-if``), reads the outputs, or
deletes the resource group. ``--dry-run`` prints every command it would run, exactly, and the
parameters document with the API key left out, and runs and writes nothing.

``deploy.toml``::

    [azure]
    resource_group = "confinfer"        # created if missing
    location = "eastus2"
    name_prefix = "cinf"
    vault_name = "cinf-kv-0001"         # globally unique
    ssh_public_key = "~/.ssh/id_ed25519.pub"
    # key_name, vm_size, instance_count, ssh_source_range, maa_authority,
    # vault_allowed_ip_ranges, model_storage_account, model_container, deployment_name

    [appliance]                         # /etc/confinfer/confinfer.toml on the VM (§1.2 keys)
    model_source = "https://<account>.blob.core.windows.net/models/<model>"

    [caddy]                             # /etc/confinfer/caddy.env and /etc/confinfer/api-key
    acme_email = "ops@example.com"      # or tls = "internal"
    # domain, https_port, http_port, bind, api_key_file

    [bootstrap]                         # a stock image: install the appliance, then onboard
    wheelhouse_url = "https://<account>.blob.core.windows.net/releases/wheelhouse.tar.gz"
    wheelhouse_sha256 = "<64 hex digits: cloud-init/build-wheelhouse prints it>"

With ``[bootstrap]`` the user data (cloud-init/user-data.yaml.tmpl) installs the packages, the
appliance from the wheelhouse (refused unless its SHA-256 is the pinned one) and its units, and
starts onboarding; without it (cloud-init/user-data-configured.yaml.tmpl) the image is taken to
hold the appliance already and only the files are written. confinfer/userdata.py renders them.

The API key lives in ``api_key_file`` (default ``<deployment_name>.api-key`` next to
``deploy.toml``); ``create`` makes one when there is none. It is never printed: a dry run and a
``what-if`` without the file show ``<api key from PATH>`` in its place.

Everything ``az`` prints is hostile until parsed: JSON read strictly, text escaped.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confinfer import userdata
from confinfer.configvalues import Invalid, parse_key_id
from confinfer.deployplan import (
    DEFAULT_SIZE,
    Plan,
    dns_label,
    key_placeholder,
    load_plan,
    plan_error,
    read_api_key,
    write_api_key,
)
from confinfer.errors import ConfinferError, Reason, ServiceError, printable
from confinfer.userdata import BOOTSTRAP_PATH, render

__all__ = [
    "BOOTSTRAP_PATH",
    "CUSTOM_DATA_LIMIT",
    "Plan",
    "dns_label",
    "key_placeholder",
    "load_plan",
    "read_api_key",
    "render",
    "user_data",
    "write_api_key",
]

TEMPLATE = Path(__file__).resolve().parent.parent / "bicep-wrapper" / "main.bicep"
SERVING_PIN = Path(__file__).resolve().parent.parent / "images" / "serving.toml"
CUSTOM_DATA_LIMIT = 65_535  # bytes before base64 (Azure's customData limit)
AZ_TIMEOUT_S = 3600.0  # a deployment of a GPU VM takes minutes
PARAMETERS_SCHEMA = (
    "https://schema.management.azure.com/schemas/2019-04-01/deploymentParameters.json#"
)
DEFAULT_MAA = "https://sharedeus.eus.attest.azure.net"
SECURE_PARAMETERS = ("sshPublicKey", "userData")  # @secure() in main.bicep


# --- the user data ---------------------------------------------------------------------------


def pinned_serving_image() -> str:
    """images/serving.toml's ``[vllm] reference``: the production image, pinned by digest."""
    try:
        doc = tomllib.loads(SERVING_PIN.read_text(encoding="utf-8"))
        reference = doc["vllm"]["reference"]
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        raise ConfinferError(
            f"{SERVING_PIN}: no [vllm] reference ({printable(exc, 200)})",
            reason=Reason.CONFIG_INVALID,
        ) from None
    if not isinstance(reference, str) or not re.search(r"@sha256:[0-9a-f]{64}$", reference):
        raise ConfinferError(
            f"{SERVING_PIN}: [vllm] reference is not pinned by digest",
            reason=Reason.CONFIG_INVALID,
        )
    return reference


def appliance_config(plan: Plan) -> str:
    """``/etc/confinfer/confinfer.toml`` for the VM: the attestation authority and the KEK
    from [azure], then every [appliance] key (each checked by :func:`load_plan`)."""
    values: dict[str, Any] = {
        "maa_url": plan.get("maa_authority", DEFAULT_MAA),
        "key_id": plan.key_id,
        # vLLM's image by digest unless [appliance] names another: onboarding pulls only a
        # reference pinned that way.
        "serving_image": pinned_serving_image(),
        **plan.appliance,
    }
    try:
        parse_key_id(values["key_id"])
    except Invalid as exc:
        why = f"[azure] vault_name and key_name make no key id: {exc}"
        raise plan_error(plan.path, why) from None
    return userdata.config_file(values)


def user_data(plan: Plan, api_key: str | None = None) -> str:
    """The VM's cloud-init user data: the appliance configuration, Caddy's environment file and
    the API key (``api_key``, else the one in ``api_key_file``, which must exist), and with
    [bootstrap] the packages, the appliance from its pinned wheelhouse, and onboarding."""
    if api_key is None:
        api_key = read_api_key(plan)
        if api_key is None:
            missing = plan.caddy.api_key_file
            raise plan_error(plan.path, f"[caddy] api_key_file {missing}: no such file")
    argv = None
    if plan.bootstrap:
        argv = [
            BOOTSTRAP_PATH,
            "--wheelhouse",
            plan.bootstrap["wheelhouse_url"],
            "--sha256",
            plan.bootstrap["wheelhouse_sha256"],
        ]
    return userdata.user_data(
        source=plan.path.name,
        config=appliance_config(plan),
        caddy_env=userdata.environment_file(plan.caddy.environment()),
        api_key=api_key,
        bootstrap_argv=argv,
    )


def parameters(plan: Plan, data: str) -> dict[str, Any]:
    """The ARM parameters document for bicep-wrapper/main.bicep."""
    size = len(data.encode("utf-8"))
    if size > CUSTOM_DATA_LIMIT:
        raise ConfinferError(
            f"the rendered user data is {size} bytes; Azure takes at most {CUSTOM_DATA_LIMIT}",
            reason=Reason.DEPLOY_USER_DATA_TOO_LARGE,
        )
    values: dict[str, Any] = {
        "namePrefix": plan.prefix,
        "location": plan.azure["location"],
        "vaultName": plan.azure["vault_name"],
        "keyName": plan.get("key_name", "model-kek"),
        "vmSize": plan.get("vm_size", DEFAULT_SIZE),
        "instanceCount": plan.get("instance_count", 1),
        "sshPublicKey": plan.ssh_key,
        "sshSourceRange": plan.get("ssh_source_range", ""),
        "dnsLabel": plan.dns_label,
        "vaultAllowedIpRanges": plan.get("vault_allowed_ip_ranges", []),
        "modelStorageAccount": plan.get("model_storage_account", ""),
        "modelContainer": plan.get("model_container", "models"),
        "userData": data,
    }
    if "maa_authority" in plan.azure:
        values["maaAuthority"] = plan.azure["maa_authority"]
    return {
        "$schema": PARAMETERS_SCHEMA,
        "contentVersion": "1.0.0.0",
        "parameters": {name: {"value": value} for name, value in values.items()},
    }


def write_parameters(plan: Plan, document: Mapping[str, Any]) -> Path:
    """``<deployment>.parameters.json`` next to deploy.toml, 0600 (it holds the user data and
    so the API key), replaced atomically; kept, so that the printed command runs by hand."""
    target = plan.parameters_file
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            json.dump(document, stream, indent=1)
            stream.write("\n")
        os.replace(name, target)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return target


# --- running az --------------------------------------------------------------------------------


def _say(line: str) -> None:
    print(f"confinfer: {line}", file=sys.stderr, flush=True)


@dataclass
class Az:
    """``az`` calls; with ``dry_run`` each is printed instead of run (reads answer None)."""

    dry_run: bool = False
    executable: str = "az"
    out: Callable[[str], None] = field(default=lambda line: print(line, flush=True))
    say: Callable[[str], None] = field(default=_say)

    def _argv(self, args: Sequence[str]) -> list[str]:
        found = shutil.which(self.executable)
        if found is None and not self.dry_run:
            raise ConfinferError(
                "the Azure CLI (az) is not on PATH",
                reason=Reason.DEPLOY_AZ_FAILED,
                hint="install it: https://learn.microsoft.com/cli/azure/install-azure-cli",
            )
        return [found or self.executable, *args]

    def run(self, args: Sequence[str], *, read: bool = False) -> str | None:
        argv = self._argv(args)
        if self.dry_run:
            self.out(shlex.join([self.executable, *args]))
            return None
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if read else None,
                stderr=subprocess.PIPE,
                text=True,
                timeout=AZ_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ConfinferError(
                f"`az {printable(args[0], 40)}` did not finish in {AZ_TIMEOUT_S:g} s",
                reason=Reason.DEPLOY_AZ_FAILED,
            ) from None
        if done.returncode != 0:
            raise az_failure(args, done.returncode, done.stderr)
        return done.stdout if read else ""

    def json(self, args: Sequence[str]) -> Any:
        text = self.run([*args, "-o", "json"], read=True)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError:
            raise ServiceError(
                f"`az {' '.join(args[:3])}` did not print JSON", reason=Reason.DEPLOY_AZ_FAILED
            ) from None


def az_failure(args: Sequence[str], code: int, stderr: str) -> ConfinferError:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    said = lines[-1] if lines else f"exit status {code}"
    said = said.removeprefix("ERROR: ")
    command = " ".join(args[:3])
    if "az login" in said:
        return ConfinferError(
            "the Azure CLI is not logged in",
            reason=Reason.DEPLOY_NOT_LOGGED_IN,
            hint="run `az login` (and `az account set --subscription ...`), then deploy again",
        )
    return ConfinferError(
        f"`az {printable(command, 80)}` failed (exit {code}): {printable(said, 300)}",
        reason=Reason.DEPLOY_AZ_FAILED,
    )


# --- the checks before a deployment ------------------------------------------------------------


def preflight(plan: Plan, az: Az) -> bool | None:
    """What usually fails a deployment, named before it starts. Answers whether the resource
    group exists (None in a dry run)."""
    az.json(["account", "show"])
    state = az.run(
        ["provider", "show", "--namespace", "Microsoft.KeyVault", "--query",
         "registrationState", "-o", "tsv"],
        read=True,
    )  # fmt: skip
    if state is not None and state.strip() != "Registered":
        raise ConfinferError(
            f"the Microsoft.KeyVault resource provider is {printable(state.strip(), 40)!r}",
            reason=Reason.DEPLOY_PROVIDER_UNREGISTERED,
            hint="az provider register --namespace Microsoft.KeyVault --wait",
        )
    exists = group_exists(plan, az)
    location = str(plan.azure["location"])
    size = str(plan.get("vm_size", DEFAULT_SIZE))
    skus = az.json(
        ["vm", "list-skus", "--location", location, "--size", size,
         "--resource-type", "virtualMachines"]
    )  # fmt: skip
    if skus is not None:
        _check_size(skus, size, location, plan, az, exists=bool(exists))
    key = _key_answer(plan, az)
    if key is not None and not key.get("releasePolicy"):
        raise ConfinferError(
            f"the key {plan.key_id} already exists without a release policy",
            reason=Reason.DEPLOY_KEY_WITHOUT_POLICY,
            hint="Secure Key Release needs an exportable key created with its release policy; "
            "choose another key_name, or delete and purge that key",
        )
    return exists


def group_exists(plan: Plan, az: Az) -> bool | None:
    answer = az.json(["group", "exists", "--name", plan.group])
    if answer is None:
        return None
    if not isinstance(answer, bool):
        raise ServiceError(
            "`az group exists` did not answer true or false", reason=Reason.DEPLOY_AZ_FAILED
        )
    return answer


def _key_answer(plan: Plan, az: Az) -> dict[str, Any] | None:
    """The existing key, or None when there is none (or in a dry run)."""
    args = [
        "keyvault", "key", "show", "--vault-name", str(plan.azure["vault_name"]),
        "--name", str(plan.get("key_name", "model-kek")),
    ]  # fmt: skip
    try:
        answer = az.json(args)
    except ConfinferError as exc:
        text = str(exc)
        if "(exit 3)" in text or "NotFound" in text or "not found" in text:
            return None  # a new vault or a new key: the deployment creates it
        raise
    return answer if isinstance(answer, dict) else None


def own_instances(plan: Plan, az: Az, size: str) -> int:
    """How many instances of ``size`` this deployment already runs (its ``<prefix>-vm``, or its
    ``<prefix>-vmss``' capacity): their vCPUs are in the family's usage already."""
    single = int(plan.get("instance_count", 1)) == 1
    kind, name = ("vm", f"{plan.prefix}-vm") if single else ("vmss", f"{plan.prefix}-vmss")
    listed = az.json([kind, "list", "--resource-group", plan.group])
    count = 0
    for entry in listed if isinstance(listed, list) else []:
        if not isinstance(entry, dict) or str(entry.get("name", "")).lower() != name.lower():
            continue
        if single:
            profile = entry.get("hardwareProfile")
            vm_size = profile.get("vmSize") if isinstance(profile, dict) else None
            count += str(vm_size).lower() == size.lower()
        else:
            sku = entry.get("sku")
            if isinstance(sku, dict) and str(sku.get("name", "")).lower() == size.lower():
                capacity = sku.get("capacity")
                count += capacity if isinstance(capacity, int) and capacity > 0 else 0
    return count


def _check_size(skus: Any, size: str, location: str, plan: Plan, az: Az, *, exists: bool) -> None:
    offered = [
        s for s in skus if isinstance(s, dict) and str(s.get("name", "")).lower() == size.lower()
    ]
    usable = [s for s in offered if not s.get("restrictions")]
    if not usable:
        why = "is restricted for this subscription" if offered else "is not offered"
        raise ConfinferError(
            f"{size} {why} in {location}",
            reason=Reason.DEPLOY_SIZE_UNAVAILABLE,
            hint="choose a region with confidential H100 VMs (az vm list-skus --size "
            f"{size} --all -o table)",
        )
    sku = usable[0]
    family = str(sku.get("family", ""))
    vcpus = next(
        (
            int(c["value"])
            for c in sku.get("capabilities", [])
            if isinstance(c, dict) and c.get("name") == "vCPUs" and str(c.get("value")).isdigit()
        ),
        0,
    )
    wanted = int(plan.get("instance_count", 1))
    have = own_instances(plan, az, size) if exists else 0
    need = vcpus * max(0, wanted - have)
    usage = az.json(["vm", "list-usage", "--location", location]) or []
    hint = "request a quota increase for the NCC H100 v5 family in that region"
    for entry in usage:
        name = entry.get("name", {}) if isinstance(entry, dict) else {}
        if isinstance(name, dict) and str(name.get("value", "")).lower() == family.lower():
            try:
                free = int(entry["limit"]) - int(entry["currentValue"])
            except (KeyError, ValueError, TypeError):
                break
            if free < need:
                mine = f"; this deployment has {have} of its {wanted} already" if have else ""
                raise ConfinferError(
                    f"no quota for {need} vCPUs of {family} in {location} ({free} free{mine})",
                    reason=Reason.DEPLOY_NO_QUOTA,
                    hint=hint,
                )
            return
    raise ConfinferError(
        f"no quota for {family} in {location} (the subscription has none)",
        reason=Reason.DEPLOY_NO_QUOTA,
        hint=hint,
    )


# --- the actions -------------------------------------------------------------------------------


def _deployment_args(plan: Plan, verb: str) -> list[str]:
    return [
        "deployment", "group", verb, "--resource-group", plan.group, "--name",
        plan.deployment, "--template-file", str(TEMPLATE), "--parameters",
        f"@{plan.parameters_file}",
    ]  # fmt: skip


def _summary(document: Mapping[str, Any]) -> list[str]:
    """The parameters, one per line, the secure ones by their size only."""
    lines = []
    for name, entry in document["parameters"].items():
        value = entry["value"]
        if name in SECURE_PARAMETERS:
            lines.append(f"  {name}: <secure, {len(str(value).encode())} bytes>")
        else:
            lines.append(f"  {name}: {printable(json.dumps(value), 200)}")
    return lines


def deploy(plan: Plan, az: Az, *, what_if: bool = False) -> Any:
    """Create or update the deployment (or show what it would change).

    Everything local is done before the first ``az`` call: the API key read (or, for
    ``create``, made in memory), the user data rendered and measured. The key file is written
    only once the checks against Azure have passed."""
    key = read_api_key(plan)
    new_key = key is None and not what_if and not az.dry_run
    if new_key:
        key = secrets.token_urlsafe(32)
    if az.dry_run or key is None:
        key = key_placeholder(plan)  # never printed, never sent
    document = parameters(plan, user_data(plan, api_key=key))
    exists = preflight(plan, az)
    if what_if:
        if exists is False:
            print(
                f"the resource group {plan.group} does not exist yet: az deployment group "
                "what-if needs it, so nothing was asked of Azure; create would make the group "
                "and every resource of bicep-wrapper/main.bicep with these parameters:",
                flush=True,
            )
            for line in _summary(document):
                print(line, flush=True)
            return None
        if not az.dry_run:
            write_parameters(plan, document)
            az.say(f"asking Azure what deploying {plan.deployment} to {plan.group} would change "
                   "(az deployment group what-if)")  # fmt: skip
        else:
            _show_parameters(plan, document, az)
        return az.run(_deployment_args(plan, "what-if"))
    if az.dry_run:
        _show_parameters(plan, document, az)
    else:
        if new_key:
            write_api_key(plan, key)
            az.say(
                f"wrote a new API key to {plan.caddy.api_key_file} (mode 0600): clients send "
                "it as `Authorization: Bearer <key>`"
            )
        write_parameters(plan, document)
    if not exists:
        az.json(["group", "create", "--name", plan.group, "--location",
                 str(plan.azure["location"])])  # fmt: skip
    if not az.dry_run:
        az.say(
            f"deploying {plan.deployment} to {plan.group} (az deployment group create; this "
            f"takes several minutes; parameters in {plan.parameters_file})"
        )
    return az.json(_deployment_args(plan, "create"))


def _show_parameters(plan: Plan, document: Mapping[str, Any], az: Az) -> None:
    az.out(f"# {plan.parameters_file} (create writes it, mode 0600; --dry-run writes nothing):")
    for line in json.dumps(document, indent=1).splitlines():
        az.out(f"#   {line}")


def outputs(plan: Plan, az: Az) -> dict[str, str] | None:
    answer = az.json(
        ["deployment", "group", "show", "--resource-group", plan.group, "--name",
         plan.deployment, "--query", "properties.outputs"]
    )  # fmt: skip
    if answer is None:
        return None
    if not isinstance(answer, dict):
        raise ServiceError(
            "the deployment's outputs are not a JSON object", reason=Reason.DEPLOY_AZ_FAILED
        )
    return {
        str(name): str(value.get("value", "")) if isinstance(value, dict) else ""
        for name, value in answer.items()
    }


def destroy(plan: Plan, az: Az, *, yes: bool, ask: Callable[[str], str] = input) -> bool:
    """Delete the resource group; asks first unless ``yes``. False when the operator declined.
    The vault stays soft-deleted (purge protection) for its retention period."""
    vault = plan.azure["vault_name"]
    if not yes and not az.dry_run:
        if not sys.stdin.isatty() and ask is input:
            raise ConfinferError(
                "destroy asks before it deletes; give --yes to run it unattended",
                reason=Reason.USAGE,
            )
        answer = ask(
            f"delete resource group {plan.group} and everything in it (the Key Vault {vault} "
            "stays soft-deleted, its name taken, for 90 days)? [y/N] "
        )
        if answer.strip().lower() not in ("y", "yes"):
            return False
    if not az.dry_run:
        az.say(f"deleting resource group {plan.group} (az group delete; this takes minutes)")
    az.run(["group", "delete", "--name", plan.group, "--yes"])
    if not az.dry_run:
        az.say(
            f"deleted resource group {plan.group}; the Key Vault {vault} and its KEK stay "
            "soft-deleted for 90 days (purge protection: nobody can purge them sooner) and "
            f"the name {vault} is taken until then (`az keyvault recover --name {vault}` "
            "brings them back)"
        )
    return True
