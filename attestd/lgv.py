"""GPU evidence through NVIDIA's legacy Python local GPU verifier (LGV), run in its own venv.

Backend ``lgv`` (``gpu_evidence_backend = "lgv"``, ``gpu_lgv_venv``): for VMs that still carry
the LGV (Azure's onboarding kit installs ``nv-local-gpu-verifier`` into a venv of its own; NVIDIA
ends its support on 2026-09-15). The interface is :class:`attestd.gpuevidence.NvattestBackend`'s::

    <venv>/bin/python -I attestd/lgv_runner.py --nonce <fresh 32-byte hex>
                      --claims-version 3.0 [--rim-url URL] [--ocsp-url URL]

The runner (:mod:`attestd.lgv_runner`, stdlib plus the LGV's ``verifier`` package) calls the
LGV's Python API in user mode with strict OCSP and prints one JSON document; it decides nothing.
The run goes through :func:`attestd.gpuevidence.run_process` (one deadline on the whole process
group, stdin closed, stdout capped). The verdict is ours, never the LGV's overall result alone:

- the runner stopped early: ``import``/``api`` (no LGV, or one whose API is not the one known)
  -> ``gpu-verifier-failed``; ``nvml`` with the CC feature and PPCIe both off -> ``gpu-cc-off``,
  any other NVML failure -> ``gpu-lost``; ``collect`` -> ``gpu-lost``; ``attest`` raising ->
  ``gpu-verifier-failed``;
- a RIM or OCSP call that failed on the network (a ``URLError``, ``OSError``, TLS or HTTP
  protocol error, an HTTP status other than 404) or was still pending when ``attest`` returned
  (the LGV's own network timeout) -> :class:`~attestd.state.GpuCollateralUnreachable`; a 404
  from the RIM service is a measured failure (``gpu-evidence-invalid``), as for nvattest;
- then the relying-party checks on the claims the LGV signed into its tokens (decoded here, not
  taken from the runner): every GPU's ``eat_nonce`` is ours, and a report nonce check that ran
  and failed is ``gpu-nonce-mismatch``; ``measres == "success"``, ``secboot``, ``dbgstat ==
  "disabled"``, every check claim of the claims version true (2.0 on Azure's build, 3.0 asked of
  upstream, whose certificate chain claims must be ``valid`` with OCSP ``good``); the count
  equals the configured one (``gpu-count-mismatch``); the overall token names our nonce, the
  issuer ``LOCAL_GPU_VERIFIER``, the version of the GPU tokens, each GPU token by its digest (the
  LGV's recipe: SHA-256 of ``json.dumps`` of the claims before its time claims), is fresh
  (``iat`` within ``max_age_s``, ``exp`` not passed), and its overall result is true;
- the deadline -> ``gpu-verifier-timeout``; no JSON, a signal, a non-zero exit, too much output
  -> ``gpu-verifier-failed``.

Every :class:`~attestd.gpuevidence.GpuEvidenceResult` keeps the runner's exact stdout (what
``/v1/evidence`` returns) and its SHA-256; ``result_code`` is None (the LGV has none).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attestd.gpuevidence import (
    CLOCK_SKEW_S,
    MAX_STDOUT_BYTES,
    GpuEvidenceResult,
    Refused,
    RunOutput,
    _no_duplicates,
    _reject_constant,
    attest_once,
    jwt_payload,
    outcome,
)
from attestd.state import GpuCollateralUnreachable, GpuEvidencePassed
from confinfer.config import Config
from confinfer.errors import ConfigError, Reason, printable

RUNNER = Path(__file__).resolve().with_name("lgv_runner.py")
RUNNER_VERSION = 1
ASKED_CLAIMS_VERSION = "3.0"  # upstream honours it; Azure's build always answers 2.0
ISSUER = "LOCAL_GPU_VERIFIER"
TIME_CLAIMS = ("nbf", "exp", "iat", "jti")  # added to a GPU token after its digest is taken

# The check claims of each version, in the order the LGV runs the checks (the first false one
# names the step that failed; later ones were not reached).
CHECKS_V2 = (
    "x-nvidia-gpu-arch-check",
    "x-nvidia-gpu-attestation-report-parsed",
    "x-nvidia-gpu-attestation-report-cert-chain-validated",
    "x-nvidia-gpu-attestation-report-nonce-match",
    "x-nvidia-gpu-attestation-report-signature-verified",
    "x-nvidia-gpu-driver-rim-fetched",
    "x-nvidia-gpu-driver-rim-schema-validated",
    "x-nvidia-gpu-driver-rim-cert-validated",
    "x-nvidia-gpu-driver-rim-signature-verified",
    "x-nvidia-gpu-driver-rim-measurements-available",
    "x-nvidia-gpu-vbios-rim-fetched",
    "x-nvidia-gpu-vbios-rim-schema-validated",
    "x-nvidia-gpu-vbios-rim-cert-validated",
    "x-nvidia-gpu-vbios-rim-signature-verified",
    "x-nvidia-gpu-vbios-rim-measurements-available",
    "x-nvidia-gpu-vbios-index-no-conflict",
)
CHAINS_V3 = (
    "x-nvidia-gpu-attestation-report-cert-chain",
    "x-nvidia-gpu-driver-rim-cert-chain",
    "x-nvidia-gpu-vbios-rim-cert-chain",
)
CHECKS_V3 = (
    "x-nvidia-gpu-arch-check",
    "x-nvidia-gpu-attestation-report-parsed",
    "x-nvidia-gpu-attestation-report-cert-chain-fwid-match",
    CHAINS_V3[0],
    "x-nvidia-gpu-attestation-report-nonce-match",
    "x-nvidia-gpu-attestation-report-signature-verified",
    "x-nvidia-gpu-driver-rim-fetched",
    "x-nvidia-gpu-driver-rim-schema-validated",
    CHAINS_V3[1],
    "x-nvidia-gpu-driver-rim-signature-verified",
    "x-nvidia-gpu-driver-rim-version-match",
    "x-nvidia-gpu-driver-rim-measurements-available",
    "x-nvidia-gpu-vbios-rim-fetched",
    "x-nvidia-gpu-vbios-rim-schema-validated",
    CHAINS_V3[2],
    "x-nvidia-gpu-vbios-rim-signature-verified",
    "x-nvidia-gpu-vbios-rim-version-match",
    "x-nvidia-gpu-vbios-rim-measurements-available",
    "x-nvidia-gpu-vbios-index-no-conflict",
)
CHECKS = {"2.0": CHECKS_V2, "3.0": CHECKS_V3}
NONCE_MATCH = "x-nvidia-gpu-attestation-report-nonce-match"

# Exception classes (with their bases, as the runner lists them) that mean the network failed.
NETWORK_TYPES = frozenset(
    {
        "urllib.error.URLError",
        "builtins.OSError",  # ConnectionError, TimeoutError, socket errors
        "ssl.SSLError",
        "http.client.HTTPException",
    }
)
HTTP_NOT_FOUND = 404
# Variables the LGV reads at import as its default URLs: the configuration decides instead.
OVERRIDDEN_ENV = ("NV_RIM_URL", "NV_OCSP_URL")


# --- options -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LgvOptions:
    """How to run the LGV and what its result must show. ``expected_count`` comes from the
    configuration, never from the guest."""

    expected_count: int
    venv: Path
    timeout_s: float = 120.0
    max_age_s: float = 300.0
    rim_url: str | None = None
    ocsp_url: str | None = None
    env: Mapping[str, str] | None = None  # None: this process's environment
    max_stdout_bytes: int = MAX_STDOUT_BYTES
    runner: Path = RUNNER
    claims_version: str = ASKED_CLAIMS_VERSION

    def __post_init__(self) -> None:
        if self.expected_count < 1:
            raise ValueError(f"expected_count must be at least 1, not {self.expected_count}")
        for name in ("timeout_s", "max_age_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive finite number, not {value!r}")
        if self.claims_version not in CHECKS:
            raise ValueError(f"claims_version must be one of {sorted(CHECKS)}")

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @classmethod
    def from_config(
        cls, cfg: Config, expected_count: int, *, env: Mapping[str, str] | None = None
    ) -> LgvOptions:
        if cfg.gpu_lgv_venv is None:
            raise ConfigError(
                "gpu_evidence_backend = lgv needs gpu_lgv_venv (the LGV's virtualenv)",
                reason=Reason.CONFIG_INVALID,
                hint="set gpu_lgv_venv, or gpu_evidence_backend = nvattest",
            )
        return cls(
            expected_count=expected_count,
            venv=cfg.gpu_lgv_venv,
            timeout_s=cfg.gpu_evidence_timeout_s,
            max_age_s=cfg.gpu_evidence_max_age_s,
            rim_url=cfg.nvattest_rim_url,
            ocsp_url=cfg.nvattest_ocsp_url,
            env=env,
        )


def build_argv(options: LgvOptions, nonce: str) -> list[str]:
    argv = [
        str(options.python),
        "-I",  # no PYTHON* variables, no user site, not the script's directory
        str(options.runner),
        "--nonce",
        nonce,
        "--claims-version",
        options.claims_version,
    ]
    if options.rim_url:
        argv += ["--rim-url", options.rim_url]
    if options.ocsp_url:
        argv += ["--ocsp-url", options.ocsp_url]
    return argv


def build_env(options: LgvOptions) -> dict[str, str]:
    base = os.environ if options.env is None else options.env
    return {k: v for k, v in base.items() if k not in OVERRIDDEN_ENV}


def missing(options: LgvOptions) -> str | None:
    """Why the LGV cannot be run at all, in one line, or None."""
    if not options.python.is_file() or not os.access(options.python, os.X_OK):
        return (
            f"no LGV virtualenv at {options.venv}: {options.python} is missing or not "
            "executable (gpu_lgv_venv)"
        )
    if not options.runner.is_file():
        return f"the LGV runner {options.runner} is missing"
    return None


# --- reading the runner's document ---------------------------------------------------------------


def _chain_text(chain: object) -> str:
    if not isinstance(chain, list):
        return "?"
    parts = []
    for entry in chain[:4]:
        if isinstance(entry, dict):
            kind = str(entry.get("type", "?")).rsplit(".", 1)[-1]
            message = entry.get("message")
            parts.append(f"{kind}: {message}" if message else kind)
    return " <- ".join(parts) or "?"


def _is_network(chain: object) -> bool:
    """A chain whose exceptions show a network failure (a 404 is an answer, not a failure)."""
    if not isinstance(chain, list):
        return False
    network = False
    for entry in chain:
        if not isinstance(entry, dict):
            continue
        if entry.get("http_status") == HTTP_NOT_FOUND:
            return False
        mro = entry.get("mro")
        if isinstance(mro, list) and NETWORK_TYPES.intersection(str(m) for m in mro):
            network = True
    return network


def collateral_failure(doc: Mapping[str, Any]) -> str | None:
    """The first RIM/OCSP call that did not get an answer, as a line, or None."""
    calls = doc.get("collateral")
    for call in calls if isinstance(calls, list) else []:
        if not isinstance(call, dict):
            continue
        service = {"rim": "RIM service", "ocsp": "OCSP responder"}.get(
            str(call.get("service")), "?"
        )
        if call.get("outcome") == "pending":
            return f"the {service} did not answer before the LGV's network timeout"
        if call.get("outcome") == "error" and _is_network(call.get("chain")):
            return f"the {service} is unreachable: {_chain_text(call.get('chain'))}"
    errors = doc.get("errors")
    for error in errors if isinstance(errors, list) else []:
        if (
            isinstance(error, dict)
            and error.get("where") == "attest"
            and _is_network(error.get("chain"))
        ):
            return f"a network call failed: {_chain_text(error.get('chain'))}"
    return None


def _first_error(doc: Mapping[str, Any], where: str | None = None) -> str:
    errors = doc.get("errors")
    for error in errors if isinstance(errors, list) else []:
        if isinstance(error, dict) and (where is None or error.get("where") == where):
            return _chain_text(error.get("chain"))
    return "no error recorded"


def _stopped(doc: Mapping[str, Any]) -> tuple[Reason, str]:
    """The reason a run that stopped before ``attest`` returned stands for."""
    stage = doc.get("stage")
    if stage == "import":
        return Reason.GPU_VERIFIER_FAILED, f"the LGV cannot be imported: {_first_error(doc)}"
    if stage == "api":
        return Reason.GPU_VERIFIER_FAILED, f"unsupported LGV: {_first_error(doc)}"
    if stage == "nvml":
        nvml = doc.get("nvml")
        if isinstance(nvml, dict) and nvml.get("cc_feature") is False and not nvml.get("ppcie"):
            return Reason.GPU_CC_OFF, "NVML: the GPUs are in neither CC nor PPCIe mode"
        return Reason.GPU_LOST, f"NVML failed: {_first_error(doc, 'nvml')}"
    if stage == "collect":
        return Reason.GPU_LOST, f"the LGV collected no GPU evidence: {_first_error(doc, 'collect')}"
    if stage == "attest":
        return Reason.GPU_VERIFIER_FAILED, f"the LGV's attest failed: {_first_error(doc)}"
    return Reason.GPU_VERIFIER_FAILED, f"the LGV runner stopped at {printable(stage, 20)}"


# --- relying-party checks ----------------------------------------------------------------------


def _invalid(detail: str) -> Refused:
    return Refused(Reason.GPU_EVIDENCE_INVALID, detail)


def _chain_ok(claim: Mapping[str, Any], version: str) -> bool:
    """The attestation certificate chain checks passed (they run before the nonce check)."""
    if version == "2.0":
        return claim.get("x-nvidia-gpu-attestation-report-cert-chain-validated") is True
    chain = claim.get("x-nvidia-gpu-attestation-report-cert-chain")
    return isinstance(chain, dict) and chain.get("x-nvidia-cert-status") == "valid"


def _check_chain(chain: object, name: str, where: str) -> None:
    """A claims-3.0 certificate chain object: ``valid``, OCSP ``good``, not revoked."""
    what = name.removeprefix("x-nvidia-gpu-").removesuffix("-cert-chain")
    if not isinstance(chain, dict):
        raise _invalid(f"{where}: no {what} certificate chain claims")
    status = chain.get("x-nvidia-cert-status")
    if status != "valid":
        raise _invalid(f"{where}: {what} certificate chain {printable(status, 40)}")
    ocsp = chain.get("x-nvidia-cert-ocsp-status")
    why = chain.get("x-nvidia-cert-revocation-reason")
    if ocsp != "good" or why is not None:
        raise _invalid(
            f"{where}: {what} certificate OCSP status {printable(ocsp, 40)}"
            + (f" ({printable(why, 60)})" if why else "")
        )


def check_claims(
    claims: Sequence[Mapping[str, Any]], nonce: str, expected_count: int, version: str
) -> None:
    """Our checks on the per-GPU claims (of claims ``version``); raises :class:`Refused`."""
    checks = CHECKS.get(version)
    if checks is None:
        raise _invalid(f"the LGV's claims version is {printable(version, 20)}, not 2.0 or 3.0")
    if not claims:
        raise Refused(Reason.GPU_VERIFIER_FAILED, "the LGV attested no GPU")
    for index, claim in enumerate(claims):
        got = claim.get("eat_nonce")
        if not isinstance(got, str) or got.lower() != nonce.lower():
            raise Refused(
                Reason.GPU_NONCE_MISMATCH,
                f"GPU {index}: eat_nonce {printable(got, 80)} is not the nonce sent ({nonce})",
            )
        if (
            claim.get(NONCE_MATCH) is False
            and claim.get("x-nvidia-gpu-attestation-report-parsed") is True
            and _chain_ok(claim, version)
        ):
            raise Refused(
                Reason.GPU_NONCE_MISMATCH,
                f"GPU {index}: the attestation report does not carry the nonce sent ({nonce})",
            )
    for index, claim in enumerate(claims):
        where = f"GPU {index}"
        for name in checks:
            if name in CHAINS_V3:
                _check_chain(claim.get(name), name, where)
            elif claim.get(name) is not True:
                raise _invalid(f"{where}: {name} is {printable(claim.get(name), 20)}")
        if claim.get("measres") != "success":
            raise _invalid(
                f"{where}: measurements do not match the RIM (measres "
                f"{printable(claim.get('measres'), 20)})"
            )
        if claim.get("secboot") is not True:
            raise _invalid(f"{where}: secure boot is not true")
        if claim.get("dbgstat") != "disabled":
            raise _invalid(f"{where}: debug status {printable(claim.get('dbgstat'), 40)}")
    if len(claims) != expected_count:
        raise Refused(
            Reason.GPU_COUNT_MISMATCH,
            f"the LGV attested {len(claims)} GPU(s); the configuration expects {expected_count}",
        )


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def submod_digest(payload: Mapping[str, Any]) -> str:
    """The LGV's digest of one GPU's claims: SHA-256 of ``json.dumps`` (default separators, in
    the token's key order) of the payload without the time claims added after it was taken."""
    body = {k: v for k, v in payload.items() if k not in TIME_CLAIMS}
    return hashlib.sha256(json.dumps(body).encode("utf-8")).hexdigest()


def read_eat(eat: object) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    """The overall payload, the GPU payloads in index order and the GPU tokens of a detached EAT
    ``[["JWT", overall], {"GPU-0": jwt, ...}]``; raises :class:`Refused`."""
    if not (
        isinstance(eat, list)
        and len(eat) == 2
        and isinstance(eat[0], list)
        and len(eat[0]) == 2
        and eat[0][0] == "JWT"
        and isinstance(eat[1], dict)
    ):
        raise Refused(Reason.GPU_VERIFIER_FAILED, 'the LGV\'s EAT is not [["JWT", overall], {}]')
    overall = jwt_payload(eat[0][1])
    if overall is None:
        raise Refused(Reason.GPU_VERIFIER_FAILED, "the LGV's overall EAT is not a JWT")
    names = [f"GPU-{i}" for i in range(len(eat[1]))]
    if sorted(eat[1]) != sorted(names):
        raise _invalid(f"the EAT's submods {printable(sorted(eat[1]), 120)} are not {names}")
    tokens: list[str] = []
    payloads: list[dict[str, Any]] = []
    for name in names:
        token = eat[1][name]
        payload = jwt_payload(token)
        if payload is None or not isinstance(token, str):
            raise Refused(Reason.GPU_VERIFIER_FAILED, f"{name}: the LGV's EAT is not a JWT")
        tokens.append(token)
        payloads.append(payload)
    return overall, payloads, tokens


def check_overall(
    overall: Mapping[str, Any],
    claims: Sequence[Mapping[str, Any]],
    nonce: str,
    *,
    now: float,
    max_age_s: float,
) -> None:
    """The overall token: our nonce, the issuer, each GPU token by digest, fresh; raises
    :class:`Refused`. Its result is judged last, after the claims named what failed."""
    got = overall.get("eat_nonce")
    if not isinstance(got, str) or got.lower() != nonce.lower():
        raise Refused(
            Reason.GPU_NONCE_MISMATCH,
            f"the overall EAT's nonce {printable(got, 80)} is not the nonce sent ({nonce})",
        )
    if overall.get("iss") != ISSUER:
        raise _invalid(f"the overall EAT's issuer is {printable(overall.get('iss'), 60)}")
    iat, exp = _number(overall.get("iat")), _number(overall.get("exp"))
    if iat is None or exp is None:
        raise _invalid("the overall EAT has no numeric iat/exp")
    if iat > now + CLOCK_SKEW_S:
        raise _invalid(f"the GPU evidence result is issued in the future (iat {iat})")
    if now - iat > max_age_s:
        raise _invalid(
            f"the GPU evidence result is stale: issued {now - iat:.0f} s ago, max {max_age_s:g} s"
        )
    if exp <= now:
        raise _invalid(f"the GPU evidence result expired (exp {exp})")
    digests = overall.get("submods")
    names = [f"GPU-{i}" for i in range(len(claims))]
    if not isinstance(digests, dict) or sorted(digests) != sorted(names):
        raise _invalid("the overall EAT's submods digests do not name every GPU")
    for name, claim in zip(names, claims, strict=True):
        if digests[name] != ["DIGEST", ["SHA256", submod_digest(claim)]]:
            raise _invalid(f"{name}: the EAT digest does not match its claims")


# --- deciding ----------------------------------------------------------------------------------


def decide(
    output: RunOutput,
    nonce: str,
    options: LgvOptions,
    *,
    now: float,
    started_at: float | None = None,
) -> GpuEvidenceResult:
    """The verdict on one runner's output (pure: no process, no clock but ``now``)."""
    run = outcome(
        output,
        nonce,
        tool="the LGV runner",
        executable=options.python,
        timeout_s=options.timeout_s,
        max_stdout_bytes=options.max_stdout_bytes,
        now=now,
        started_at=started_at,
    )
    if run.early is not None:
        return run.early
    base, log, failed = run.base, run.log, run.failed
    raw, digest = output.stdout, base["sha256"]
    if output.returncode != 0:
        how = (
            f"was killed by signal {-output.returncode}"
            if output.returncode is not None and output.returncode < 0
            else f"exited {output.returncode}"
        )
        return failed(
            Reason.GPU_VERIFIER_FAILED, f"the LGV runner {how}" + (f": {log}" if log else "")
        )
    try:
        document = parse_lgv_document(raw)
    except ValueError as exc:
        return failed(
            Reason.GPU_VERIFIER_FAILED,
            f"the LGV runner gave no result ({exc})" + (f": {log}" if log else ""),
        )
    eat = document.get("detached_eat")
    base |= {"document": document, "detached_eat": eat}
    lgv = document.get("lgv")
    version = lgv.get("version") if isinstance(lgv, dict) else None
    said = f"LGV {printable(version, 20) if version else '(unknown version)'}"
    if document.get("nonce") != nonce:
        return failed(Reason.GPU_VERIFIER_FAILED, f"{said}: the runner answered another nonce")
    unreachable = collateral_failure(document)
    if unreachable is not None:
        return GpuEvidenceResult(
            GpuCollateralUnreachable(printable(f"{said}: {unreachable}", 300)), **base
        )
    if document.get("stage") != "done":
        reason, detail = _stopped(document)
        return failed(reason, f"{said}: {detail}")
    try:
        overall, claims, _tokens = read_eat(eat)
        base |= {"claims": tuple(claims)}
        if document.get("claims") != claims:
            raise Refused(Reason.GPU_VERIFIER_FAILED, "the runner's claims are not its tokens'")
        claims_version = overall.get("x-nvidia-ver")
        check_claims(claims, nonce, options.expected_count, str(claims_version))
        check_overall(overall, claims, nonce, now=now, max_age_s=options.max_age_s)
    except Refused as exc:
        return failed(exc.reason, f"{said}: {exc.detail}")
    if overall.get("x-nvidia-overall-att-result") is not True or document.get("result") is not True:
        return failed(
            Reason.GPU_EVIDENCE_INVALID,
            f"{said}: the overall attestation result is false ({_first_error(document)})",
        )
    return GpuEvidenceResult(
        GpuEvidencePassed(
            f"{said}: {len(claims)} GPU(s) attested (claims {claims_version}), "
            f"nonce {nonce[:16]}..., sha256 {digest[:16]}..."
        ),
        **base,
    )


def parse_lgv_document(raw: bytes) -> dict[str, Any]:
    """The runner's document, strictly: one object, no duplicate keys, no NaN, runner 1."""
    try:
        data = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if data.get("runner") != RUNNER_VERSION:
        raise ValueError(f"runner version {printable(data.get('runner'), 20)}, expected 1")
    return data


# --- the backend -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LgvBackend:
    """The legacy GPU evidence backend: one LGV run (in its venv) per :meth:`attest`."""

    options: LgvOptions

    name = "lgv"

    def attest(self, nonce: str | None = None) -> GpuEvidenceResult:
        """Run the LGV once with a fresh nonce (blocking, at most the deadline plus a few
        seconds to reap it) and decide."""
        return attest_once(
            self.options, nonce, argv=build_argv, env=build_env, decide=decide, missing=missing
        )


__all__ = [
    "LgvBackend",
    "LgvOptions",
    "build_argv",
    "build_env",
    "check_claims",
    "check_overall",
    "collateral_failure",
    "decide",
    "parse_lgv_document",
    "read_eat",
    "submod_digest",
]
