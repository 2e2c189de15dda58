"""Key release through an installed AzureAttestSKR, as the original tutorial does it.

For VMs that already ship Microsoft's ``AzureAttestSKR`` tool: it attests, releases the KEK and
unwraps the DEK itself, and we only run it::

    AzureAttestSKR -a <MAA URL> -k <KEK id> -c imds -s <base64(wrapped DEK)> -u

and take its standard output as the DEK, either the 32 raw bytes or their base64 (surrounding
whitespace ignored). The tool does not verify Key Vault's signature on the release; the native
backend (:mod:`confinfer.skr`) does, so prefer that one where it can run.

A failure reports the command (the wrapped DEK shown by size only), the exit status and the
tail of the tool's standard error. Its standard output is never echoed: it may hold the key.
"""

from __future__ import annotations

import base64
import binascii
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from confinfer.config import Config
from confinfer.errors import ConfigError, KeyReleaseError, Reason, ServiceError

DEK_BYTES = 32
STDERR_TAIL_CHARS = 2000
DEFAULT_TIMEOUT_S = 300.0


def command(tool: Path, maa_url: str, key_id: str, wrapped_dek: bytes) -> list[str]:
    """The tool's argument vector for unwrapping ``wrapped_dek``."""
    return [
        str(tool),
        "-a", maa_url.rstrip("/"),
        "-k", key_id,
        "-c", "imds",
        "-s", base64.b64encode(wrapped_dek).decode("ascii"),
        "-u",
    ]


def shown(argv: Sequence[str]) -> str:
    """The command line for messages, with the (long) wrapped DEK replaced by its size."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg == "-s":
            size = len(base64.b64decode(out[i + 1]))
            out[i + 1] = f"<base64 wrapped DEK, {size} bytes>"
    return shlex.join(out)


def _looks_like_text(data: bytes) -> bool:
    # A random 32-byte key is all printable ASCII with probability (95/256)^32, about 1e-14;
    # the tool's own messages always are ("The released key is of type RSA." is 32 bytes).
    return all(0x20 <= b < 0x7F for b in data)


def parse_output(stdout: bytes) -> bytearray:
    """The DEK from the tool's standard output: 32 raw bytes (with at most one trailing
    newline), or base64 of them (surrounding whitespace ignored). Text is never a key."""
    raw = stdout[:-1] if len(stdout) == DEK_BYTES + 1 and stdout.endswith(b"\n") else stdout
    if len(raw) == DEK_BYTES and not _looks_like_text(raw):
        return bytearray(raw)
    try:
        decoded = base64.b64decode(stdout.strip(), validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) == DEK_BYTES:
        return bytearray(decoded)
    raise KeyReleaseError(
        f"the key-release tool printed {len(stdout)} bytes, neither a {DEK_BYTES}-byte key nor "
        "its base64",
        reason=Reason.SKR_TOOL_OUTPUT,
        hint="check that the tool is AzureAttestSKR and was run in unwrap (-u) mode",
    )


def _tail(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace").strip()
    if len(text) > STDERR_TAIL_CHARS:
        text = "..." + text[-STDERR_TAIL_CHARS:]
    return text or "(no output on stderr)"


def resolve_tool(tool: Path | None) -> Path:
    if tool is None:
        raise ConfigError(
            "no key-release tool configured",
            reason=Reason.SKR_TOOL_MISSING,
            hint="pass --skr-tool PATH or set skr_tool in /etc/confinfer/*.toml",
        )
    if not tool.is_file() or not os.access(tool, os.X_OK):
        raise ConfigError(
            f"the key-release tool {tool} is not an executable file",
            reason=Reason.SKR_TOOL_MISSING,
            hint="build AzureAttestSKR and point --skr-tool at it",
        )
    return tool


def unwrap_dek(
    tool: Path,
    cfg: Config,
    key_id: str,
    wrapped_dek: bytes,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
) -> bytearray:
    """Run the tool to attest, release ``key_id`` and unwrap ``wrapped_dek``; the DEK.

    The caller zeroes the result. Errors: ConfigError ``skr-tool-missing``; KeyReleaseError
    ``skr-tool-failed`` (non-zero exit) or ``skr-tool-output``; ServiceError
    ``skr-tool-timeout``.
    """
    argv = command(resolve_tool(tool), cfg.maa_url, key_id, wrapped_dek)
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            timeout=timeout_s,
            check=False,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise ServiceError(
            f"{shown(argv)} did not finish within {timeout_s:g} s; stderr: "
            f"{_tail(exc.stderr or b'')}",
            reason=Reason.SKR_TOOL_TIMEOUT,
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot run {shown(argv)}: {exc.strerror}", reason=Reason.SKR_TOOL_MISSING
        ) from None
    if done.returncode != 0:
        raise KeyReleaseError(
            f"{shown(argv)} exited with status {done.returncode}; stderr: {_tail(done.stderr)}",
            reason=Reason.SKR_TOOL_FAILED,
            details={"exit_code": done.returncode},
            hint="rerun with SKR_TRACE_ON=1 in the environment for the tool's trace",
        )
    return parse_output(done.stdout)
