"""``deploy.toml``, read and checked whole before ``confinfer deploy`` calls ``az`` at all.

:func:`load_plan` gives a :class:`Plan`: ``[azure]`` (names checked as Azure and the VM's DNS
label need them), ``[appliance]`` (each key parsed as the VM's loader parses it, ``model_source``
checked as model-loader would check it, and against the one storage container the VM may read),
``[caddy]`` (what goes into ``/etc/confinfer/caddy.env``), ``[bootstrap]`` (the pinned
wheelhouse), and the SSH public key. Errors name ``deploy.toml``, its table and its key.

The API key file (``[caddy] api_key_file``) is read as caddy-run reads the key, written once
(0600, never over an existing file), and never shown: :func:`key_placeholder` stands in for it
wherever a key is not to be made or printed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from confinfer import config
from confinfer.configvalues import Invalid, parse_https_url, show
from confinfer.errors import ConfigError, Reason, printable

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
_CADDY_KEYS: dict[str, type] = {
    "acme_email": str,
    "tls": str,
    "domain": str,
    "https_port": int,
    "http_port": int,
    "bind": str,
    "api_key_file": str,
}
# The VM's configuration keys that deploy writes from [azure], never from [appliance].
_FROM_AZURE = {"maa_url": "maa_authority", "key_id": "vault_name and key_name"}
_REQUIRED = ("resource_group", "location", "name_prefix", "vault_name", "ssh_public_key")
_BOOTSTRAP_KEYS = ("wheelhouse_url", "wheelhouse_sha256")
_TABLES = ("azure", "appliance", "caddy", "bootstrap")
# RFC 3986's characters and no others: no space, quote, backslash, backquote or control
# character reaches the user data or the bootstrap's command line.
_URL_CHARS = re.compile(r"[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%-]+")
# name_prefix starts the DNS label (<prefix>-<6 hex>): a letter, then letters, digits, hyphens.
_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9-]{2,15}")
_LOCATION = re.compile(r"[a-z][a-z0-9]{1,40}")  # `az account list-locations`' Name column
_VAULT = re.compile(r"[A-Za-z](?:[A-Za-z0-9]|-(?=[A-Za-z0-9])){2,23}")
_KEY_NAME = re.compile(r"[0-9A-Za-z-]{1,127}")
_DEPLOYMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._()-]{0,63}")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_EMAIL = re.compile(rf"[A-Za-z0-9._%+-]{{1,64}}@{_HOST_LABEL}(?:\.{_HOST_LABEL})+")
_CONTAINER = re.compile(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}")
_ACCOUNT = re.compile(r"[a-z0-9]{3,24}")
# caddy-run's rule for the key (images/caddy/caddy-run): 32 to 512 of these characters.
_API_KEY = re.compile(r"[A-Za-z0-9._~+/=-]{32,512}")


@dataclass(frozen=True)
class Caddy:
    """What ``[caddy]`` says, checked: the values of ``/etc/confinfer/caddy.env``."""

    domain: str
    tls: str  # "internal", or the ACME account's e-mail address
    https_port: int
    http_port: int
    serving_port: int
    bind: str | None
    api_key_file: Path

    def environment(self) -> dict[str, str]:
        values = {
            "CONFINFER_DOMAIN": self.domain,
            "CONFINFER_CADDY_TLS": self.tls,
            "CONFINFER_HTTPS_PORT": str(self.https_port),
            "CONFINFER_HTTP_PORT": str(self.http_port),
            "CONFINFER_SERVING_PORT": str(self.serving_port),
        }
        if self.bind is not None:
            values["CONFINFER_CADDY_BIND"] = self.bind
        return values


@dataclass(frozen=True)
class Plan:
    """What one ``deploy.toml`` says, every value checked."""

    path: Path
    azure: Mapping[str, Any]
    appliance: Mapping[str, Any]
    caddy: Caddy
    ssh_key: str
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
    def prefix(self) -> str:
        return str(self.azure["name_prefix"])

    @property
    def key_id(self) -> str:
        """The KEK, versionless: the VM follows the key's current version."""
        name = self.get("key_name", "model-kek")
        return f"https://{self.azure['vault_name']}.vault.azure.net/keys/{name}"

    @property
    def dns_label(self) -> str:
        return dns_label(self.prefix, self.group, self.deployment)

    @property
    def parameters_file(self) -> Path:
        """The ARM parameters, kept next to deploy.toml (0600: they hold the API key)."""
        return self.path.resolve().parent / f"{self.deployment}.parameters.json"


def dns_label(prefix: str, group: str, deployment: str) -> str:
    """The public IP's DNS label: ``<prefix>-<6 hex of SHA-256(group + deployment)>``, lower
    case; passed to the Bicep as ``dnsLabel`` so that the FQDN is known before deploying."""
    digest = hashlib.sha256((group + deployment).encode("utf-8")).hexdigest()[:6]
    return f"{prefix.lower()}-{digest}"


def _bad(path: Path, message: str, reason: Reason = Reason.CONFIG_INVALID) -> ConfigError:
    return ConfigError(f"{path}: {printable(message, 300)}", reason=reason)


plan_error = _bad  # for confinfer.deploy: an error naming deploy.toml


def load_plan(path: Path) -> Plan:
    """Read and check ``deploy.toml`` whole: nothing in it is looked at by ``az`` first."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise _bad(path, f"cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise _bad(path, f"cannot parse: {exc}") from None
    unknown = sorted(set(data) - set(_TABLES))
    if unknown:
        raise _bad(
            path,
            f"unknown table [{unknown[0]}]; expected [azure], [appliance], [caddy] and [bootstrap]",
        )
    tables = {name: data.get(name, {}) for name in _TABLES}
    if not all(isinstance(table, dict) for table in tables.values()):
        raise _bad(path, "[azure], [appliance], [caddy] and [bootstrap] must be tables")
    azure = _azure(path, tables["azure"])
    appliance = _appliance(path, azure, tables["appliance"])
    serving_port = int(appliance.get("serving_port", config.BY_NAME["serving_port"].default))
    caddy = _caddy(path, azure, tables["caddy"], serving_port)
    return Plan(
        path, azure, appliance, caddy, _ssh_key(path, azure), _bootstrap(path, tables["bootstrap"])
    )


def _azure(path: Path, azure: dict[str, Any]) -> dict[str, Any]:
    for key, value in azure.items():
        want = _AZURE_KEYS.get(key)
        if want is None:
            raise _bad(path, f"[azure] unknown key {key!r}")
        if isinstance(value, bool) or not isinstance(value, want):
            raise _bad(path, f"[azure] {key}: wrong type")
        if isinstance(value, str) and not value.isprintable():
            raise _bad(path, f"[azure] {key}: must not contain control characters")
    missing = [k for k in _REQUIRED if k not in azure]
    if missing:
        raise _bad(path, f"[azure] needs {', '.join(missing)}")
    count = azure.get("instance_count", 1)
    if not 1 <= count <= 100:
        raise _bad(path, "[azure] instance_count must be 1 to 100")
    checks = (
        ("name_prefix", _PREFIX, "3 to 16 letters, digits and hyphens, starting with a letter"),
        ("location", _LOCATION, "a region's name as `az account list-locations -o table` "
         "prints it (Name column, e.g. eastus2)"),
        ("vault_name", _VAULT, "3 to 24 letters, digits and single hyphens, starting with a "
         "letter"),
        ("key_name", _KEY_NAME, "1 to 127 letters, digits and hyphens"),
        ("deployment_name", _DEPLOYMENT, "1 to 64 letters, digits and . _ ( ) -"),
        ("model_storage_account", _ACCOUNT, "3 to 24 lower-case letters and digits"),
        ("model_container", _CONTAINER, "3 to 63 lower-case letters, digits and hyphens"),
    )  # fmt: skip
    for key, pattern, what in checks:
        if key in azure and azure[key] != "" and not pattern.fullmatch(azure[key]):
            raise _bad(path, f"[azure] {key} = {show(azure[key])}: expected {what}")
    if "maa_authority" in azure:
        try:
            parse_https_url(azure["maa_authority"])
        except Invalid as exc:
            shown = show(azure["maa_authority"])
            raise _bad(path, f"[azure] maa_authority = {shown}: {exc}") from None
    if azure.get("ssh_source_range") and count > 1:
        raise _bad(
            path,
            "[azure] ssh_source_range reaches no instance of a scale set (instance_count > 1): "
            "the instances have no public IP and the load balancer forwards only 443 and 80; "
            "leave ssh_source_range out",
        )
    return azure


def _appliance(path: Path, azure: Mapping[str, Any], table: dict[str, Any]) -> dict[str, Any]:
    """[appliance], each key parsed as the VM's loader parses it (files that must exist on
    the VM are not looked for here); errors name deploy.toml and its key."""
    for key, value in table.items():
        setting = config.BY_NAME.get(key)
        if setting is None:
            raise _bad(path, f"[appliance] {key!r} is not a confinfer configuration key")
        if key in _FROM_AZURE:
            raise _bad(
                path,
                f"[appliance] {key} comes from [azure] ({_FROM_AZURE[key]}): the KEK's release "
                "policy names that authority and key, so the VM must use the same",
            )
        try:
            setting.parse(value)
        except Invalid as exc:
            raise _bad(path, f"[appliance] {key} = {show(value)}: {exc}") from None
    _model_source(path, azure, table.get("model_source"))
    return table


def _model_source(path: Path, azure: Mapping[str, Any], source: Any) -> None:
    """What model-loader would refuse at boot (loader/blob.py), refused now; and a Blob URL
    the VM's identity cannot read (it is granted Storage Blob Data Reader on
    model_storage_account's model_container only)."""

    def bad(why: str) -> ConfigError:
        return _bad(path, f"[appliance] model_source {why}", Reason.MODEL_SOURCE_INVALID)

    if not source:
        raise bad("is not set: the VM's model-loader would have nothing to serve")
    text = str(source)
    if "://" not in text:
        if not text.startswith("/"):
            raise bad("must be an https:// Blob URL or an absolute path on the VM")
        return
    parts = urlsplit(text)
    if parts.scheme != "https" or not parts.hostname:
        raise bad(f"= {show(text)}: a Blob URL must be https with a host")
    if parts.query or parts.fragment or parts.username or parts.password or "@" in parts.netloc:
        raise bad(
            f"= {show(text.split('?')[0])}...: no query, fragment or user info (no SAS token): "
            "the VM reads the blobs with its managed identity"
        )
    segments = [unquote(s) for s in parts.path.split("/")[1:]]
    if not segments or not _CONTAINER.fullmatch(segments[0]):
        raise bad(f"= {show(text)}: no valid container name (3-63 of a-z, 0-9, -)")
    prefix = "/".join(segments[1:]).strip("/")
    for part in prefix.split("/") if prefix else ():
        if part in ("", ".", "..") or not part.isprintable() or "\\" in part:
            raise bad(f"= {show(text)}: the prefix must be plain path components")
    account = azure.get("model_storage_account", "")
    if account:
        host = parts.hostname.lower()
        container = azure.get("model_container", "models")
        if host != f"{account}.blob.core.windows.net" or segments[0] != container:
            raise bad(
                f"= {show(text)} is not in {account}/{container} ([azure] "
                "model_storage_account, model_container): the VM's identity may read that "
                "container only"
            )


def _caddy(path: Path, azure: Mapping[str, Any], table: dict[str, Any], port: int) -> Caddy:
    for key, value in table.items():
        want = _CADDY_KEYS.get(key)
        if want is None:
            raise _bad(path, f"[caddy] unknown key {key!r}")
        if isinstance(value, bool) or not isinstance(value, want):
            raise _bad(path, f"[caddy] {key}: wrong type")
    tls = table.get("tls", "acme")
    if tls not in ("acme", "internal"):
        raise _bad(path, f"[caddy] tls = {show(tls)}: expected \"acme\" (the default) or "
                   "\"internal\" (Caddy's own CA, for tests)")  # fmt: skip
    email = table.get("acme_email")
    if tls == "acme":
        if email is None:
            raise _bad(
                path,
                "[caddy] needs acme_email: Caddy registers the ACME account that gets the "
                'certificate with it (or tls = "internal" for a test machine)',
            )
        if len(email) > 254 or not _EMAIL.fullmatch(email):
            raise _bad(path, f"[caddy] acme_email = {show(email)}: expected an e-mail address")
    elif email is not None:
        raise _bad(path, '[caddy] acme_email goes with tls = "acme", not "internal"')
    deployment = azure.get("deployment_name", "confinfer")
    label = dns_label(azure["name_prefix"], azure["resource_group"], deployment)
    default_domain = f"{label}.{azure['location']}.cloudapp.azure.com"
    domain = table.get("domain", default_domain).lower()
    if not _DOMAIN.fullmatch(domain):
        raise _bad(path, f"[caddy] domain = {show(table.get('domain'))}: expected a DNS name")
    ports = {"https_port": table.get("https_port", 443), "http_port": table.get("http_port", 80)}
    for key, value in ports.items():
        if not 1 <= value <= 65535:
            raise _bad(path, f"[caddy] {key} must be 1 to 65535")
        if value == port:
            raise _bad(path, f"[caddy] {key} is the engine's serving_port ({port})")
    if ports["https_port"] == ports["http_port"]:
        raise _bad(path, "[caddy] https_port and http_port must differ")
    bind = table.get("bind")
    if bind is not None:
        try:
            bind = str(ipaddress.ip_address(bind))
        except ValueError:
            raise _bad(path, f"[caddy] bind = {show(bind)}: expected an IP address") from None
    key_file = Path(os.path.expanduser(table.get("api_key_file", f"{deployment}.api-key")))
    if not str(key_file).isprintable():
        raise _bad(path, "[caddy] api_key_file: must not contain control characters")
    return Caddy(
        domain=domain,
        tls=str(email) if tls == "acme" else "internal",
        https_port=ports["https_port"],
        http_port=ports["http_port"],
        serving_port=port,
        bind=bind,
        api_key_file=path.resolve().parent / key_file,
    )


def _ssh_key(path: Path, azure: Mapping[str, Any]) -> str:
    key_path = Path(os.path.expanduser(str(azure["ssh_public_key"])))
    if not key_path.is_absolute():
        key_path = path.resolve().parent / key_path
    try:
        ssh_key = key_path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not ASCII"
        raise _bad(path, f"[azure] ssh_public_key {key_path}: cannot read ({why})") from None
    if not ssh_key.startswith(("ssh-", "ecdsa-")) or not ssh_key.isprintable():
        raise _bad(path, f"[azure] ssh_public_key {key_path}: not an OpenSSH public key")
    if "PRIVATE KEY" in ssh_key:
        raise _bad(path, f"[azure] ssh_public_key {key_path}: a private key; give the .pub file")
    return ssh_key


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


# --- the API key -------------------------------------------------------------------------------


def read_api_key(plan: Plan) -> str | None:
    """The key in ``api_key_file``, checked as caddy-run checks it; None when there is none.
    Messages name the file, never its content."""
    path = plan.caddy.api_key_file
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _bad(
            plan.path, f"[caddy] api_key_file {path}: cannot read ({exc.strerror})"
        ) from None
    with os.fdopen(fd, "rb") as stream:
        info = os.fstat(stream.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise _bad(plan.path, f"[caddy] api_key_file {path}: not a regular file")
        if info.st_mode & 0o077:
            raise _bad(
                plan.path,
                f"[caddy] api_key_file {path}: readable by others (mode "
                f"{stat.S_IMODE(info.st_mode):04o}); chmod 600 it",
            )
        raw = stream.read(1024)
    text = raw.decode("ascii", errors="replace").strip("\n")
    if not _API_KEY.fullmatch(text):
        raise _bad(
            plan.path,
            f"[caddy] api_key_file {path}: not an API key (32 to 512 characters of "
            "A-Za-z0-9._~+/=- on one line)",
        )
    return text


def write_api_key(plan: Plan, key: str) -> None:
    """A new key file, 0600, never over an existing one."""
    path = plan.caddy.api_key_file
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise _bad(
            plan.path, f"[caddy] api_key_file {path}: cannot create ({exc.strerror})"
        ) from None
    with os.fdopen(fd, "w", encoding="ascii") as stream:
        stream.write(key + "\n")


def key_placeholder(plan: Plan) -> str:
    shown = str(plan.caddy.api_key_file).encode("ascii", "backslashreplace").decode("ascii")
    return f"<api key from {printable(shown, 400)}>"
