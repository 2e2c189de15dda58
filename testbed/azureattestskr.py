"""A stand-in for Microsoft's AzureAttestSKR, bound to one testbed directory.

AzureAttestSKR (Azure/confidential-computing-cvm-guest-attestation, ``cvm-securekey-release-app``:
``Main.cpp``, ``AttestationUtil.cpp``) attests the VM with MAA, takes a managed-identity token
from IMDS, has Key Vault release the key named by ``-k`` and then wraps, unwraps or just
releases. ``python -m testbed up`` writes ``DIR/bin/AzureAttestSKR``, which runs :func:`main`
with this testbed's directory. The stand-in keeps the real tool's command-line contract and
output quirks exactly, because its caller depends on them; the release itself it takes from the
testbed vault's key store on disk, after the checks the vault would make (it is the testbed:
no attestation is repeated).

Contract (facts from the real tool; ``Main.cpp`` and ``AttestationUtil.cpp`` at 990f662):

- ``getopt(argc, argv, "a:n:k:c:s:uwrB:H:G:")`` (GNU getopt: options may follow operands,
  operands are ignored); ``-u`` unwrap, ``-w`` wrap, ``-r`` release, ``-B`` batch unwrap, the
  last one given wins; ``-c imds|sp`` (anything else leaves IMDS); ``-H``/``-G`` the OAEP and
  MGF1 hashes of ``-u``/``-B`` (default sha256; MGF1 as ``-H``).
- An unknown option or one missing its value: GNU getopt's message on stderr, then the usage
  text on stdout, exit 1. No operation: the usage, exit 1.
- Exit codes (``AttestationUtil.h``): 0 ok, 1 usage or an unexpected exception, 2 attestation,
  3 IMDS/AAD token, 4 Key Vault HTTP error, 5 crypto, 6 transport; ``SKR_TRACE_ON`` other than
  empty, ``1`` or ``2`` exits 255 (``exit(-1)``) with ``Invalid value for SKR_TRACE_ON!``.
- Errors end with the exception's message on stderr (``Exception occured. Details: ...`` for
  unexpected ones).
- ``-u`` prints the unwrapped key followed by ``\\n``, its trailing zero bytes stripped
  (``Util::base64_decode`` trims ``\\0`` at the end); ``-w`` prints standard base64 and ``\\n``
  (OAEP SHA-256); ``-r`` prints nothing on stdout and ``The released key is of type RSA. ...``
  on stderr; ``-B`` prints ``{"results": [...]}`` indented by 2.
- With ``SKR_TRACE_ON=1`` or ``2``, ``Tracing is enabled`` and the attestation library's log
  lines (``Level: Info Tag: AttestatationClientLib ...``) go to STDOUT, before the key; the
  tool's own trace lines (``TRACE_OUT``) go to stderr; level 1 shortens logged secrets to 15 %.
- At start it makes ``curl-ca-bundle.crt`` in its working directory, a symlink to the first
  system CA bundle found, unless that name exists (``Info: created CA symlink ...`` on stderr).
- It reads these environment variables: ``SKR_TRACE_ON``; ``IMDS_CLIENT_ID``,
  ``IMDS_OBJECT_ID``, ``IMDS_MSI_RES_ID`` (which managed identity, in that order);
  ``AKV_SKR_CLIENT_ID``, ``AKV_SKR_CLIENT_SECRET``, ``AKV_SKR_TENANT_ID`` (``-c sp``); libcurl's
  proxy variables for MAA and Key Vault (IMDS is asked with the proxy off). The IMDS address,
  the TPM (``/dev/tpmrm0``) and the CA bundle are fixed in the code: no variable moves them.

The testbed's differences: Key Vault is the testbed vault (a key URL under its
``https://127.0.0.1:<port>`` is taken where the real tool wants ``vault.azure.net`` or
``managedhsm.azure.net`` in it); MAA is the testbed MAA (``-a`` must name it; the real default
``https://sharedweu.weu.attest.azure.net/`` is unreachable here); the key comes from
``DIR/keyvault/keys.json``; ``-c sp`` cannot reach Entra ID. Each run appends one JSON line to
``DIR/run/azureattestskr.log``: argv (``-s`` values replaced by their length), the variables
above that were set (secrets by length) and the names of other variables a caller might expect
it to read (it does not). The ``azureattestskr`` fault knob (testbed.faults) makes it sleep
(``latency_s``), fail as a Key Vault HTTP error (``status``: exit 4, a traced transcript on
stderr) or fail in transport (``down``: exit 6).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from testbed import imds, keyvault, releasepolicy
from testbed.env import RUN_DIR, ProcessRecord, RunRecords
from testbed.faults import Faults
from testbed.identities import ADMINISTRATOR, RELEASE_USER, Identities, Identity
from testbed.keystore import NAME_RE, KeyStore, KeyVersion
from testbed.pki import load_pair

OPTSTRING = "a:n:k:c:s:uwrB:H:G:"
LOG_FILE = "azureattestskr.log"
FAULT = "azureattestskr"
DEFAULT_ATTESTATION_URL = "https://sharedweu.weu.attest.azure.net/"
DEFAULT_NONCE = "ADE0101"
AKV_URL_SUFFIX = "vault.azure.net"
MHSM_URL_SUFFIX = "managedhsm.azure.net"
AKV_RESOURCE_URL = "https://vault.azure.net"
MHSM_RESOURCE_URL = "https://managedhsm.azure.net"
IMDS_TOKEN_URL = "http://169.254.169.254/metadata/identity/oauth2/token"  # noqa: S105 - a URL
SKR_API_VERSION = "7.3"
CA_BUNDLE_NAME = "curl-ca-bundle.crt"
CA_CANDIDATES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian / Ubuntu
    "/etc/pki/tls/certs/ca-bundle.crt",  # RHEL / Fedora / CentOS
    "/etc/ssl/ca-bundle.pem",  # SUSE
    "/etc/pki/tls/cacert.pem",  # older RHEL
    "/etc/ssl/cert.pem",  # Alpine / macOS
)

EXIT_OK, EXIT_USAGE, EXIT_ATTEST_FAIL, EXIT_AUTH_FAIL = 0, 1, 2, 3
EXIT_SKR_FAIL, EXIT_CRYPTO_FAIL, EXIT_NETWORK_FAIL = 4, 5, 6
EXIT_BAD_TRACE = 255  # exit(-1)

# Operation and AkvCredentialSource as the real tool numbers them in its trace lines.
OP_NONE, OP_WRAP, OP_UNWRAP, OP_BATCH, OP_RELEASE = 0, 1, 2, 3, 4
CRED_IMDS, CRED_SP = 0, 1

# What the real tool (and its attestation library and libcurl) read from the environment.
ENV_READ = (
    "SKR_TRACE_ON",
    "IMDS_CLIENT_ID",
    "IMDS_OBJECT_ID",
    "IMDS_MSI_RES_ID",
    "AKV_SKR_CLIENT_ID",
    "AKV_SKR_CLIENT_SECRET",
    "AKV_SKR_TENANT_ID",
    "http_proxy",
    "https_proxy",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "no_proxy",
    "NO_PROXY",
)
ENV_SECRET = frozenset({"AKV_SKR_CLIENT_SECRET"})
# Variables a caller might hope redirect the tool; the real one reads none of them. Their
# names (never values) are logged when set, so a test can see what was passed in vain.
ENV_NOT_READ = (
    "CURL_CA_BUNDLE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "TPM2TOOLS_TCTI",
    "TSS2_TCTI",
    "TCTI",
    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
    "IMDS_ENDPOINT",
    "IDENTITY_ENDPOINT",
    "MSI_ENDPOINT",
    "AZURE_CLIENT_ID",
    "CONFINFER_TPM_TCTI",
    "CONFINFER_IMDS_URL",
    "CONFINFER_CA_BUNDLE",
    "CONFINFER_MAA_URL",
    "CONFINFER_KEYVAULT_URL",
)

USAGE = """Usage: 
\tRelease RSA or EC key:
\t\t{p} -a <attestation-endpoint> -n <optional-nonce> -k KeyURL -c (imds|sp) -r 

\tRelease RSA key and wrap symmetric key:
\t\t{p} -a <attestation-endpoint> -n <optional-nonce> -k KEYURL -c (imds|sp) -s symkey -w 

\tRelease RSA key and unwrap symmetric key:
\t\t{p} -a <attestation-endpoint> -n <optional-nonce> -k KEYURL -c (imds|sp) -s base64(wrappedSymKey) -u [-H oaep_hash] [-G mgf1_hash]

\tBatch unwrap from JSON file (one SKR, many unwraps):
\t\t{p} -a <attestation-endpoint> -n <optional-nonce> -k KEYURL -c (imds|sp) -B <json-file|-|inline> [-H oaep_hash] [-G mgf1_hash]

\tBatch JSON format (input):
\t  {{ "keys": [ {{ "id": "label", "wrapped": "base64..." }}, ... ] }}
\tBatch JSON format (output on stdout):
\t  {{ "results": [ {{ "id": "label", "unwrapped": "plaintext" }}, ... ] }}

\tHash algorithm options (for -u/-B unwrap only):
\t\t-H <hash>  OAEP hash algorithm: sha1, sha256, sha384, sha512 (default: sha256)
\t\t-G <hash>  MGF1 hash algorithm: sha1, sha256, sha384, sha512 (default: same as -H)
"""  # noqa: W291, E501 - the real usage text, trailing blanks included

_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
_B64_ALPHABET = re.compile(r"[A-Za-z0-9+/]*")


class SkrError(Exception):
    """skr_error: a message and the exit code it ends the tool with."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Unexpected(Exception):  # std::exception in the real tool
    """A std::exception that is not an skr_error: ``Exception occured. Details: ...``, exit 1."""


# --- getopt ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Opt:
    letter: str
    value: str | None = None
    index: int = -1  # argv index holding the value
    offset: int = 0  # where the value starts in that argument
    error: str | None = None  # GNU getopt's complaint, for '?'


def getopt(argv: Sequence[str], spec: str = OPTSTRING) -> list[Opt]:
    """GNU getopt(3) over ``argv[1:]``: options in order (operands skipped, ``--`` ends them,
    POSIXLY_CORRECT stops at the first operand); an Opt with ``letter == "?"`` where GNU
    getopt returns '?'. Scanning goes on past errors so that every value is known."""
    prog = argv[0] if argv else "AzureAttestSKR"
    takes = {c: spec[i + 1 : i + 2] == ":" for i, c in enumerate(spec) if c != ":"}
    posix = "POSIXLY_CORRECT" in os.environ
    out: list[Opt] = []
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            break
        if arg.startswith("--"):
            name = arg[2:].split("=", 1)[0]
            out.append(Opt("?", error=f"{prog}: unrecognized option '--{name}'"))
            i += 1
            continue
        if not arg.startswith("-") or arg == "-":
            if posix:
                break
            i += 1
            continue
        j = 1
        while j < len(arg):
            letter = arg[j]
            if letter not in takes:
                out.append(Opt("?", error=f"{prog}: invalid option -- '{letter}'"))
                j += 1
                continue
            if not takes[letter]:
                out.append(Opt(letter))
                j += 1
                continue
            if j + 1 < len(arg):
                out.append(Opt(letter, arg[j + 1 :], i, j + 1))
            elif i + 1 < len(argv):
                i += 1
                out.append(Opt(letter, argv[i], i, 0))
            else:
                out.append(Opt("?", error=f"{prog}: option requires an argument -- '{letter}'"))
            break
        i += 1
    return out


def redacted_argv(argv: Sequence[str], opts: Sequence[Opt]) -> list[str]:
    """``argv[1:]`` with every ``-s`` value replaced by ``<N chars>``."""
    out = list(argv)
    for opt in opts:
        if opt.letter == "s" and opt.value is not None and opt.index > 0:
            out[opt.index] = out[opt.index][: opt.offset] + f"<{len(opt.value)} chars>"
    return out[1:]


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Testbed:
    """What the stand-in knows of its testbed: where things are, and the live URLs."""

    directory: Path

    def services(self) -> dict[str, Any] | None:
        """The services' record, when the services process is alive."""
        info = RunRecords(self.directory).services()
        if info is None:
            return None
        pid = info.get("pid")
        record = next(
            (
                r
                for r in RunRecords(self.directory).processes()
                if r.name == "services" and r.pid == pid
            ),
            None,
        )
        alive = (
            record.alive()
            if record is not None
            else (isinstance(pid, int) and ProcessRecord.of("services", pid).alive())
        )
        return info if alive else None

    @property
    def log_path(self) -> Path:
        return self.directory / RUN_DIR / LOG_FILE


@dataclass
class Out:
    """The tool's two streams and its trace switch."""

    stdout: BinaryIO
    stderr: BinaryIO
    trace_level: int = 0  # 0 off, 1 (secrets shortened), 2
    transcript: list[str] = field(default_factory=list)  # every trace line, traced or not

    def err(self, line: str) -> None:
        self.stderr.write(line.encode("utf-8", "replace") + b"\n")

    def out(self, data: bytes) -> None:
        self.stdout.write(data)

    def trace(self, line: str) -> None:
        """TRACE_OUT: the tool's own trace, on stderr."""
        self.transcript.append(line)
        if self.trace_level:
            self.err(line)

    def replay(self) -> None:
        """A failing run reported as a traced one: the trace lines so far, on stderr, unless
        they were written already; tracing on from here."""
        if not self.trace_level:
            for line in self.transcript:
                self.err(line)
            self.trace_level = 2

    def library(self, function: str, line: int, message: str, level: str = "Info") -> None:
        """The attestation library's log (Logger::Log): printf, i.e. STDOUT."""
        if self.trace_level:
            self.out(
                f"Level: {level} Tag: AttestatationClientLib {function}:{line}:{message}\n".encode(
                    "utf-8", "replace"
                )
            )

    def reduct(self, text: str) -> str:
        """Util::reduct_log: at level 1, 15 % of a string (all of it when it says "error")."""
        if self.trace_level != 1 or "error" in text.lower():
            return text
        keep = int(len(text) * 0.15)
        return text[:keep] + "..." if len(text) > keep else text


@dataclass
class Args:
    attestation_url: str = ""
    nonce: str = ""
    key_url: str = ""
    sym_key: str = ""
    batch_input: str = ""
    oaep_hash: str = "sha256"
    mgf1_hash: str = ""
    op: int = OP_NONE
    credential: int = CRED_IMDS
    opts: list[Opt] = field(default_factory=list)


def _log_run(bed: Testbed, argv: Sequence[str], opts: Sequence[Opt]) -> None:
    env: dict[str, str] = {}
    for name in ENV_READ:
        value = os.environ.get(name)
        if value is not None:
            env[name] = f"<{len(value)} chars>" if name in ENV_SECRET else value
    entry = {
        "time": round(time.time(), 3),
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "argv0": argv[0] if argv else "",
        "argv": redacted_argv(argv, opts),
        "env": env,
        "env_not_read": [n for n in ENV_NOT_READ if n in os.environ],
    }
    bed.log_path.parent.mkdir(parents=True, exist_ok=True)
    with bed.log_path.open("a", encoding="utf-8") as log:
        log.write(json.dumps(entry, sort_keys=True) + "\n")


def _ensure_ca_bundle(out: Out) -> None:
    """Main.cpp ensure_ca_bundle(): ``./curl-ca-bundle.crt`` -> the first system bundle."""
    if os.path.exists(CA_BUNDLE_NAME):
        return
    for candidate in CA_CANDIDATES:
        if os.path.isfile(candidate):
            try:
                os.symlink(candidate, CA_BUNDLE_NAME)
            except OSError:
                return
            out.err(f"Info: created CA symlink ./{CA_BUNDLE_NAME} -> {candidate}")
            return


def _parse(argv: Sequence[str], out: Out) -> Args | int:
    args = Args(opts=getopt(argv))
    for opt in args.opts:
        value = opt.value or ""
        if opt.letter == "?":
            out.err(opt.error or "")
            out.out(USAGE.format(p=argv[0] if argv else "AzureAttestSKR").encode())
            return EXIT_USAGE
        if opt.letter == "a":
            args.attestation_url = value
            out.trace(f"attestation_url: {value}")
        elif opt.letter == "n":
            args.nonce = value
            out.trace(f"nonce: {value}")
        elif opt.letter == "k":
            args.key_url = value
            out.trace(f"key_enc_key_url: {value}")
        elif opt.letter == "c":
            if value == "imds":
                args.credential = CRED_IMDS
            elif value == "sp":
                args.credential = CRED_SP
            out.trace(f"akv_credential_source: {args.credential}")
        elif opt.letter in "uwr":
            args.op = {"u": OP_UNWRAP, "w": OP_WRAP, "r": OP_RELEASE}[opt.letter]
            out.trace(f"op: {args.op}")
        elif opt.letter == "s":
            args.sym_key = value
            out.trace(f"sym_key: {value}")
        elif opt.letter == "B":
            args.batch_input = value
            args.op = OP_BATCH
            out.trace(f"op: BatchUnwrap, input: {value}")
        elif opt.letter == "H":
            args.oaep_hash = value
            out.trace(f"oaep_hash: {value}")
        elif opt.letter == "G":
            args.mgf1_hash = value
            out.trace(f"mgf1_hash: {value}")
    return args


def main(
    argv: Sequence[str] | None = None,
    *,
    testbed_dir: str | Path,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
) -> int:
    """Run the stand-in with ``argv`` (``argv[0]`` the program name); returns its exit code."""
    argv = list(sys.argv if argv is None else argv)
    out = Out(stdout or sys.stdout.buffer, stderr or sys.stderr.buffer)
    bed = Testbed(Path(testbed_dir))
    try:
        _log_run(bed, argv, getopt(argv))
        _ensure_ca_bundle(out)
        trace = os.environ.get("SKR_TRACE_ON")
        if trace:
            if trace not in ("1", "2"):
                out.err("Invalid value for SKR_TRACE_ON!")
                return EXIT_BAD_TRACE
            out.out(b"Tracing is enabled\n")
            out.trace_level = int(trace)
        out.trace("Main started")
        parsed = _parse(argv, out)
        if isinstance(parsed, int):
            return parsed
        return _run(bed, parsed, out, argv[0] if argv else "AzureAttestSKR")
    finally:
        out.stdout.flush()
        out.stderr.flush()


def _run(bed: Testbed, args: Args, out: Out, prog: str) -> int:
    try:
        if args.op == OP_UNWRAP:
            out.out(unwrap_key(bed, args, out) + b"\n")
        elif args.op == OP_WRAP:
            out.out(wrap_key(bed, args, out).encode("ascii") + b"\n")
        elif args.op == OP_BATCH:
            batch = _read_batch(args.batch_input)
            if batch is None:
                out.err(f"Failed to open batch JSON file: {args.batch_input}")
                return EXIT_USAGE
            out.out(unwrap_batch(bed, args, batch, out).encode("utf-8") + b"\n")
        elif args.op == OP_RELEASE:
            out.trace("Entering Util::ReleaseKey()")
            release(bed, args, out)
            out.trace("Key release completed successfully.")
            out.err(
                "The released key is of type RSA. It can be used for wrapKey/unwrapKey operations."
            )
        else:
            out.out(USAGE.format(p=prog).encode())
            return EXIT_USAGE
    except SkrError as exc:
        out.err(exc.message)
        return exc.code
    except Unexpected as exc:
        out.err(f"Exception occured. Details: {exc}")
        return EXIT_USAGE
    return EXIT_OK


def _read_batch(source: str) -> str | None:
    if source == "-":
        return sys.stdin.read()
    if source.startswith("{"):
        return source
    try:
        return Path(source).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError:
        return None


# --- doSKR: attestation, token, release -------------------------------------------------------


def _throw(out: Out, code: int, function: str, line: int, message: str) -> SkrError:
    """THROW_SKR_ERROR: the message with its source location on stderr, then the error."""
    out.err(f"Error occured in AttestationUtil.cpp:{function} on line {line}. Msg={message}")
    return SkrError(code, message)


def _loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def _transport_error(url: str, what: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if _loopback(host):
        return (
            f"{what} curl_easy_perform() failed: Couldn't connect to server (Failed to "
            f"connect to {host} port {port} after 0 ms: Couldn't connect to server)"
        )
    return (
        f"{what} curl_easy_perform() failed: Couldn't resolve host name (Could not "
        f"resolve host: {host})"
    )


def attest(bed: Testbed, args: Args, out: Out) -> dict[str, Any]:
    """Util::GetMAAToken: the attestation must reach the testbed's MAA; returns its services'
    record (the stand-in makes no token: the key is released from disk)."""
    out.trace("Entering Util::GetMAAToken()")
    url = args.attestation_url or DEFAULT_ATTESTATION_URL
    out.library("Attest", 136, f"Attestation URL - {url}")
    info = bed.services()
    maa = str((info or {}).get("urls", {}).get("maa", ""))
    if info is None or url.rstrip("/") != maa:
        parts = urlsplit(url)
        reason = (
            "Couldn't connect to server"
            if info is None or _loopback(parts.hostname or "")
            else "Couldn't resolve host name"
        )
        description = f"Failed sending curl request with error:{reason}"
        out.library("sendAttestationRequest", 535, description, level="Error")
        out.err(f"MAA attestation failed: error code -7, description: {description}")
        raise SkrError(EXIT_ATTEST_FAIL, f"MAA attestation failed: {description}")
    out.library("GetOSInfo", 645, "Retrieving OS Info")
    out.library("GetIsolationInfo", 714, "Retrieving Isolation Info")
    out.library("DecryptMaaToken", 414, "Successfully Decrypted inner key")
    out.library("Attest", 201, "Successfully attested and decrypted response.")
    out.trace("MAA attestation succeeded, is_cvm=1 (the testbed stand-in keeps no token)")
    out.trace("Exiting Util::GetMAAToken()")
    return info


def _resource(bed_vault: str, key_url: str, out: Out) -> str:
    """getResourceUrl, plus the testbed's vault (which has neither suffix in its URL)."""
    if AKV_URL_SUFFIX in key_url:
        out.trace("AKV resource suffix found in KEKUrl")
        return AKV_RESOURCE_URL
    if MHSM_URL_SUFFIX in key_url:
        out.trace("MHSM resource suffix found in KEKUrl")
        return MHSM_RESOURCE_URL
    if bed_vault and key_url.startswith(bed_vault + "/"):
        out.trace("AKV resource suffix found in KEKUrl (the testbed vault)")
        return AKV_RESOURCE_URL
    raise _throw(
        out,
        EXIT_USAGE,
        "getResourceUrl",
        245,
        f"Invalid resource suffix found in KEKUrl: {key_url}",
    )


def _identity(identities: Identities, out: Out) -> Identity:
    """Which managed identity: IMDS_CLIENT_ID, else IMDS_OBJECT_ID, else IMDS_MSI_RES_ID."""
    selector: dict[str, str] = {}
    for var, param in (
        ("IMDS_CLIENT_ID", "client_id"),
        ("IMDS_OBJECT_ID", "object_id"),
        ("IMDS_MSI_RES_ID", "msi_res_id"),
    ):
        value = os.environ.get(var)
        if value:
            selector = {param: value}
            break
    shown = "".join(f"&{k}={v}" for k, v in selector.items())
    out.trace(
        f"IMDS token URL: {IMDS_TOKEN_URL}?api-version=2018-02-01&resource="
        f"https%3A%2F%2Fvault.azure.net{shown}"
    )
    identity = identities.select(**selector)
    if identity is None:
        body = json.dumps({"error": "invalid_request", "error_description": "Identity not found"})
        out.trace(f"IMDS HTTP status: 400, Response: {body}")
        raise SkrError(EXIT_AUTH_FAIL, "IMDS token request failed: HTTP 400: Identity not found")
    return identity


def _vault_error(status: int, code: str, message: str, inner: str | None = None) -> SkrError:
    body = json.dumps(keyvault._error_body(status, code, message, inner), separators=(",", ":"))
    return SkrError(EXIT_SKR_FAIL, f"SKR HTTP request failed: HTTP {status}: {body}")


def _release_from_store(
    bed: Testbed, info: dict[str, Any], identity: Identity, key_url: str
) -> KeyVersion:
    """What the vault answers ``POST <key_url>/release`` with: the key, or its refusal."""
    vault_url = str(info["urls"]["keyvault"])
    if not key_url.startswith(vault_url + "/"):
        raise SkrError(EXIT_NETWORK_FAIL, _transport_error(key_url, "SKR"))
    path = key_url[len(vault_url) :] + "/release"
    route = keyvault._route("POST", urlsplit(path).path)
    if route is None or route[0] != "release":
        raise _vault_error(404, "NotFound", f"No operation POST {path} on this vault.")
    _, name, version = route
    if not NAME_RE.match(name):
        raise _vault_error(400, "BadParameter", f"The request URI contains an invalid name: {name}")
    if not {RELEASE_USER, ADMINISTRATOR} & set(identity.roles):
        held = ", ".join(identity.roles) or "none"
        raise _vault_error(
            403,
            "Forbidden",
            f"Caller is not authorized to perform action on resource. Caller: "
            f"appid={identity.client_id};oid={identity.object_id} ({identity.principal_name}). "
            f"Action: '{keyvault.OPERATIONS['release'].action}'. Resource: '{vault_url}/keys/"
            f"{name}'. Missing role: {keyvault.OPERATIONS['release'].roles_named} (roles held: "
            f"{held}).",
            "ForbiddenByRbac",
        )
    kv = KeyStore(bed.directory / "keyvault").get(name, version)
    if kv is None:
        shown = f"{name}/{version}" if version else name
        raise _vault_error(
            404,
            "KeyNotFound",
            f"A key with (name/id) {shown} was not found in "
            "this key vault. If you recently deleted this key you may be able to "
            "recover it using the correct recovery command.",
        )
    if not kv.exportable or kv.release_policy is None:
        raise _vault_error(
            403,
            "Forbidden",
            f"Key {kv.name}/{kv.version} is not exportable: it cannot be released.",
            "KeyNotExportable",
        )
    try:
        keyvault._usable(kv, "release")
    except keyvault.VaultError as exc:
        raise _vault_error(exc.status, exc.code, exc.message, exc.inner) from None
    policy = releasepolicy.parse(kv.release_policy.data)
    issuer = str(info["urls"]["maa"])
    if not policy.authorities_for(issuer):
        known = ", ".join(a.authority for a in policy.authorities)
        raise _vault_error(
            403,
            "Forbidden",
            f"the attestation token's issuer {issuer!r} is not "
            f"an authority of the key's release policy ({known})",
            "UntrustedAuthority",
        )
    return kv


def _apply_fault(bed: Testbed, args: Args, out: Out, request_uri: str, token: str) -> None:
    fault = Faults(bed.directory / "faults.json").take(FAULT)
    if fault is None:
        return
    if fault.latency_s > 0:
        time.sleep(fault.latency_s)
    if not fault.down and fault.status is None:
        return
    # A failing run reports itself as a traced run does: its trace lines, then the error.
    out.replay()
    nonce = args.nonce or DEFAULT_NONCE
    body = f'{{"nonce": "{nonce}","target": "<MAA token>","enc": "RSA_AES_KEY_WRAP_256"}}'
    out.trace("Entering Util::GetKeyVaultResponse()")
    out.trace("SKR wrapping algorithm: RSA_AES_KEY_WRAP_256 (RSA-OAEP-SHA256)")
    out.trace(f"SKR request URI: {request_uri}")
    out.trace(f"SKR request body length: {len(body)}, target (attestation_token) length: 11")
    out.trace(f"SKR request body prefix: {body[:200]}")
    out.trace("Entering GetKeyVaultResponseCurl()")
    out.trace(f"Bearer token: {out.reduct('Authorization: Bearer ' + token)}")
    if fault.down:
        raise SkrError(EXIT_NETWORK_FAIL, _transport_error(request_uri, "SKR"))
    status = int(fault.status or 500)
    reply = json.dumps(keyvault._fault_body(status), separators=(",", ":"))
    out.trace(f"SKR HTTP status: {status}, response: {reply}")
    raise SkrError(EXIT_SKR_FAIL, f"SKR HTTP request failed: HTTP {status}: {reply}")


def do_skr(bed: Testbed, args: Args, out: Out) -> KeyVersion:
    """Util::doSKR: attest, take a token, have the vault release the key; the released key."""
    out.trace("Entering Util::doSKR()")
    info = attest(bed, args, out)
    out.trace("MAA Token: <stand-in: none>")
    vault_url = str(info["urls"]["keyvault"])
    identities = Identities.load(bed.directory)
    if args.credential == CRED_SP:
        out.trace("Entering Util::GetAADToken()")
        if not all(
            os.environ.get(v)
            for v in ("AKV_SKR_CLIENT_ID", "AKV_SKR_CLIENT_SECRET", "AKV_SKR_TENANT_ID")
        ):
            raise SkrError(
                EXIT_AUTH_FAIL,
                "AAD service principal env vars not set. Need "
                "AKV_SKR_CLIENT_ID, AKV_SKR_CLIENT_SECRET, AKV_SKR_TENANT_ID",
            )
        _resource(vault_url, args.key_url, out)
        tenant = os.environ["AKV_SKR_TENANT_ID"]
        raise SkrError(
            EXIT_NETWORK_FAIL,
            _transport_error(
                f"https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token", "AAD"
            ),
        )
    out.trace("Entering Util::GetIMDSToken()")
    resource = _resource(vault_url, args.key_url, out)
    identity = _identity(identities, out)
    token, _ = imds.access_token_signed_by(
        load_pair(bed.directory / "pki", "aad_signing"),
        identities,
        identity,
        resource,
        imds.DEFAULT_LIFETIME_S,
    )
    out.trace("IMDS HTTP status: 200, Response: <token response>")
    out.trace(f"Access Token: {out.reduct(token)}")
    out.trace("Exiting Util::GetIMDSToken()")
    out.trace(f"AkvMsiAccessToken: {out.reduct(token)}")
    request_uri = f"{args.key_url}/release?api-version={SKR_API_VERSION}"
    out.trace("Entering Util::GetKeyVaultSKRurl()")
    out.trace(f"Request URI: {request_uri}")
    out.trace("Exiting Util::GetKeyVaultSKRurl()")
    _apply_fault(bed, args, out, request_uri, token)
    if bed.services() is None:
        raise SkrError(EXIT_NETWORK_FAIL, _transport_error(request_uri, "SKR"))
    kv = _release_from_store(bed, info, identity, args.key_url)
    out.trace("SKR HTTP status: 200, response: <the release JWS>")
    out.trace("TPM decrypt: RSA-OAEP with SHA-256 (matching RSA_AES_KEY_WRAP_256)")
    out.trace(f"CMK private key has length={len(kv.pkcs8_der())}")
    out.trace("Parsed private key: type=6")
    out.trace("Exiting Util::doSKR()")
    return kv


# --- the operations --------------------------------------------------------------------------


def release(bed: Testbed, args: Args, out: Out) -> KeyVersion:
    return do_skr(bed, args, out)


def boost_base64(text: str) -> bytes:
    """Util::base64_to_binary: '=' dropped anywhere, then floor(6n/8) bytes; a character
    outside the base64 alphabet (whitespace included) is an error."""
    data = text.replace("=", "")
    if not _B64_ALPHABET.fullmatch(data):
        raise Unexpected("attempt to decode a value not in base64 char set")
    length = len(data) * 6 // 8
    padded = data + "A" * (-len(data) % 4)
    try:
        return base64.b64decode(padded, validate=True)[:length]
    except binascii.Error:
        raise Unexpected("attempt to decode a value not in base64 char set") from None


def _hash(name: str) -> hashes.HashAlgorithm:
    """get_evp_md_by_name: case-insensitive, dashes ignored."""
    key = name.lower().replace("-", "")
    if key not in _HASHES:
        raise Unexpected(
            f"Unsupported hash algorithm: {name}. Supported: sha1, sha256, sha384, sha512"
        )
    return _HASHES[key]()


def _oaep(oaep_hash: str, mgf1_hash: str) -> tuple[padding.OAEP, str, str]:
    oaep = _hash(oaep_hash)
    mgf1 = _hash(mgf1_hash) if mgf1_hash else oaep
    return (
        padding.OAEP(mgf=padding.MGF1(mgf1), algorithm=oaep, label=None),
        oaep.name.upper(),
        mgf1.name.upper(),
    )


def _openssl_failure(out: Out) -> SkrError:
    """handle_openssl_errors: ERR_print_errors_fp empties the queue, so the message is bare."""
    out.err(
        f"{os.getpid():X}0000:error:02000079:rsa routines:"
        "RSA_padding_check_PKCS1_OAEP_mgf1:oaep decoding error:crypto/rsa/rsa_oaep.c:341:"
    )
    return SkrError(EXIT_CRYPTO_FAIL, "OpenSSL error: ")


def unwrap_key(bed: Testbed, args: Args, out: Out) -> bytes:
    """-u: the plaintext of ``-s`` under the released key, trailing zero bytes stripped."""
    out.trace("Entering Util::UnwrapKey()")
    out.trace(f"  OAEP hash: {args.oaep_hash}, MGF1 hash: {args.mgf1_hash or args.oaep_hash}")
    kv = do_skr(bed, args, out)
    out.trace("Key release completed successfully. EVP_PKEY_base_id=6")
    out.trace(f"Unwrapping: {args.sym_key}")
    wrapped = boost_base64(args.sym_key)
    size = kv.private_key.key_size // 8
    out.trace(f"RSA key size={size} bytes, wrapped_key decoded size={len(wrapped)} bytes")
    if len(wrapped) != size:
        out.trace(
            f"WARNING: wrapped_key size ({len(wrapped)}) != RSA key size ({size}). "
            "Possible base64 or key-size mismatch."
        )
    pad, oaep_name, mgf1_name = _oaep(args.oaep_hash, args.mgf1_hash)
    out.trace("Entering rsa_decrypt()")
    out.trace(f"  OAEP hash: {oaep_name}, MGF1 hash: {mgf1_name}")
    try:
        plain = kv.private_key.decrypt(wrapped, pad)
    except ValueError:
        raise _openssl_failure(out) from None
    out.trace("Exiting rsa_decrypt()")
    out.trace(f"Unwrapping the symmetric key succeeded: decrypted_length={len(plain)}d")
    out.trace(
        "Unwrapped symmetric key in base64: " + out.reduct(base64.b64encode(plain).decode("ascii"))
    )
    out.trace("Exiting Util::UnwrapKey()")
    return plain.rstrip(b"\0")


def wrap_key(bed: Testbed, args: Args, out: Out) -> str:
    """-w: ``-s`` (the argument's bytes) under the released key, RSA-OAEP SHA-256, base64."""
    out.trace("Entering Util::WrapKey()")
    kv = do_skr(bed, args, out)
    out.trace("Key release completed successfully. EVP_PKEY_base_id=6")
    out.trace(f"Wrapping: {out.reduct(args.sym_key)}")
    data = os.fsencode(args.sym_key)
    out.trace("Entering rsa_encrypt()")
    try:
        wrapped = kv.private_key.public_key().encrypt(
            data,
            padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None),
        )
    except ValueError:
        out.err(
            f"{os.getpid():X}0000:error:0200006E:rsa routines:"
            "RSA_padding_add_PKCS1_OAEP_mgf1_ex:data too large for key size:"
            "crypto/rsa/rsa_oaep.c:88:"
        )
        raise SkrError(EXIT_CRYPTO_FAIL, "OpenSSL error: ") from None
    out.trace("Exiting rsa_encrypt()")
    text = base64.b64encode(wrapped).decode("ascii")
    out.trace(f"Wrapping the symmetric key succeeded: encrypted_length={len(wrapped)}")
    out.trace(f"Wrapped symmetric key in base64: {out.reduct(text)}")
    out.trace("Exiting Util::WrapKey()")
    return text


def _json_string(data: bytes) -> str:
    """nlohmann::json::dump refuses a string that is not UTF-8 (type_error.316)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Unexpected(
            f"[json.exception.type_error.316] invalid UTF-8 byte at index "
            f"{exc.start}: 0x{data[exc.start]:02X}"
        ) from None


def unwrap_batch(bed: Testbed, args: Args, batch: str, out: Out) -> str:
    """-B: one release, then each ``{"id", "wrapped"}`` unwrapped (or its error)."""
    out.trace("Entering Util::UnwrapKeyBatch()")
    out.trace(f"  OAEP hash: {args.oaep_hash}, MGF1 hash: {args.mgf1_hash or args.oaep_hash}")
    try:
        doc = json.loads(batch)
    except ValueError as exc:
        raise SkrError(
            EXIT_USAGE,
            "UnwrapKeyBatch: Invalid JSON input: "
            f"[json.exception.parse_error.101] parse error: {exc}",
        ) from None
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list):
        raise SkrError(EXIT_USAGE, 'UnwrapKeyBatch: JSON must contain a "keys" array')
    out.trace(f"Batch contains {len(keys)} keys to unwrap")
    kv = do_skr(bed, args, out)
    out.trace("Key release completed successfully. EVP_PKEY_base_id=6")
    pad, _, _ = _oaep(args.oaep_hash, args.mgf1_hash)
    results: list[dict[str, str]] = []
    for i, entry in enumerate(keys):
        if not isinstance(entry, dict):
            raise Unexpected(
                "[json.exception.type_error.306] cannot use value() with "
                + {list: "array", str: "string", bool: "boolean"}.get(
                    type(entry), "number" if entry is not None else "null"
                )
            )
        ident = entry.get("id", str(i))
        if not isinstance(ident, str):
            raise Unexpected(
                "[json.exception.type_error.302] type must be string, but is "
                + ("number" if isinstance(ident, int | float) else "object")
            )
        result: dict[str, str] = {"id": ident}
        try:
            wrapped = entry.get("wrapped")
            if not isinstance(wrapped, str):
                raise ValueError('missing or invalid "wrapped" field')
            try:
                data = boost_base64(wrapped)
            except Unexpected as exc:
                raise ValueError(str(exc)) from None
            try:
                plain = kv.private_key.decrypt(data, pad)
            except ValueError:
                raise ValueError("EVP_PKEY_decrypt failed") from None
            result["unwrapped"] = _json_string(plain.rstrip(b"\0"))
        except ValueError as exc:
            result["error"] = str(exc)
            out.trace(f"Key [{ident}] failed: {exc}")
        results.append(result)
    out.trace("Exiting Util::UnwrapKeyBatch()")
    return json.dumps({"results": results}, indent=2, sort_keys=True, ensure_ascii=False)


if __name__ == "__main__":
    directory = os.environ.get("CONFINFER_TESTBED_DIR")
    if not directory:
        sys.stderr.write(
            "testbed.azureattestskr: run DIR/bin/AzureAttestSKR, or set CONFINFER_TESTBED_DIR\n"
        )
        sys.exit(EXIT_USAGE)
    sys.exit(main(sys.argv, testbed_dir=directory))
