"""A stand-in for the Azure CLI (``az``), bound to one scenario file, for ``confinfer deploy``.

``confinfer deploy`` drives Azure through ``az`` on the operator's machine (it compiles the
Bicep there). This stand-in answers the calls it makes as ``az`` does and refuses every other
spelling, so that a wrong flag fails a test here rather than on Azure:

- ``az account show -o json``; not logged in: ``ERROR: Please run 'az login' to setup
  account.`` on stderr, exit 1.
- ``az provider show --namespace NS --query registrationState -o tsv``
- ``az vm list-skus --location L --size S --resource-type virtualMachines -o json``: the SKUs of
  the scenario's region (``[]`` when the size is not offered there).
- ``az vm list-usage --location L -o json``: ``[{"currentValue", "limit", "name": {"value",
  "localizedValue"}}]`` (numbers as strings, as az prints them).
- ``az keyvault key show --vault-name V --name K -o json``: the key (with ``releasePolicy``
  when it has one); a missing vault or key: ``ERROR: ... not found``, exit 3, as az's
  ResourceNotFound.
- ``az group create --name RG --location L -o json``; ``az group delete --name RG --yes``;
  ``az group exists --name RG -o json``: ``true`` or ``false``.
- ``az vm list --resource-group RG -o json`` (``[{"name", "hardwareProfile": {"vmSize"}}]``)
  and ``az vmss list --resource-group RG -o json`` (``[{"name", "sku": {"name", "capacity"}}]``);
  a missing group: ``ERROR: Resource group 'RG' could not be found.``, exit 3.
- ``az deployment group create|what-if --resource-group RG --name N --template-file F
  --parameters @P -o json``: the template file must exist, the parameters file must be an ARM
  parameters document naming only parameters the template declares (``param NAME``), and a
  ``dnsLabel`` must be a valid DNS label as Azure's public IP takes it
  (``^[a-z][a-z0-9-]{1,61}[a-z0-9]$``); ``create`` records the deployment, its VM
  (``<namePrefix>-vm``) or scale set (``<namePrefix>-vmss``, capacity ``instanceCount``), adds
  their vCPUs to the region's usage, and answers its outputs.
- ``az deployment group show --resource-group RG --name N --query properties.outputs -o json``

Unknown commands or flags: az's ``ERROR: unrecognized arguments: ...``, exit 2. Every call is
appended to ``<scenario>.log`` as one JSON line ``{"argv": [...]}``.

The scenario (JSON) names: ``logged_in``, ``subscription``, ``providers`` (namespace ->
state), ``skus`` (location -> [{"name", "family", "vcpus", "restricted"}]), ``usage`` (location
-> family -> [current, limit]), ``keys`` ("vault/key" -> {"release_policy": bool}),
``groups``, ``deployments``, ``vms`` (group -> [{"name", "size"}]) and ``scale_sets`` (group ->
[{"name", "size", "capacity"}]) (written by the stand-in, or given), ``outputs`` (what a create
answers).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

SCENARIO_ENV = "CONFINFER_TESTBED_AZ_SCENARIO"
NOT_LOGGED_IN = "Please run 'az login' to setup account."


class AzError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _flags(args: Sequence[str], allowed: dict[str, bool]) -> dict[str, str]:
    """``--flag value`` pairs (``allowed``: flag -> takes a value); ``-o`` is ``--output``."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        flag = "--output" if args[i] == "-o" else args[i]
        if flag not in allowed:
            raise AzError(f"unrecognized arguments: {' '.join(args[i:])}", 2)
        if allowed[flag]:
            if i + 1 >= len(args):
                raise AzError(f"argument {flag}: expected one argument", 2)
            out[flag] = args[i + 1]
            i += 2
        else:
            out[flag] = ""
            i += 1
    return out


def _need(flags: dict[str, str], *names: str) -> None:
    missing = [n for n in names if n not in flags]
    if missing:
        raise AzError(f"the following arguments are required: {', '.join(missing)}", 2)


class Az:
    def __init__(self, scenario: Path, out: TextIO) -> None:
        self.path = scenario
        self.state: dict[str, Any] = json.loads(scenario.read_text(encoding="utf-8"))
        self.out = out

    def save(self) -> None:
        self.path.write_text(json.dumps(self.state, indent=1) + "\n", encoding="utf-8")

    def emit(self, value: Any, flags: dict[str, str]) -> None:
        if flags.get("--output") == "tsv":
            self.out.write(f"{value}\n")
        else:
            json.dump(value, self.out, indent=2)
            self.out.write("\n")

    def logged_in(self) -> None:
        if not self.state.get("logged_in", False):
            raise AzError(NOT_LOGGED_IN)

    def run(self, argv: Sequence[str]) -> None:
        words = list(argv)
        command = tuple(words[:3])
        if command[:2] == ("account", "show"):
            flags = _flags(words[2:], {"--output": True})
            self.logged_in()
            self.emit(self.state["subscription"], flags)
            return
        self.logged_in()
        handlers = {
            ("provider", "show"): self.provider_show,
            ("vm", "list-skus"): self.list_skus,
            ("vm", "list-usage"): self.list_usage,
            ("keyvault", "key"): self.key,
            ("group", "create"): self.group_create,
            ("group", "delete"): self.group_delete,
            ("group", "exists"): self.group_exists,
            ("vm", "list"): self.vm_list,
            ("vmss", "list"): self.vmss_list,
            ("deployment", "group"): self.deployment,
        }
        handler = handlers.get((command[0], command[1])) if len(command) >= 2 else None
        if handler is None:
            raise AzError(f"'{' '.join(words[:2])}' is not in the 'az' command group.", 2)
        handler(words[2:])

    def provider_show(self, args: list[str]) -> None:
        flags = _flags(args, {"--namespace": True, "--query": True, "--output": True})
        _need(flags, "--namespace")
        if flags.get("--query") != "registrationState":
            raise AzError("this stand-in answers only --query registrationState", 2)
        state = self.state.get("providers", {}).get(flags["--namespace"], "NotRegistered")
        self.emit(state, flags)

    def list_skus(self, args: list[str]) -> None:
        flags = _flags(
            args, {"--location": True, "--size": True, "--resource-type": True, "--output": True}
        )
        _need(flags, "--location", "--size", "--resource-type")
        skus = self.state.get("skus", {}).get(flags["--location"], [])
        found = []
        for sku in skus:
            if sku["name"].lower().startswith(flags["--size"].lower()):
                restrictions = (
                    [{"reasonCode": "NotAvailableForSubscription", "type": "Location"}]
                    if sku.get("restricted")
                    else []
                )
                found.append(
                    {
                        "name": sku["name"],
                        "family": sku["family"],
                        "locations": [flags["--location"]],
                        "resourceType": "virtualMachines",
                        "capabilities": [{"name": "vCPUs", "value": str(sku["vcpus"])}],
                        "restrictions": restrictions,
                    }
                )
        self.emit(found, flags)

    def list_usage(self, args: list[str]) -> None:
        flags = _flags(args, {"--location": True, "--output": True})
        _need(flags, "--location")
        usage = self.state.get("usage", {}).get(flags["--location"], {})
        self.emit(
            [
                {
                    "currentValue": str(current),
                    "limit": str(limit),
                    "name": {"value": family, "localizedValue": family},
                }
                for family, (current, limit) in usage.items()
            ],
            flags,
        )

    def key(self, args: list[str]) -> None:
        if not args or args[0] != "show":
            raise AzError(f"unrecognized arguments: {' '.join(args)}", 2)
        flags = _flags(args[1:], {"--vault-name": True, "--name": True, "--output": True})
        _need(flags, "--vault-name", "--name")
        vault, name = flags["--vault-name"], flags["--name"]
        key = self.state.get("keys", {}).get(f"{vault}/{name}")
        if key is None:
            raise AzError(
                f"(KeyNotFound) A key with (name/id) {name} was not found in this key vault.", 3
            )
        answer: dict[str, Any] = {
            "key": {"kid": f"https://{vault}.vault.azure.net/keys/{name}/0123", "kty": "RSA-HSM"},
            "attributes": {"exportable": bool(key.get("release_policy"))},
            "releasePolicy": (
                {"contentType": "application/json; charset=utf-8", "encodedPolicy": "e30"}
                if key.get("release_policy")
                else None
            ),
        }
        self.emit(answer, flags)

    def group_create(self, args: list[str]) -> None:
        flags = _flags(args, {"--name": True, "--location": True, "--output": True})
        _need(flags, "--name", "--location")
        self.state.setdefault("groups", {})[flags["--name"]] = flags["--location"]
        self.save()
        self.emit({"name": flags["--name"], "location": flags["--location"]}, flags)

    def group_exists(self, args: list[str]) -> None:
        flags = _flags(args, {"--name": True, "--output": True})
        _need(flags, "--name")
        self.emit(flags["--name"] in self.state.get("groups", {}), flags)

    def _group(self, args: list[str]) -> tuple[str, dict[str, str]]:
        flags = _flags(args, {"--resource-group": True, "--output": True})
        _need(flags, "--resource-group")
        group = flags["--resource-group"]
        if group not in self.state.get("groups", {}):
            raise AzError(f"Resource group '{group}' could not be found.", 3)
        return group, flags

    def vm_list(self, args: list[str]) -> None:
        group, flags = self._group(args)
        vms = self.state.get("vms", {}).get(group, [])
        self.emit(
            [{"name": vm["name"], "hardwareProfile": {"vmSize": vm["size"]}} for vm in vms], flags
        )

    def vmss_list(self, args: list[str]) -> None:
        group, flags = self._group(args)
        sets = self.state.get("scale_sets", {}).get(group, [])
        self.emit(
            [
                {"name": ss["name"], "sku": {"name": ss["size"], "capacity": ss["capacity"]}}
                for ss in sets
            ],
            flags,
        )

    def _record_instances(self, group: str, location: str, values: dict[str, Any]) -> None:
        """What a create leaves running, and its vCPUs in the region's usage."""
        prefix, size = values["namePrefix"], values.get("vmSize", "Standard_NCC40ads_H100_v5")
        count = int(values.get("instanceCount", 1))
        if count == 1:
            kind, entry, key = "vms", {"name": f"{prefix}-vm", "size": size}, f"{prefix}-vm"
        else:
            kind, key = "scale_sets", f"{prefix}-vmss"
            entry = {"name": key, "size": size, "capacity": count}
        listed = self.state.setdefault(kind, {}).setdefault(group, [])
        before = next((e for e in listed if e["name"] == key), None)
        had = 0 if before is None else int(before.get("capacity", 1))
        if before is not None:
            listed.remove(before)
        listed.append(entry)
        sku = next(
            (s for s in self.state.get("skus", {}).get(location, []) if s["name"] == size), None
        )
        usage = self.state.get("usage", {}).get(location, {})
        if sku is not None and sku["family"] in usage:
            usage[sku["family"]][0] += int(sku["vcpus"]) * (count - had)

    def group_delete(self, args: list[str]) -> None:
        flags = _flags(args, {"--name": True, "--yes": False, "--no-wait": False})
        _need(flags, "--name", "--yes")
        groups = self.state.setdefault("groups", {})
        if flags["--name"] not in groups:
            raise AzError(f"Resource group '{flags['--name']}' could not be found.", 3)
        del groups[flags["--name"]]
        self.state.get("vms", {}).pop(flags["--name"], None)
        self.state.get("scale_sets", {}).pop(flags["--name"], None)
        self.save()

    def deployment(self, args: list[str]) -> None:
        if not args or args[0] not in ("create", "what-if", "show"):
            raise AzError(f"unrecognized arguments: {' '.join(args)}", 2)
        verb, rest = args[0], args[1:]
        allowed = {"--resource-group": True, "--name": True, "--output": True}
        if verb == "show":
            flags = _flags(rest, {**allowed, "--query": True})
        else:
            flags = _flags(rest, {**allowed, "--template-file": True, "--parameters": True})
            _need(flags, "--template-file", "--parameters")
        _need(flags, "--resource-group", "--name")
        group = flags["--resource-group"]
        if group not in self.state.get("groups", {}):
            raise AzError(f"Resource group '{group}' could not be found.", 3)
        key = f"{group}/{flags['--name']}"
        if verb == "show":
            deployment = self.state.get("deployments", {}).get(key)
            if deployment is None:
                raise AzError(f"Deployment '{flags['--name']}' could not be found.", 3)
            if flags.get("--query") != "properties.outputs":
                raise AzError("this stand-in answers only --query properties.outputs", 2)
            self.emit(deployment["outputs"], flags)
            return
        template = Path(flags["--template-file"])
        if not template.is_file():
            raise AzError(f"Unable to find template file {template}")
        parameters = flags["--parameters"]
        if not parameters.startswith("@"):
            raise AzError("this stand-in takes parameters only as @FILE", 2)
        document = json.loads(Path(parameters[1:]).read_text(encoding="utf-8"))
        if "parameters" not in document or "$schema" not in document:
            raise AzError("the parameters file is not an ARM deployment parameters document")
        values = {k: v["value"] for k, v in document["parameters"].items()}
        declared = set(re.findall(r"^param\s+(\w+)", template.read_text(), re.MULTILINE))
        unknown = sorted(set(values) - declared)
        if unknown:
            raise AzError(
                f"The template parameters '{', '.join(unknown)}' in the parameters file are not "
                "valid; they are not present in the original template and can therefore not be "
                "provided at deployment time."
            )
        label = values.get("dnsLabel")
        if label is not None and not re.fullmatch(r"[a-z][a-z0-9-]{1,61}[a-z0-9]", label):
            raise AzError(
                f"(InvalidDomainNameLabel) The domain name label {label} is invalid. It must "
                "conform to the following regular expression: ^[a-z][a-z0-9-]{1,61}[a-z0-9]$."
            )
        if verb == "what-if":
            self.out.write(
                f"Resource changes: {len(values)} parameters, template {template.name}\n"
            )
            return
        outputs = {
            name: {"type": "String", "value": value}
            for name, value in self.state.get("outputs", {}).items()
        }
        self.state.setdefault("deployments", {})[key] = {"outputs": outputs, "parameters": values}
        self._record_instances(group, self.state["groups"][group], values)
        self.save()
        self.emit({"name": flags["--name"], "properties": {"outputs": outputs}}, flags)


def _fail(error: AzError, stderr: TextIO) -> NoReturn:
    stderr.write(f"ERROR: {error}\n")
    raise SystemExit(error.code)


def main(argv: Sequence[str] | None = None, *, scenario: str | Path) -> int:
    """Run the stand-in with ``argv`` (``argv[0]`` the program name)."""
    args = list(sys.argv if argv is None else argv)[1:]
    path = Path(scenario)
    with path.with_suffix(".log").open("a", encoding="utf-8") as log:
        log.write(json.dumps({"argv": args}) + "\n")
    try:
        Az(path, sys.stdout).run(args)
    except AzError as error:
        _fail(error, sys.stderr)
    return 0
