"""``confinfer deploy``: the Bicep templates of bicep-wrapper/ deployed through the ``az`` CLI.

The operator's machine compiles the Bicep (``az`` carries the compiler); this module reads
``deploy.toml``, checks what usually goes wrong first (not logged in, the Key Vault provider not
registered, a region without the VM size, no quota for its family, a key of that name that
exists without a release policy), renders the VM's user data, writes the ARM parameters file
and runs ``az deployment group create`` (or ``what-if``), reads the outputs, or deletes the
resource group. ``--dry-run`` prints every command it would run, exactly, and runs none.

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

    [bootstrap]                         # a stock image: install the appliance, then onboard
    wheelhouse_url = "https://<account>.blob.core.windows.net/releases/wheelhouse.tar.gz"
    wheelhouse_sha256 = "<64 hex digits: cloud-init/build-wheelhouse prints it>"

With ``[bootstrap]`` the user data (cloud-init/user-data.yaml.tmpl) installs the packages, the
appliance from the wheelhouse (refused unless its SHA-256 is the pinned one) and its units, and
starts onboarding; without it (cloud-init/user-data-configured.yaml.tmpl) the image is taken to
hold the appliance already and only the configuration is written. :func:`render` fills the
templates, stdlib only, every value quoted by the renderer itself.

Everything ``az`` prints is hostile until parsed: JSON read strictly, text escaped.
"""

from __future__ import annotations

import json
import os
import re
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

from confinfer import config
from confinfer.errors import ConfigError, ConfinferError, Reason, ServiceError, printable

TEMPLATE = Path(__file__).resolve().parent.parent / "bicep-wrapper" / "main.bicep"
CLOUD_INIT = Path(__file__).resolve().parent.parent / "cloud-init"
BOOTSTRAP_PATH = "/usr/local/sbin/confinfer-bootstrap"  # where the user data puts bootstrap.sh
CUSTOM_DATA_LIMIT = 65_535  # bytes before base64 (Azure's customData limit)
AZ_TIMEOUT_S = 3600.0  # a deployment of a GPU VM takes minutes
PARAMETERS_SCHEMA = (
    "https://schema.management.azure.com/schemas/2019-04-01/deploymentParameters.json#"
)
DEFAULT_SIZE = "Standard_NCC40ads_H100_v5"

_AZURE_KEYS: dict[str, type | tuple[type, ...]] = {
    "resource_group": str,
    "location": str,
    "name_prefix": str,
    "vault_name": str,
    "ssh_public_key": str,
    "key_name": str,
    "vm_size": str,
    "instance_count": int,
    "ssh_source_range": str,
    "maa_authority": str,
    "vault_allowed_ip_ranges": list,
    "model_storage_account": str,
    "model_container": str,
    "deployment_name": str,
}
# The VM's configuration keys that deploy writes from [azure], never from [appliance].
_FROM_AZURE = {"maa_url": "maa_authority", "key_id": "vault_name and key_name"}
_REQUIRED = ("resource_group", "location", "name_prefix", "vault_name", "ssh_public_key")
_BOOTSTRAP_KEYS = ("wheelhouse_url", "wheelhouse_sha256")
# RFC 3986's characters and no others: no space, quote, backslash, backquote or control
# character reaches the user data or the bootstrap's command line.
_URL_CHARS = re.compile(r"[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%-]+")


@dataclass(frozen=True)
class Plan:
    """What one ``deploy.toml`` says."""

    path: Path
    azure: Mapping[str, Any]
    appliance: Mapping[str, Any]
    bootstrap: Mapping[str, str] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.azure.get(key, default)

    @property
    def group(self) -> str:
        return str(self.azure["resource_group"])

    @property
    def deployment(self) -> str:
        return str(self.azure.get("deployment_name", "confinfer"))

    @property
    def key_id(self) -> str:
        """The KEK, versionless: the VM follows the key's current version."""
        name = self.get("key_name", "model-kek")
        return f"https://{self.azure['vault_name']}.vault.azure.net/keys/{name}"


def _bad(path: Path, message: str) -> ConfigError:
    return ConfigError(f"{path}: {printable(message, 300)}", reason=Reason.CONFIG_INVALID)


def load_plan(path: Path) -> Plan:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise _bad(path, f"cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise _bad(path, f"cannot parse: {exc}") from None
    unknown = sorted(set(data) - {"azure", "appliance", "bootstrap"})
    if unknown:
        raise _bad(
            path, f"unknown table [{unknown[0]}]; expected [azure], [appliance] and [bootstrap]"
        )
    azure = data.get("azure", {})
    appliance = data.get("appliance", {})
    bootstrap = data.get("bootstrap", {})
    if not all(isinstance(table, dict) for table in (azure, appliance, bootstrap)):
        raise _bad(path, "[azure], [appliance] and [bootstrap] must be tables")
    for key, value in azure.items():
        want = _AZURE_KEYS.get(key)
        if want is None:
            raise _bad(path, f"[azure] unknown key {key!r}")
        if isinstance(value, bool) or not isinstance(value, want):
            raise _bad(path, f"[azure] {key}: wrong type")
    missing = [k for k in _REQUIRED if k not in azure]
    if missing:
        raise _bad(path, f"[azure] needs {', '.join(missing)}")
    count = azure.get("instance_count", 1)
    if not 1 <= count <= 100:
        raise _bad(path, "[azure] instance_count must be 1 to 100")
    for key in appliance:
        if key not in config.BY_NAME:
            raise _bad(path, f"[appliance] {key!r} is not a confinfer configuration key")
        if key in _FROM_AZURE:
            raise _bad(
                path,
                f"[appliance] {key} comes from [azure] ({_FROM_AZURE[key]}): the KEK's release "
                "policy names that authority and key, so the VM must use the same",
            )
    return Plan(path, azure, appliance, _bootstrap(path, bootstrap))


def _bootstrap(path: Path, table: Mapping[str, Any]) -> dict[str, str]:
    """[bootstrap]: where the wheelhouse is and its SHA-256, both checked character by
    character."""
    if not table:
        return {}
    for key, value in table.items():
        if key not in _BOOTSTRAP_KEYS:
            raise _bad(path, f"[bootstrap] unknown key {key!r}")
        if not isinstance(value, str):
            raise _bad(path, f"[bootstrap] {key}: wrong type")
    missing = [k for k in _BOOTSTRAP_KEYS if k not in table]
    if missing:
        raise _bad(path, f"[bootstrap] needs {', '.join(missing)}")
    url, digest = table["wheelhouse_url"], table["wheelhouse_sha256"]
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise _bad(path, "[bootstrap] wheelhouse_sha256 must be 64 lower-case hexadecimal digits")
    if len(url) > 4096 or not _URL_CHARS.fullmatch(url):
        raise _bad(path, "[bootstrap] wheelhouse_url holds a character a URL cannot")
    if not re.match(r"https://[^/?#@]+/|file:///|/", url) or "/../" in url + "/":
        raise _bad(
            path,
            "[bootstrap] wheelhouse_url must be an https:// URL with a host, a file:// URL or an "
            "absolute path on the VM",
        )
    return {"wheelhouse_url": url, "wheelhouse_sha256": digest}


# --- the user data -------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_string(text: str) -> str:
    """A TOML basic string of printable ASCII, anything else as a \\u or \\U escape (JSON's
    surrogate pairs are not TOML): the configuration is one ASCII line per key."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= ord(ch) < 0x7F:
            out.append(ch)
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


def appliance_config(plan: Plan) -> str:
    """``/etc/confinfer/confinfer.toml`` for the VM: the attestation authority and the KEK
    from [azure], then every [appliance] key (validated as the VM would)."""
    values: dict[str, Any] = {
        "maa_url": plan.get("maa_authority", "https://sharedeus.eus.attest.azure.net"),
        "key_id": plan.key_id,
        **plan.appliance,
    }
    with tempfile.TemporaryDirectory() as empty:
        text = "".join(f"{key} = {_toml_value(value)}\n" for key, value in values.items())
        probe = Path(empty) / "confinfer.toml"
        probe.write_text(text, encoding="utf-8")
        # The VM's own loader reads it: refuse here what it would refuse there (files that
        # must exist on the VM are not checked here).
        try:
            config.load(Path(empty), environ={})
        except ConfigError as exc:
            if "does not exist" not in str(exc) and "no such file" not in str(exc).lower():
                raise
    return "# written by `confinfer deploy`\n" + text


_PLACEHOLDER = re.compile(r"@([A-Z][A-Z_]*)@$")
BLOCKS = frozenset({"CONFIG", "BOOTSTRAP"})  # the lines of a literal block (`content: |`)


def render(template: str, values: Mapping[str, str]) -> str:
    """Fill ``template``: ``##`` lines are dropped; a line ending in ``@NAME@`` gets the value.

    A block value (:data:`BLOCKS`) must be printable ASCII and its first line must start with
    text (neither a space nor nothing): each of its lines is indented like the placeholder, so
    none can end the block or change its indentation. Any other value must be one printable
    ASCII line (the callers give JSON). Every placeholder is filled once and every value used,
    else ValueError (a bug in the caller, never an input error).
    """
    out: list[str] = []
    used: set[str] = set()
    for line in template.splitlines():
        if line.startswith("##"):
            continue
        match = _PLACEHOLDER.search(line)
        if match is None:
            if re.search(r"@[A-Z_]+@", line):
                raise ValueError(f"a placeholder must end its line: {line!r}")
            out.append(line)
            continue
        name, prefix = match.group(1), line[: match.start()]
        if name not in values or name in used:
            raise ValueError(f"placeholder @{name}@ has no value, or appears twice")
        used.add(name)
        lines = values[name].splitlines() or [""]
        if name in BLOCKS:
            if prefix.strip() or not lines[0][:1].strip():
                raise ValueError(f"@{name}@ must stand alone, and its value start with text")
            for text in lines:
                if not all(0x20 <= ord(ch) <= 0x7E for ch in text):
                    raise ValueError(f"@{name}@: only printable ASCII goes in a block")
                out.append(prefix + text if text else "")
        else:
            if len(lines) != 1 or not lines[0].isascii() or not lines[0].isprintable():
                raise ValueError(f"@{name}@ must be one printable ASCII line")
            out.append(prefix + lines[0])
    if used != set(values):
        raise ValueError(f"unused values: {sorted(set(values) - used)}")
    return "\n".join(out) + "\n"


def user_data(plan: Plan) -> str:
    """The VM's cloud-init user data: the appliance configuration, and with [bootstrap] the
    packages, the appliance installed from its pinned wheelhouse, and onboarding started."""
    values = {
        "SOURCE": json.dumps(plan.path.name),
        "CONFIG": appliance_config(plan),
    }
    if not plan.bootstrap:
        template = CLOUD_INIT / "user-data-configured.yaml.tmpl"
    else:
        template = CLOUD_INIT / "user-data.yaml.tmpl"
        values["BOOTSTRAP"] = (CLOUD_INIT / "bootstrap.sh").read_text(encoding="utf-8")
        argv = [
            BOOTSTRAP_PATH,
            "--wheelhouse",
            plan.bootstrap["wheelhouse_url"],
            "--sha256",
            plan.bootstrap["wheelhouse_sha256"],
        ]
        values["BOOTSTRAP_ARGV"] = json.dumps(argv)
    return render(template.read_text(encoding="utf-8"), values)


def parameters(plan: Plan, data: str) -> dict[str, Any]:
    """The ARM parameters document for bicep-wrapper/main.bicep."""
    size = len(data.encode("utf-8"))
    if size > CUSTOM_DATA_LIMIT:
        raise ConfinferError(
            f"the rendered user data is {size} bytes; Azure takes at most {CUSTOM_DATA_LIMIT}",
            reason=Reason.DEPLOY_USER_DATA_TOO_LARGE,
        )
    key_path = Path(os.path.expanduser(str(plan.azure["ssh_public_key"])))
    try:
        ssh_key = key_path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise _bad(plan.path, f"ssh_public_key {key_path}: cannot read ({exc})") from None
    if not ssh_key.startswith(("ssh-", "ecdsa-")):
        raise _bad(plan.path, f"ssh_public_key {key_path}: not an OpenSSH public key")
    values: dict[str, Any] = {
        "namePrefix": plan.azure["name_prefix"],
        "location": plan.azure["location"],
        "vaultName": plan.azure["vault_name"],
        "keyName": plan.get("key_name", "model-kek"),
        "vmSize": plan.get("vm_size", DEFAULT_SIZE),
        "instanceCount": plan.get("instance_count", 1),
        "sshPublicKey": ssh_key,
        "sshSourceRange": plan.get("ssh_source_range", ""),
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


# --- running az --------------------------------------------------------------------------------


@dataclass
class Az:
    """``az`` calls; with ``dry_run`` each is printed instead of run (reads answer None)."""

    dry_run: bool = False
    executable: str = "az"
    out: Callable[[str], None] = field(default=lambda line: print(line, flush=True))

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


def preflight(plan: Plan, az: Az) -> None:
    """What usually fails a deployment, named before it starts."""
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
    location = str(plan.azure["location"])
    size = str(plan.get("vm_size", DEFAULT_SIZE))
    skus = az.json(
        ["vm", "list-skus", "--location", location, "--size", size,
         "--resource-type", "virtualMachines"]
    )  # fmt: skip
    if skus is not None:
        _check_size(skus, size, location, plan, az)
    key = _key_answer(plan, az)
    if key is not None and not key.get("releasePolicy"):
        raise ConfinferError(
            f"the key {plan.key_id} already exists without a release policy",
            reason=Reason.DEPLOY_KEY_WITHOUT_POLICY,
            hint="Secure Key Release needs an exportable key created with its release policy; "
            "choose another key_name, or delete and purge that key",
        )


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


def _check_size(skus: Any, size: str, location: str, plan: Plan, az: Az) -> None:
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
    need = vcpus * int(plan.get("instance_count", 1))
    usage = az.json(["vm", "list-usage", "--location", location]) or []
    for entry in usage:
        name = entry.get("name", {}) if isinstance(entry, dict) else {}
        if isinstance(name, dict) and str(name.get("value", "")).lower() == family.lower():
            try:
                free = int(entry["limit"]) - int(entry["currentValue"])
            except (KeyError, ValueError, TypeError):
                break
            if free < need:
                raise ConfinferError(
                    f"no quota for {need} vCPUs of {family} in {location} ({free} free)",
                    reason=Reason.DEPLOY_NO_QUOTA,
                    hint="request a quota increase for the NCC H100 v5 family in that region",
                )
            return
    raise ConfinferError(
        f"no quota for {family} in {location} (the subscription has none)",
        reason=Reason.DEPLOY_NO_QUOTA,
        hint="request a quota increase for the NCC H100 v5 family in that region",
    )


# --- the actions -------------------------------------------------------------------------------


def _deployment_args(plan: Plan, verb: str, params_file: Path) -> list[str]:
    return [
        "deployment", "group", verb, "--resource-group", plan.group, "--name",
        plan.deployment, "--template-file", str(TEMPLATE), "--parameters", f"@{params_file}",
    ]  # fmt: skip


def deploy(plan: Plan, az: Az, *, what_if: bool = False) -> Any:
    """Create or update the deployment (or show what it would change)."""
    preflight(plan, az)
    document = parameters(plan, user_data(plan))
    with tempfile.TemporaryDirectory(prefix="confinfer-deploy-") as work:
        params_file = Path(work) / "parameters.json"
        fd = os.open(params_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            json.dump(document, stream, indent=1)
        if what_if:
            return az.run(_deployment_args(plan, "what-if", params_file))
        az.json(["group", "create", "--name", plan.group, "--location",
                 str(plan.azure["location"])])  # fmt: skip
        return az.json(_deployment_args(plan, "create", params_file))


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
    """Delete the resource group; asks first unless ``yes``. The vault stays soft-deleted
    (purge protection) for its retention period."""
    if not yes and not az.dry_run:
        if not sys.stdin.isatty() and ask is input:
            raise ConfinferError(
                "destroy asks before it deletes; give --yes to run it unattended",
                reason=Reason.USAGE,
            )
        answer = ask(f"delete resource group {plan.group} and everything in it? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            return False
    az.run(["group", "delete", "--name", plan.group, "--yes"])
    return True
