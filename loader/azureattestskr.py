"""Key release through an installed AzureAttestSKR, as the original tutorial does it.

For VMs that already ship Microsoft's ``AzureAttestSKR`` tool: it attests, releases the KEK and
unwraps the DEK itself, and we only run it::

    AzureAttestSKR -a <MAA URL> -k <KEK id> -c imds -s <base64(wrapped DEK)> -u

The key id is the one confinfer.keyvault.choose_key picked from the configuration (the package
may only select among configured keys); the MAA URL is ``maa_url``.

How the real tool behaves, and what we do about it (facts in docs/testbed.md §4.6):

- In ``-u`` mode it prints the unwrapped key raw, its trailing zero bytes stripped (it trims
  ``\0`` at the end of the decoded key), then a newline. :func:`parse_output` removes exactly one
  trailing newline and pads the key back to 32 bytes with zeros; base64 output (other builds)
  is read too. Without this, about one DEK in 256 (those ending in 0x00) would come back wrong.
- With ``SKR_TRACE_ON`` set it prints ``Tracing is enabled`` and its attestation library's log
  on standard output, before the key, which would corrupt it: the variable is removed from the
  tool's environment (run the tool by hand for a trace).
- It makes ``curl-ca-bundle.crt`` in its working directory: it runs in a private temporary one.

What of the configuration reaches the tool: ``maa_url`` and the key (flags), and
``managed_identity_client_id`` as ``IMDS_CLIENT_ID``, the variable the tool reads to pick a
managed identity. Nothing else can: the tool has the IMDS address, the vTPM (``/dev/tpmrm0``)
and the system CA bundle fixed in its code, so ``tpm_tcti``, ``imds_url``, ``ca_bundle`` and
``keyvault_release_ca_bundle`` do not apply to it (a warning says so when they are set). The
tool does not verify Key Vault's signature on the release; the native backend does, so prefer
that one where it can run.

A failure reports the command (the wrapped DEK shown by size only), the exit status and the
tail of the tool's standard error. Its standard output is never echoed: it may hold the key.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import shlex
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from confinfer.config import Config
from confinfer.errors import ConfigError, KeyReleaseError, Reason, ServiceError

LOG = logging.getLogger(__name__)

DEK_BYTES = 32
# The tool writes its trace to standard output when this is set: never pass it on.
TRACE_VARIABLES = frozenset({"SKR_TRACE_ON"})
# The variable the tool reads to pick one of several managed identities.
CLIENT_ID_VARIABLE = "IMDS_CLIENT_ID"
STDERR_TAIL_CHARS = 2000
DEFAULT_TIMEOUT_S = 300.0


def command(tool: Path, maa_url: str, key_id: str, wrapped_dek: bytes) -> list[str]:
    """The tool's argument vector for unwrapping ``wrapped_dek``."""
    return [
        str(tool),
        "-a",
        maa_url.rstrip("/"),
        "-k",
        key_id,
        "-c",
        "imds",
        "-s",
        base64.b64encode(wrapped_dek).decode("ascii"),
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
    """The DEK from the tool's standard output: raw bytes with trailing zeros stripped and one
    newline (padded back to 32 bytes here), or base64 of the 32 bytes. Text is never a key."""
    raw = stdout[:-1] if stdout.endswith(b"\n") else stdout
    if 0 < len(raw) <= DEK_BYTES and not _looks_like_text(raw):
        return bytearray(raw.ljust(DEK_BYTES, b"\0"))
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


# The tool's trace on stderr carries its access token and MAA token; neither may reach a log.
_CREDENTIALS = re.compile(
    r"(?i)\b(bearer\s+)\S+|\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*"
)


def _redacted(match: re.Match[str]) -> str:
    return f"{match.group(1) or ''}<redacted>"


def _tail(data: bytes) -> str:
    text = _CREDENTIALS.sub(_redacted, data.decode("utf-8", errors="replace")).strip()
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
    unused = [
        k
        for k in ("tpm_tcti", "imds_url", "ca_bundle", "keyvault_release_ca_bundle")
        if k in cfg.sources
    ]
    if unused:
        LOG.warning("AzureAttestSKR does not take %s; it uses its own defaults", ", ".join(unused))
    tool_env = {
        k: v for k, v in (os.environ if env is None else env).items() if k not in TRACE_VARIABLES
    }
    if cfg.managed_identity_client_id:
        tool_env[CLIENT_ID_VARIABLE] = cfg.managed_identity_client_id
    try:
        # The tool writes curl-ca-bundle.crt into its working directory: give it its own.
        with tempfile.TemporaryDirectory(prefix="azureattestskr-") as workdir:
            done = subprocess.run(
                argv,
                capture_output=True,
                timeout=timeout_s,
                check=False,
                env=tool_env,
                cwd=workdir,
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
            hint="for the tool's trace, run the command by hand with SKR_TRACE_ON=1 (it prints "
            "the trace on standard output)",
        )
    return parse_output(done.stdout)
