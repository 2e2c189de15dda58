"""The command line of NVIDIA's ``nvattest`` 1.2.x, as its CLI11 parser takes it.

Facts (``NVIDIA/attestation-sdk``: ``nv-attestation-cli/src/{main,attest,utils}.cpp``; CLI11):

- global options ``--log-level,-l`` (env ``NVAT_LOG_LEVEL``, default ``info``) and
  ``--format,-f`` (env ``NVAT_FORMAT``, default ``text``), accepted after a subcommand too
  (``fallthrough``); subcommands ``version``, ``attest``, ``collect-evidence``; none: help, exit 0;
- ``attest`` and ``collect-evidence`` take the evidence options (``--nonce``, ``--device,-d``,
  ``--gpu-evidence-source``, ``--gpu-architecture``, ``--gpu-evidence-file``,
  ``--nvswitch-evidence-source``, ``--nvswitch-evidence-file``); ``attest`` also the
  verification options (``--verifier``, ``--relying-party-policy``, ``--rim-store``,
  ``--rim-url``, ``--rim-dir``, ``--ocsp-url``, ``--nras-url``, ``--service-key``) and the
  ``--[no-]verify-rim-signatures`` / ``--[no-]verify-rim-cert-chain`` flags. The 2.x options
  (``--tls-ca-cert``, ``--tls-ca-path``, ``--ocsp-cert-id-hash``) do not exist in 1.2.x;
- a parse error prints CLI11's message and ``Run with --help for more information.`` on stderr
  and exits with CLI11's code: 105 ValidationError (a value outside its set, a missing file or
  directory), 109 ExtrasError (an unknown option or argument), 114 ArgumentMismatch (an option
  without its value, or given twice). The exact CLI11 wording of 114 is [U].
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

EXIT_VALIDATION = 105
EXIT_EXTRAS = 109
EXIT_ARGUMENT_MISMATCH = 114


class CliError(Exception):
    """A CLI11 parse error: its message and exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


@dataclass(frozen=True)
class Spec:
    names: tuple[str, ...]  # "--long" first, then short ones
    dest: str
    default: str | bool
    choices: tuple[str, ...] = ()
    env: str | None = None
    flag: bool = False  # a --x / --no-x pair
    check: str | None = None  # "file" | "dir"
    ignore_case: bool = False


GLOBAL = (
    Spec(
        ("--log-level", "-l"),
        "log_level",
        "info",
        ("trace", "debug", "info", "warn", "error", "off"),
        "NVAT_LOG_LEVEL",
    ),
    Spec(("--format", "-f"), "format", "text", ("text", "json"), "NVAT_FORMAT"),
)
EVIDENCE = (
    Spec(("--nonce",), "nonce", ""),
    Spec(("--device", "-d"), "device", "gpu", ("gpu", "nvswitch")),
    Spec(("--gpu-evidence-source",), "gpu_evidence_source", "nvml", ("nvml", "corelib", "file")),
    Spec(("--gpu-architecture",), "gpu_architecture", "", ("blackwell",), ignore_case=True),
    Spec(("--gpu-evidence-file",), "gpu_evidence_file", ""),
    Spec(("--nvswitch-evidence-source",), "nvswitch_evidence_source", "nscq", ("nscq", "file")),
    Spec(("--nvswitch-evidence-file",), "nvswitch_evidence_file", ""),
)
VERIFICATION = (
    Spec(("--verifier",), "verifier", "local", ("local", "remote")),
    Spec(("--relying-party-policy",), "relying_party_policy", "", check="file"),
    Spec(("--rim-store",), "rim_store", "remote", ("remote", "dir")),
    Spec(
        ("--rim-url",),
        "rim_url",
        "https://rim.attestation.nvidia.com",
        env="NVAT_RIM_SERVICE_BASE_URL",
    ),
    Spec(("--rim-dir",), "rim_dir", ".", check="dir"),
    Spec(("--ocsp-url",), "ocsp_url", "https://ocsp.ndis.nvidia.com", env="NVAT_OCSP_BASE_URL"),
    Spec(
        ("--nras-url",), "nras_url", "https://nras.attestation.nvidia.com", env="NVAT_NRAS_BASE_URL"
    ),
    Spec(("--service-key",), "service_key", "", env="NV_ATTESTATION_SERVICE_KEY"),
    Spec(("--verify-rim-signatures",), "verify_rim_signatures", True, flag=True),
    Spec(("--verify-rim-cert-chain",), "verify_rim_cert_chain", True, flag=True),
)
SUBCOMMANDS: dict[str, tuple[Spec, ...]] = {
    "version": (),
    "attest": EVIDENCE + VERIFICATION,
    "collect-evidence": EVIDENCE,
}


@dataclass
class Options:
    """What the command line selected (every option, defaults filled in)."""

    command: str | None = None  # None: no subcommand (help)
    help: bool = False
    values: dict[str, str | bool] = field(default_factory=dict)
    given: set[str] = field(default_factory=set)  # dests set on the command line or from env

    def text(self, dest: str) -> str:
        value = self.values[dest]
        if not isinstance(value, str):
            raise TypeError(f"{dest} is a switch")
        return value

    def switch(self, dest: str) -> bool:
        value = self.values[dest]
        if not isinstance(value, bool):
            raise TypeError(f"{dest} takes a value")
        return value


def _lookup(specs: Sequence[Spec], name: str) -> tuple[Spec, bool] | None:
    """The spec for an option name, and whether it is the negated ``--no-`` form."""
    for spec in specs:
        if name in spec.names:
            return spec, False
        if spec.flag and name == "--no-" + spec.names[0][2:]:
            return spec, True
    return None


def _validate(spec: Spec, value: str) -> str:
    label = spec.names[0]
    if spec.choices:
        probe = value.lower() if spec.ignore_case else value
        if probe not in spec.choices:
            raise CliError(f"{label}: {value} not in {{{','.join(spec.choices)}}}", EXIT_VALIDATION)
        value = probe.upper() if spec.ignore_case else probe
    if spec.check == "file" and not os.path.isfile(value):
        raise CliError(f"{label}: File does not exist: {value}", EXIT_VALIDATION)
    if spec.check == "dir" and not os.path.isdir(value):
        raise CliError(f"{label}: Directory does not exist: {value}", EXIT_VALIDATION)
    return value


def _flag_value(spec: Spec, negated: bool, raw: str | None) -> bool:
    if raw is None:
        return not negated
    word = raw.lower()
    if word in ("true", "1", "on", "yes"):
        value = True
    elif word in ("false", "0", "off", "no"):
        value = False
    else:
        raise CliError(f"{spec.names[0]}: {raw} is not a boolean", EXIT_VALIDATION)
    return value != negated


def parse(argv: Sequence[str], env: Mapping[str, str] | None = None) -> Options:
    """Parse ``argv`` (without the program name) as nvattest 1.2.x does; raises CliError."""
    env = os.environ if env is None else env
    opts = Options()
    specs: tuple[Spec, ...] = GLOBAL
    extras: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("--help", "-h"):
            opts.help = True
            continue
        if opts.command is None and not arg.startswith("-") and arg in SUBCOMMANDS:
            opts.command = arg
            specs = GLOBAL + SUBCOMMANDS[arg]
            continue
        if arg == "--" or not arg.startswith("-") or arg == "-":
            extras.append(arg)
            continue
        inline: str | None = None
        if arg.startswith("--"):
            name, sep, rest = arg.partition("=")
            inline = rest if sep else None
        else:
            name, rest = arg[:2], arg[2:]
            inline = rest or None
        found = _lookup(specs, name)
        if found is None:
            extras.append(arg)
            continue
        spec, negated = found
        if spec.dest in opts.given:
            raise CliError(
                f"{spec.names[0]}: at most 1 value expected, given more than once",
                EXIT_ARGUMENT_MISMATCH,
            )
        if spec.flag:
            opts.values[spec.dest] = _flag_value(spec, negated, inline)
        else:
            if inline is None:
                if i >= len(argv):
                    raise CliError(
                        f"{spec.names[0]}: 1 required TEXT missing", EXIT_ARGUMENT_MISMATCH
                    )
                inline = argv[i]
                i += 1
            opts.values[spec.dest] = _validate(spec, inline)
        opts.given.add(spec.dest)
    if opts.help:
        return opts
    if extras:
        noun = "argument was" if len(extras) == 1 else "arguments were"
        raise CliError(f"The following {noun} not expected: {' '.join(extras)}", EXIT_EXTRAS)
    for spec in specs:
        if spec.dest in opts.given:
            continue
        if spec.env and env.get(spec.env):
            opts.values[spec.dest] = _validate(spec, env[spec.env])
            opts.given.add(spec.dest)
        else:
            opts.values[spec.dest] = spec.default
    if opts.command in ("attest", "collect-evidence"):
        _complete(opts)
    return opts


def _complete(opts: Options) -> None:
    """The parse_complete_callback of the evidence options."""
    device = opts.text("device")
    if device == "gpu" and opts.text("gpu_evidence_source") == "file":
        path = opts.text("gpu_evidence_file")
        if not path:
            raise CliError(
                "--gpu-evidence-file: --gpu-evidence-file must be provided when "
                "--gpu-evidence-source=file",
                EXIT_VALIDATION,
            )
        if not os.path.isfile(path):
            raise CliError(f"--gpu-evidence-file: File does not exist: {path}", EXIT_VALIDATION)
    if device == "gpu" and opts.text("gpu_evidence_source") == "corelib":
        if not opts.text("gpu_architecture"):
            raise CliError(
                "--gpu-architecture: --gpu-architecture is required when "
                "--gpu-evidence-source=corelib",
                EXIT_VALIDATION,
            )
    if device == "nvswitch" and opts.text("nvswitch_evidence_source") == "file":
        path = opts.text("nvswitch_evidence_file")
        if not path:
            raise CliError(
                "--nvswitch-evidence-file: --nvswitch-evidence-file must be provided when "
                "--nvswitch-evidence-source=file",
                EXIT_VALIDATION,
            )
        if not os.path.isfile(path):
            raise CliError(
                f"--nvswitch-evidence-file: File does not exist: {path}", EXIT_VALIDATION
            )


HELP = """NVIDIA attestation CLI for collecting evidence and verifying device integrity
Usage: nvattest [OPTIONS] [SUBCOMMAND]

Options:
  -h,--help                   Print this help message and exit
  -l,--log-level TEXT:{trace,debug,info,warn,error,off} [info]  (Env:NVAT_LOG_LEVEL)
                              Print logs at or above the given level
  -f,--format TEXT:{text,json} [text]  (Env:NVAT_FORMAT)
                              Print output in the given format

Subcommands:
  collect-evidence            Collect evidence from a given device.
  attest                      Run end-to-end attestation against a given device.
  version                     Print the version of the CLI and SDK
"""
