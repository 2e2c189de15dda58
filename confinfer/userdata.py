"""The VM's cloud-init user data, as text: the templates of cloud-init/ filled by a renderer that
quotes every value itself, and the files it writes (``confinfer.toml``, ``caddy.env``, the API
key). Stdlib only; ``confinfer deploy`` (confinfer/deploy.py) decides what goes in.

Every value reaches the YAML through :func:`render`: a literal block of printable ASCII indented
line by line, or one printable ASCII line (JSON). The configuration is TOML basic strings of
printable ASCII (:func:`toml_value`), the environment file ``KEY="value"`` lines as systemd's
``EnvironmentFile=`` reads them (:func:`environment_file`), so no value can add a line, a key or
a file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CLOUD_INIT = Path(__file__).resolve().parent.parent / "cloud-init"
BOOTSTRAP_PATH = "/usr/local/sbin/confinfer-bootstrap"  # where the user data puts bootstrap.sh
# The lines of a literal block (`content: |`); every other placeholder is one JSON line.
BLOCKS = frozenset({"CONFIG", "BOOTSTRAP", "CADDY_ENV", "API_KEY"})

_PLACEHOLDER = re.compile(r"@([A-Z][A-Z_]*)@$")
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def toml_string(text: str) -> str:
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


def config_file(values: Mapping[str, Any]) -> str:
    """``/etc/confinfer/confinfer.toml``: one ``key = value`` line per key."""
    body = "".join(f"{key} = {toml_value(value)}\n" for key, value in values.items())
    return "# written by `confinfer deploy`\n" + body


def environment_file(values: Mapping[str, str]) -> str:
    """``KEY="value"`` lines as systemd's EnvironmentFile= reads them. The callers validate
    every value to a small character set first; a quote, a backslash or anything outside
    printable ASCII is a bug here (ValueError), never escaped into the file."""
    lines = ["# written by `confinfer deploy`; read by caddy.service (EnvironmentFile=)"]
    for key, value in values.items():
        if not _ENV_NAME.fullmatch(key):
            raise ValueError(f"not an environment variable name: {key!r}")
        if not all(0x20 < ord(ch) < 0x7F and ch not in "\"'\\$`" for ch in value):
            raise ValueError(f"{key}: a value for an environment file must be plain ASCII")
        lines.append(f'{key}="{value}"')
    return "\n".join(lines) + "\n"


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


def user_data(
    *,
    source: str,
    config: str,
    caddy_env: str,
    api_key: str,
    bootstrap_argv: Sequence[str] | None,
) -> str:
    """The user data: with ``bootstrap_argv`` (a [bootstrap] table) cloud-init/user-data.yaml.tmpl
    (packages, the files, the bootstrap script and its command line), else
    cloud-init/user-data-configured.yaml.tmpl (the files only)."""
    values = {
        "SOURCE": json.dumps(source),
        "CONFIG": config,
        "CADDY_ENV": caddy_env,
        "API_KEY": api_key + "\n",
    }
    if bootstrap_argv is None:
        template = CLOUD_INIT / "user-data-configured.yaml.tmpl"
    else:
        template = CLOUD_INIT / "user-data.yaml.tmpl"
        values["BOOTSTRAP"] = (CLOUD_INIT / "bootstrap.sh").read_text(encoding="utf-8")
        values["BOOTSTRAP_ARGV"] = json.dumps(list(bootstrap_argv))
    return render(template.read_text(encoding="utf-8"), values)
