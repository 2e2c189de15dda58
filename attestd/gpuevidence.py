"""GPU evidence: run NVIDIA's ``nvattest`` and decide on its JSON, with our own relying-party
checks on the claims (issue 8 item 3; ``shared/reference/nvidia-attestation.md`` §1).

Backend ``nvattest`` (primary)::

    nvattest attest --device gpu --verifier local --nonce <fresh 32-byte hex> --format json
                    [--rim-url URL] [--ocsp-url URL] [--rim-store dir --rim-dir DIR]

- The run has one overall deadline; on expiry its whole process group is killed (nvattest
  retries each HTTP request for minutes). Its stdin is closed, stdout is read up to
  :data:`MAX_STDOUT_BYTES` (more is a failure), only the tail of stderr is kept.
- The verdict comes from the JSON ``result_code`` and the claims, **never from the exit status**
  (``main`` returns the uint16 ``nvat_rc_t``, which the kernel wraps modulo 256: 504 exits 248).
- **No Rego policy is ever passed**: with one, nvattest ignores a false overall result.
- Our checks on a result code 0 (and, to name the failure, on 11/12): the per-GPU claim count
  equals the configured count; ``eat_nonce`` is our nonce on every GPU and in the overall EAT;
  ``measres == "success"``, ``secboot is True``, ``dbgstat == "disabled"``; every report, RIM
  and version check claim true; each of the three certificate chains ``valid`` with OCSP
  ``good``, its nonce ours and its response valid; the detached EAT well formed, its overall
  result true, its ``submods`` digests those of the per-GPU JWTs, whose payloads carry exactly
  the claims checked; its ``iat`` within ``max_age_s`` and its ``exp`` not passed.

Result codes (the mapping, :func:`classify_rc`):

- measured failures -> :class:`~attestd.state.GpuEvidenceFailed`: 504 ``gpu-nonce-mismatch``,
  509 ``gpu-cc-off``, 500/501 ``gpu-lost`` (NVML could not give the evidence), 12/11 and the
  evidence, RIM-content, SPDM and certificate codes ``gpu-evidence-invalid``;
- collateral unreachable -> :class:`~attestd.state.GpuCollateralUnreachable`
  (``gpu-collateral-unavailable``): 101-103, 201-203, 205, 14, 700-702;
- **the ambiguity**: nvattest 1.2.x reports an unreachable RIM or OCSP service (curl gave up
  after its retries, a TLS or other fatal curl error) as 2 ``Internal Error``, the same code as
  a certificate chain that does not parse or any other internal fault, and the JSON carries no
  claims then. Only nvattest's log on stderr tells them apart, so code 2 is collateral
  unreachable when that log names an HTTP/curl failure (:data:`NETWORK_MARKERS`), evidence
  invalid when it names the attestation certificate chain, and ``gpu-verifier-failed``
  otherwise (fail closed). A reworded log in a later nvattest moves a network failure from
  ``degraded`` to ``revoked``, never the other way;
- the deadline -> ``gpu-verifier-timeout`` (degraded within the grace, as an outage);
- anything else (cannot start, a signal, no JSON, an unknown code, too much output) ->
  ``gpu-verifier-failed`` (revoked: fail closed).

Every :class:`GpuEvidenceResult` keeps the exact stdout bytes (the nvattest JSON, for
``/v1/evidence``), their SHA-256, the parsed document and its detached EAT.

The legacy backend, NVIDIA's Python local GPU verifier run in its own virtualenv, is
:mod:`attestd.lgv` (``gpu_evidence_backend = "lgv"``); it reuses :func:`run_process` and
:class:`GpuEvidenceResult` and maps its failures to the same reasons.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import secrets
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from attestd.state import GpuCollateralUnreachable, GpuEvidenceFailed, GpuEvidencePassed
from confinfer.config import Config
from confinfer.errors import Reason, printable

NONCE_BYTES = 32
MAX_STDOUT_BYTES = 4 * 1024 * 1024  # 8 GPUs' claims and EATs are well under 100 KiB
MAX_STDERR_BYTES = 64 * 1024  # the tail kept
CLOCK_SKEW_S = 60.0  # an EAT issued this far in the future is still accepted
KILL_WAIT_S = 5.0
DEFAULT_EXECUTABLE = "nvattest"
CLAIMS_VERSION = "3.0"
LOCAL_ISSUER = "NVAT-LOCAL-VERIFIER"

# nvat_rc_t (nvat.h.in)
RC_OK = 0
RC_INTERNAL_ERROR = 2
RC_RP_POLICY_MISMATCH = 11
RC_OVERALL_RESULT_FALSE = 12
RC_GPU_EVIDENCE_NONCE_MISMATCH = 504
RC_GPU_MODE_NOT_SUPPORTED = 509
RC_WITH_CLAIMS = (RC_OK, RC_RP_POLICY_MISMATCH, RC_OVERALL_RESULT_FALSE)

COLLATERAL_RCS = frozenset({14, 101, 102, 103, 201, 202, 203, 205, 700, 701, 702})
LOST_RCS = frozenset({500, 501})
INVALID_RCS = frozenset(
    {
        RC_RP_POLICY_MISMATCH,
        RC_OVERALL_RESULT_FALSE,
        *range(104, 109),  # RIM not found / bad signature / schema / measurement
        204,  # OCSP status not good
        *range(401, 406),  # SPDM parse errors
        502,
        503,
        *range(505, 509),
        510,
        800,
        801,
        802,
    }
)
# nvattest's stderr log lines for a network failure behind rc 2 (nv_http.cpp, curl).
NETWORK_MARKERS = (
    "gave up http request",
    "libcurl",
    "couldn't connect",
    "could not connect",
    "couldn't resolve",
    "could not resolve",
    "connection refused",
    "timed out",
    "ssl",
    "tls",
    "http status",
)
CHAIN_MARKERS = ("certificate chain",)

CHAIN_CLAIMS = (
    "x-nvidia-gpu-attestation-report-cert-chain",
    "x-nvidia-gpu-driver-rim-cert-chain",
    "x-nvidia-gpu-vbios-rim-cert-chain",
)
TRUE_CLAIMS = (
    "x-nvidia-gpu-arch-check",
    "x-nvidia-gpu-attestation-report-parsed",
    "x-nvidia-gpu-attestation-report-signature-verified",
    "x-nvidia-gpu-attestation-report-nonce-match",
    "x-nvidia-gpu-attestation-report-cert-chain-fwid-match",
    "x-nvidia-gpu-driver-rim-fetched",
    "x-nvidia-gpu-driver-rim-signature-verified",
    "x-nvidia-gpu-driver-rim-version-match",
    "x-nvidia-gpu-driver-rim-measurements-available",
    "x-nvidia-gpu-vbios-rim-fetched",
    "x-nvidia-gpu-vbios-rim-signature-verified",
    "x-nvidia-gpu-vbios-rim-version-match",
    "x-nvidia-gpu-vbios-rim-measurements-available",
    "x-nvidia-gpu-vbios-index-no-conflict",
)
JWT_ONLY_CLAIMS = ("iat", "exp", "jti", "iss")

Observation = GpuEvidencePassed | GpuEvidenceFailed | GpuCollateralUnreachable


def fresh_nonce() -> str:
    """32 random bytes as lowercase hex (nvattest's NVML path takes exactly 32)."""
    return secrets.token_hex(NONCE_BYTES)


# --- options -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NvattestOptions:
    """How to run nvattest and what its result must show. ``expected_count`` comes from the
    configuration, never from the guest."""

    expected_count: int
    executable: str | Path = DEFAULT_EXECUTABLE
    timeout_s: float = 120.0
    max_age_s: float = 300.0
    rim_url: str | None = None
    ocsp_url: str | None = None
    rim_dir: Path | None = None  # RIM files instead of the RIM service (--rim-store dir)
    # The environment nvattest runs with (None: this process's). NVAT_* variables that would
    # override what the flags say are removed either way.
    env: Mapping[str, str] | None = None
    max_stdout_bytes: int = MAX_STDOUT_BYTES

    def __post_init__(self) -> None:
        if self.expected_count < 1:
            raise ValueError(f"expected_count must be at least 1, not {self.expected_count}")
        for name in ("timeout_s", "max_age_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive finite number, not {value!r}")

    @classmethod
    def from_config(
        cls, cfg: Config, expected_count: int, *, env: Mapping[str, str] | None = None
    ) -> NvattestOptions:
        return cls(
            expected_count=expected_count,
            executable=cfg.nvattest_path or DEFAULT_EXECUTABLE,
            timeout_s=cfg.gpu_evidence_timeout_s,
            max_age_s=cfg.gpu_evidence_max_age_s,
            rim_url=cfg.nvattest_rim_url,
            ocsp_url=cfg.nvattest_ocsp_url,
            rim_dir=cfg.nvattest_rim_dir,
            env=env,
        )


# Variables that would change what the command line asks for (format, URLs, log silence).
_OVERRIDDEN_ENV = (
    "NVAT_FORMAT",
    "NVAT_LOG_LEVEL",
    "NVAT_RIM_SERVICE_BASE_URL",
    "NVAT_OCSP_BASE_URL",
)


def build_argv(options: NvattestOptions, nonce: str) -> list[str]:
    """The command line; never ``--relying-party-policy``."""
    argv = [
        str(options.executable),
        "attest",
        "--device",
        "gpu",
        "--verifier",
        "local",
        "--nonce",
        nonce,
        "--format",
        "json",
    ]
    if options.rim_url:
        argv += ["--rim-url", options.rim_url]
    if options.ocsp_url:
        argv += ["--ocsp-url", options.ocsp_url]
    if options.rim_dir is not None:
        argv += ["--rim-store", "dir", "--rim-dir", str(options.rim_dir)]
    return argv


def build_env(options: NvattestOptions) -> dict[str, str]:
    base = os.environ if options.env is None else options.env
    env = {k: v for k, v in base.items() if k not in _OVERRIDDEN_ENV}
    env["NVAT_LOG_LEVEL"] = "info"  # the log is how an unreachable service is told apart
    return env


# --- running ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOutput:
    """What one run gave: ``returncode`` None when it never started or was killed by us."""

    returncode: int | None
    stdout: bytes
    stderr_tail: bytes
    duration_s: float
    timed_out: bool = False
    too_large: bool = False
    start_error: str | None = None


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(KILL_WAIT_S)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL not delivered
        pass


def run_process(
    argv: Sequence[str], *, env: Mapping[str, str], timeout_s: float, max_stdout_bytes: int
) -> RunOutput:
    """Run ``argv`` in its own session with stdin closed; kill its process group at the
    deadline or once stdout passes ``max_stdout_bytes``."""
    start = time.monotonic()
    deadline = start + timeout_s
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        return RunOutput(
            None, b"", b"", time.monotonic() - start, start_error=exc.strerror or str(exc)
        )
    if proc.stdout is None or proc.stderr is None:  # pragma: no cover - PIPE always gives them
        _kill_group(proc)
        raise RuntimeError("subprocess pipes missing")
    out = bytearray()
    err = bytearray()
    timed_out = too_large = False
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf: bytearray = key.data
                buf += chunk
                if buf is err and len(err) > MAX_STDERR_BYTES:
                    del err[: len(err) - MAX_STDERR_BYTES]
                if buf is out and len(out) > max_stdout_bytes:
                    too_large = True
            if too_large:
                break
    returncode: int | None
    if timed_out or too_large:
        _kill_group(proc)
        returncode = None
    else:
        left = max(0.0, deadline - time.monotonic())
        try:
            returncode = proc.wait(left)
        except subprocess.TimeoutExpired:  # closed its pipes, then hung
            timed_out = True
            _kill_group(proc)
            returncode = None
        else:
            # nvattest is gone; anything it left running in its group goes too
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    proc.stdout.close()
    proc.stderr.close()
    return RunOutput(
        returncode,
        bytes(out),
        bytes(err),
        time.monotonic() - start,
        timed_out=timed_out,
        too_large=too_large,
    )


# --- the result --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuEvidenceResult:
    """One attestation: the observation for the state machine and what backs it."""

    observation: Observation
    nonce: str
    started_at: float  # wall clock
    duration_s: float
    result_code: int | None = None
    exit_status: int | None = None  # recorded, never decided on
    raw_json: bytes | None = None  # nvattest's stdout, exactly
    sha256: str | None = None  # of raw_json
    document: Mapping[str, Any] | None = None
    detached_eat: Any = None
    stderr_tail: str = ""
    claims: tuple[Mapping[str, Any], ...] = field(default=())

    @property
    def passed(self) -> bool:
        return isinstance(self.observation, GpuEvidencePassed)

    @property
    def reason(self) -> Reason | None:
        obs = self.observation
        return None if isinstance(obs, GpuEvidencePassed) else obs.reason


class Refused(Exception):
    """A relying-party check failed: the reason and the line."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-JSON constant {name}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_document(raw: bytes) -> dict[str, Any]:
    """Strict JSON: one object, no duplicate keys, no NaN; ``result_code`` an integer."""
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
    rc = data.get("result_code")
    if isinstance(rc, bool) or not isinstance(rc, int):
        raise ValueError("no integer result_code")
    if not isinstance(data.get("result_message", ""), str):
        raise ValueError("result_message is not a string")
    return data


def _last_log_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "[error]" in line]
    return (errors or lines or [""])[-1].strip()


def classify_rc(rc: int, stderr: str) -> Reason | None:
    """The reason a non-zero result code without decisive claims stands for; None means
    collateral unreachable (gpu-collateral-unavailable)."""
    if rc == RC_GPU_EVIDENCE_NONCE_MISMATCH:
        return Reason.GPU_NONCE_MISMATCH
    if rc == RC_GPU_MODE_NOT_SUPPORTED:
        return Reason.GPU_CC_OFF
    if rc in LOST_RCS:
        return Reason.GPU_LOST
    if rc in INVALID_RCS:
        return Reason.GPU_EVIDENCE_INVALID
    if rc in COLLATERAL_RCS:
        return None
    if rc == RC_INTERNAL_ERROR:
        log = stderr.lower()
        if any(marker in log for marker in NETWORK_MARKERS):
            return None
        if any(marker in log for marker in CHAIN_MARKERS):
            return Reason.GPU_EVIDENCE_INVALID
    return Reason.GPU_VERIFIER_FAILED


# --- relying-party checks ----------------------------------------------------------------------


def _b64url_json(segment: str) -> Any:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        return json.loads(raw, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (binascii.Error, ValueError, RecursionError):
        return None


def jwt_payload(token: object) -> dict[str, Any] | None:
    """The payload of a compact JWT (unsigned in nvattest's local mode), or None."""
    if not isinstance(token, str) or not token.isascii():
        return None
    parts = token.split(".")
    if len(parts) != 3:
        return None
    header, payload = _b64url_json(parts[0]), _b64url_json(parts[1])
    if not isinstance(header, dict) or not isinstance(payload, dict):
        return None
    return payload


def _invalid(detail: str) -> Refused:
    return Refused(Reason.GPU_EVIDENCE_INVALID, detail)


def check_claims(claims: object, nonce: str, expected_count: int) -> tuple[Mapping[str, Any], ...]:
    """Our relying-party checks on the per-GPU claims; raises :class:`Refused`."""
    if not isinstance(claims, list) or not all(isinstance(c, dict) for c in claims):
        raise Refused(Reason.GPU_VERIFIER_FAILED, "nvattest's claims are not a list of objects")
    for index, claim in enumerate(claims):
        got = claim.get("eat_nonce")
        if not isinstance(got, str) or got.lower() != nonce.lower():
            raise Refused(
                Reason.GPU_NONCE_MISMATCH,
                f"GPU {index}: eat_nonce {printable(got, 80)} is not the nonce sent ({nonce})",
            )
    if len(claims) != expected_count:
        raise Refused(
            Reason.GPU_COUNT_MISMATCH,
            f"nvattest attested {len(claims)} GPU(s); the configuration expects {expected_count}",
        )
    for index, claim in enumerate(claims):
        where = f"GPU {index}"
        if claim.get("x-nvidia-device-type") != "gpu":
            raise _invalid(f"{where}: device type {printable(claim.get('x-nvidia-device-type'))}")
        if claim.get("x-nvidia-gpu-claims-version") != CLAIMS_VERSION:
            version = printable(claim.get("x-nvidia-gpu-claims-version"), 40)
            raise _invalid(f"{where}: claims version {version}, expected {CLAIMS_VERSION}")
        if claim.get("measres") != "success":
            records = claim.get("x-nvidia-mismatch-measurement-records")
            indices = (
                sorted({r.get("index") for r in records if isinstance(r, dict)}, key=str)
                if isinstance(records, list)
                else []
            )
            raise _invalid(
                f"{where}: measurements do not match the RIM (measres "
                f"{printable(claim.get('measres'), 20)}"
                + (f"; mismatched indices {printable(indices, 120)}" if indices else "")
                + ")"
            )
        if claim.get("secboot") is not True:
            raise _invalid(f"{where}: secure boot is not true")
        if claim.get("dbgstat") != "disabled":
            raise _invalid(f"{where}: debug status {printable(claim.get('dbgstat'), 40)}")
        for name in TRUE_CLAIMS:
            if claim.get(name) is not True:
                raise _invalid(f"{where}: {name} is not true")
        if claim.get("x-nvidia-mismatch-measurement-records") not in (None, []):
            raise _invalid(f"{where}: measurement mismatch records present")
        for name in CHAIN_CLAIMS:
            chain = claim.get(name)
            what = name.removeprefix("x-nvidia-gpu-").removesuffix("-cert-chain")
            if not isinstance(chain, dict):
                raise _invalid(f"{where}: no {what} certificate chain claims")
            status = chain.get("x-nvidia-cert-status")
            if status != "valid":
                raise _invalid(f"{where}: {what} certificate chain {printable(status, 40)}")
            ocsp = chain.get("x-nvidia-cert-ocsp-status")
            if ocsp != "good":
                why = chain.get("x-nvidia-cert-revocation-reason")
                raise _invalid(
                    f"{where}: {what} certificate OCSP status {printable(ocsp, 40)}"
                    + (f" ({printable(why, 60)})" if why else "")
                )
            if chain.get("x-nvidia-cert-ocsp-nonce-matches") is not True:
                raise _invalid(f"{where}: {what} OCSP answer does not carry our nonce")
            if chain.get("x-nvidia-cert-ocsp-response-valid") is not True:
                raise _invalid(f"{where}: {what} OCSP response is not valid")
    return tuple(claims)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def check_eat(
    eat: object,
    claims: Sequence[Mapping[str, Any]],
    nonce: str,
    *,
    now: float,
    max_age_s: float,
) -> None:
    """The detached EAT carries the claims checked, our nonce, a true overall result, and is
    fresh; raises :class:`Refused`."""
    if not (
        isinstance(eat, list)
        and len(eat) == 2
        and isinstance(eat[0], list)
        and len(eat[0]) == 2
        and eat[0][0] == "JWT"
        and isinstance(eat[1], dict)
    ):
        raise _invalid('the detached EAT is not [["JWT", overall], {submods}]')
    overall = jwt_payload(eat[0][1])
    if overall is None:
        raise _invalid("the overall EAT is not a JWT")
    got = overall.get("eat_nonce")
    if not isinstance(got, str) or got.lower() != nonce.lower():
        raise Refused(
            Reason.GPU_NONCE_MISMATCH,
            f"the overall EAT's nonce {printable(got, 80)} is not the nonce sent ({nonce})",
        )
    if overall.get("x-nvidia-overall-att-result") is not True:
        raise _invalid("the overall EAT's attestation result is not true")
    if overall.get("iss") != LOCAL_ISSUER:
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
    submods = eat[1]
    names = [f"GPU-{i}" for i in range(len(claims))]
    if sorted(submods) != sorted(names):
        raise _invalid(f"the EAT's submods {printable(sorted(submods), 120)} are not {names}")
    digests = overall.get("submods")
    if not isinstance(digests, dict) or sorted(digests) != sorted(names):
        raise _invalid("the overall EAT's submods digests do not name every GPU")
    for index, name in enumerate(names):
        token = submods[name]
        if not isinstance(token, str):
            raise _invalid(f"{name}: the EAT is not a JWT")
        want = ["DIGEST", ["SHA256", hashlib.sha256(token.encode("ascii", "replace")).hexdigest()]]
        if digests[name] != want:
            raise _invalid(f"{name}: the EAT digest does not match its JWT")
        payload = jwt_payload(token)
        if payload is None:
            raise _invalid(f"{name}: the EAT is not a JWT")
        body = {k: v for k, v in payload.items() if k not in JWT_ONLY_CLAIMS}
        if body != dict(claims[index]):
            raise _invalid(f"{name}: the EAT's claims are not the claims nvattest printed")


# --- deciding ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What every backend decides first about one run: the fields each result carries
    (``base``), the last log line, and, when the run itself failed (could not start, missed its
    deadline, printed too much), that result."""

    base: dict[str, Any]
    log: str
    stderr: str
    early: GpuEvidenceResult | None = None

    def failed(self, reason: Reason, detail: str, **more: Any) -> GpuEvidenceResult:
        return GpuEvidenceResult(
            GpuEvidenceFailed(reason, printable(detail, 300)), **self.base, **more
        )


def outcome(
    output: RunOutput,
    nonce: str,
    *,
    tool: str,
    executable: object,
    timeout_s: float,
    max_stdout_bytes: int,
    now: float,
    started_at: float | None,
) -> Outcome:
    """The part of a verdict that is the same for every verifier run under
    :func:`run_process`; the stdout and its SHA-256 join ``base`` when the run finished."""
    stderr = output.stderr_tail.decode("utf-8", "replace")
    log = _last_log_line(stderr)
    base: dict[str, Any] = {
        "nonce": nonce,
        "started_at": now if started_at is None else started_at,
        "duration_s": output.duration_s,
        "stderr_tail": stderr,
        "exit_status": output.returncode,
    }
    result = Outcome(base, log, stderr)
    if output.start_error is not None:
        result.early = result.failed(
            Reason.GPU_VERIFIER_FAILED, f"cannot run {executable}: {output.start_error}"
        )
    elif output.timed_out:
        detail = f"{tool} did not finish within {timeout_s:g} s and was killed" + (
            f"; last log: {log}" if log else ""
        )
        result.early = GpuEvidenceResult(
            GpuCollateralUnreachable(printable(detail, 300), Reason.GPU_VERIFIER_TIMEOUT), **base
        )
    elif output.too_large:
        result.early = result.failed(
            Reason.GPU_VERIFIER_FAILED, f"{tool} printed more than {max_stdout_bytes} bytes; killed"
        )
    else:
        base |= {"raw_json": output.stdout, "sha256": hashlib.sha256(output.stdout).hexdigest()}
    return result


def decide(
    output: RunOutput,
    nonce: str,
    options: NvattestOptions,
    *,
    now: float,
    started_at: float | None = None,
) -> GpuEvidenceResult:
    """The verdict on one run's output (pure: no process, no clock but ``now``)."""
    run = outcome(
        output,
        nonce,
        tool="nvattest",
        executable=options.executable,
        timeout_s=options.timeout_s,
        max_stdout_bytes=options.max_stdout_bytes,
        now=now,
        started_at=started_at,
    )
    if run.early is not None:
        return run.early
    base, log, stderr, failed = run.base, run.log, run.stderr, run.failed
    raw, digest = output.stdout, base["sha256"]
    if output.returncode is not None and output.returncode < 0:
        return failed(
            Reason.GPU_VERIFIER_FAILED,
            f"nvattest was killed by signal {-output.returncode}" + (f": {log}" if log else ""),
        )
    try:
        document = parse_document(raw)
    except ValueError as exc:
        return failed(
            Reason.GPU_VERIFIER_FAILED,
            f"nvattest gave no JSON result ({exc}; exit status {output.returncode})"
            + (f": {log}" if log else ""),
        )
    rc: int = document["result_code"]
    message = printable(document.get("result_message", ""), 80)
    eat = document.get("detached_eat")
    base |= {"result_code": rc, "document": document, "detached_eat": eat}
    said = f"nvattest result {rc} ({message})"

    if rc in RC_WITH_CLAIMS and isinstance(document.get("claims"), list):
        try:
            claims = check_claims(document["claims"], nonce, options.expected_count)
            if rc == RC_OK:
                check_eat(eat, claims, nonce, now=now, max_age_s=options.max_age_s)
        except Refused as exc:
            return failed(exc.reason, f"{said}: {exc.detail}", claims=tuple(document["claims"]))
        if rc == RC_OK:
            return GpuEvidenceResult(
                GpuEvidencePassed(
                    f"{len(claims)} GPU(s) attested, nonce {nonce[:16]}..., sha256 {digest[:16]}..."
                ),
                **base,
                claims=claims,
            )
        # 11/12 whose claims pass our checks: still refused, on nvattest's word
        return failed(Reason.GPU_EVIDENCE_INVALID, f"{said}", claims=claims)
    if rc == RC_OK:
        return failed(Reason.GPU_VERIFIER_FAILED, f"{said} without a claims list")
    reason = classify_rc(rc, stderr)
    detail = said + (f": {log}" if log else "")
    if reason is None:
        return GpuEvidenceResult(GpuCollateralUnreachable(printable(detail, 300)), **base)
    return failed(reason, detail)


# --- the backend -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NvattestBackend:
    """The primary GPU evidence backend: one nvattest run per :meth:`attest`."""

    options: NvattestOptions

    name = "nvattest"

    def attest(self, nonce: str | None = None) -> GpuEvidenceResult:
        """Run nvattest once with a fresh nonce (blocking, at most the deadline plus a few
        seconds to reap it) and decide."""
        return attest_once(
            self.options, nonce, argv=build_argv, env=build_env, decide=decide, missing=None
        )


class RunLimits(Protocol):
    """What :func:`attest_once` needs of a backend's options."""

    @property
    def timeout_s(self) -> float: ...

    @property
    def max_stdout_bytes(self) -> int: ...


Opts = TypeVar("Opts", bound=RunLimits)


def attest_once(
    options: Opts,
    nonce: str | None,
    *,
    argv: Callable[[Opts, str], Sequence[str]],
    env: Callable[[Opts], Mapping[str, str]],
    decide: Callable[..., GpuEvidenceResult],
    missing: Callable[[Opts], str | None] | None,
) -> GpuEvidenceResult:
    r"""One verifier run with a fresh nonce, the same for every backend: refused at once when
    ``missing`` names something absent, else run under :func:`run_process` (blocking, at most
    the deadline plus a few seconds to reap it) and ``decide``\ d."""
    nonce = (nonce or fresh_nonce()).lower()
    started = time.time()
    why = missing(options) if missing is not None else None
    if why is not None:
        return GpuEvidenceResult(
            GpuEvidenceFailed(Reason.GPU_VERIFIER_FAILED, printable(why, 300)),
            nonce=nonce,
            started_at=started,
            duration_s=0.0,
        )
    output = run_process(
        argv(options, nonce),
        env=env(options),
        timeout_s=options.timeout_s,
        max_stdout_bytes=options.max_stdout_bytes,
    )
    return decide(output, nonce, options, now=time.time(), started_at=started)


__all__ = [
    "GpuEvidenceResult",
    "NvattestBackend",
    "NvattestOptions",
    "RunOutput",
    "attest_once",
    "build_argv",
    "check_claims",
    "check_eat",
    "classify_rc",
    "decide",
    "fresh_nonce",
    "jwt_payload",
    "parse_document",
    "run_process",
]
