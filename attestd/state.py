"""attestd's state machine: pure, no I/O, no clock.

:func:`step` takes the current :class:`Status`, one :class:`Observation` (the result of a
check, or a :class:`Tick` that only says what time it is), the time, and the :class:`Policy`,
and returns a :class:`Transition`. The daemon feeds it; everything it decides is here.

The rules (DESIGN.md §4, issue 8):

- ``starting`` becomes ``healthy`` only after a *full pass*: a GPU evidence pass and a vTPM
  attestation pass, both since the state was entered, and both still within their grace.
- Any measured hard failure (CC off, DevTools, count mismatch, GPU lost, evidence or nonce
  mismatch, a non-compliant token) is ``revoked`` at once, from any state.
- A service that cannot be reached (NVIDIA's collateral, MAA, IMDS) is ``degraded`` while the
  last good result of that check is within its grace, and ``revoked`` after. So is a GPU reset
  (until its evidence passes again) and a failed AK certificate renewal (until the certificate
  expires). A pass of a check is good for its grace, and a vTPM pass no longer than its token.
- ``healthy`` or ``degraded`` whose last pass of a check falls out of its grace is ``revoked``,
  whether or not anything was observed: :class:`Tick` moves time on.
- Every change into a non-healthy state, and every hard failure, forgets earlier passes: the
  way back to ``healthy`` (from ``degraded`` and from ``revoked``) is a new full pass.

Each state carries a :class:`~confinfer.errors.Reason` that fits it
(:func:`confinfer.attestd_api.reason_fits`) and a human line; :func:`log_line` renders the
one canonical log line of a transition and :meth:`Status.status_line` the ``STATUS=`` line.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import time
from dataclasses import dataclass

from confinfer.attestd_api import Event, GpuSummary, Health, State, reason_fits
from confinfer.errors import Kind, Reason, printable

DETAIL_CHARS = 300  # what a check says (nvattest's message, MAA's error), cut to this
LINE_CHARS = 600
HEALTHY_LINE = "attested: GPU evidence and vTPM attestation passed"


def _detail(text: str) -> str:
    return printable(text, DETAIL_CHARS)


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _finite(value: float, what: str) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, not {value!r}")


# --- observations ----------------------------------------------------------------------------


def _measured(reason: Reason) -> None:
    """A hard failure is measured, never a service that could not be reached."""
    if reason.kind is Kind.UNAVAILABLE:
        raise ValueError(f"{reason} is an unavailable reason, not a hard failure")


_STATE_REASONS = (Reason.ATTESTD_STARTING, Reason.ATTESTD_HEALTHY, Reason.ATTESTD_REATTESTING)


def _unreachable(reason: Reason) -> None:
    """A fault names the service that failed, never one of the machine's own state reasons."""
    if reason.kind is not Kind.UNAVAILABLE or reason in _STATE_REASONS:
        raise ValueError(f"{reason} is not an unavailable reason")


@dataclass(frozen=True)
class Tick:
    """Nothing new was learned; time moved on (grace windows expire on ticks too)."""


@dataclass(frozen=True)
class GpuFastOk:
    """The NVML fast checks passed (CC on, PRODUCTION, DevTools off, the configured count)."""


@dataclass(frozen=True)
class GpuFastFailed:
    """A fast check measured a hard failure (``gpu-cc-off``, ``gpu-lost``, ...)."""

    reason: Reason
    detail: str

    def __post_init__(self) -> None:
        _measured(self.reason)


@dataclass(frozen=True)
class GpuReset:
    """A fast check saw a GPU reset: its evidence must pass again before the state is healthy."""

    detail: str = ""


@dataclass(frozen=True)
class GpuEvidencePassed:
    """Full GPU evidence attestation passed, with our relying-party checks on its claims."""

    detail: str = ""


@dataclass(frozen=True)
class GpuEvidenceFailed:
    """GPU evidence was measured and refused (``gpu-evidence-invalid``, ``gpu-nonce-mismatch``)."""

    reason: Reason
    detail: str

    def __post_init__(self) -> None:
        _measured(self.reason)


@dataclass(frozen=True)
class GpuCollateralUnreachable:
    """GPU evidence could not be decided: RIM or OCSP collateral was unreachable."""

    detail: str
    reason: Reason = Reason.GPU_COLLATERAL_UNAVAILABLE

    def __post_init__(self) -> None:
        _unreachable(self.reason)


@dataclass(frozen=True)
class VtpmPassed:
    """MAA guest attestation passed; the token verified and satisfied the policy."""

    token_expiry: float
    detail: str = ""

    def __post_init__(self) -> None:
        _finite(self.token_expiry, "token_expiry")


@dataclass(frozen=True)
class VtpmNonCompliant:
    """MAA refused the evidence, or its token or claims did not verify (``policy-unsatisfied``,
    ``maa-refused``, ``token-bad-signature``, ...)."""

    reason: Reason
    detail: str

    def __post_init__(self) -> None:
        _measured(self.reason)


@dataclass(frozen=True)
class VtpmUnreachable:
    """MAA, IMDS or the JWKS endpoint could not be reached (``maa-unavailable``, ...)."""

    reason: Reason
    detail: str

    def __post_init__(self) -> None:
        _unreachable(self.reason)


@dataclass(frozen=True)
class AkCertRenewalFailed:
    """Renewing the vTPM's AK certificate through IMDS failed; ``cert_expiry`` is when the
    current certificate expires. ``cause`` is the failure's own reason."""

    cause: Reason
    detail: str
    cert_expiry: float

    def __post_init__(self) -> None:
        _finite(self.cert_expiry, "cert_expiry")


@dataclass(frozen=True)
class AkCertRenewed:
    """The AK certificate is (now) valid until ``cert_expiry``."""

    cert_expiry: float

    def __post_init__(self) -> None:
        _finite(self.cert_expiry, "cert_expiry")


Observation = (
    Tick
    | GpuFastOk
    | GpuFastFailed
    | GpuReset
    | GpuEvidencePassed
    | GpuEvidenceFailed
    | GpuCollateralUnreachable
    | VtpmPassed
    | VtpmNonCompliant
    | VtpmUnreachable
    | AkCertRenewalFailed
    | AkCertRenewed
)


# --- policy and status -----------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """How long results stay good. Each grace must be longer than its check's interval.

    ``gpu_grace_s``: a GPU evidence pass is good this long (so collateral may be unreachable
    this long after it). ``vtpm_grace_s``: likewise for a vTPM pass, and never past its
    token's expiry. ``gpu_reset_grace_s``: how long after a GPU reset its evidence may take.
    """

    gpu_grace_s: float
    vtpm_grace_s: float
    gpu_reset_grace_s: float = 120.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            _finite(value, field.name)
            if value <= 0:
                raise ValueError(f"{field.name} must be positive, not {value!r}")


class Check(enum.StrEnum):
    """The two checks that make a full pass."""

    GPU = "gpu"  # GPU evidence
    VTPM = "vtpm"  # vTPM guest attestation


class Source(enum.StrEnum):
    """What a :class:`Fault` is about; at most one fault per source."""

    GPU_COLLATERAL = "gpu-collateral"
    GPU_RESET = "gpu-reset"
    VTPM_SERVICE = "vtpm-service"
    AK_CERT = "ak-cert"


@dataclass(frozen=True)
class Fault:
    """A transient fault: degraded while it lasts, revoked at ``deadline`` (None: the check's
    own grace decides)."""

    source: Source
    reason: Reason
    line: str
    since: float
    deadline: float | None = None


@dataclass(frozen=True)
class Status:
    """Everything the machine knows. ``fresh`` holds the checks that passed since the state
    was last entered (or since the last hard failure)."""

    state: State
    reason: Reason
    line: str
    since: float
    last_gpu_pass: float | None = None
    last_vtpm_pass: float | None = None
    token_expiry: float | None = None
    ak_cert_expiry: float | None = None
    fresh: frozenset[Check] = frozenset()
    faults: tuple[Fault, ...] = ()

    @classmethod
    def initial(cls, now: float) -> Status:
        return cls(State.STARTING, Reason.ATTESTD_STARTING, _waiting(frozenset()), now)

    def status_line(self) -> str:
        """The ``STATUS=`` line: ``revoked (gpu-cc-off): GPU 0: confidential computing off``."""
        return printable(f"{self.state} ({self.reason}): {self.line}", LINE_CHARS + 100)

    def valid_until(self, check: Check, policy: Policy) -> float | None:
        """When the last pass of ``check`` stops being good (None: it never passed)."""
        if check is Check.GPU:
            if self.last_gpu_pass is None:
                return None
            return self.last_gpu_pass + policy.gpu_grace_s
        if self.last_vtpm_pass is None:
            return None
        until = self.last_vtpm_pass + policy.vtpm_grace_s
        return until if self.token_expiry is None else min(until, self.token_expiry)

    def deadline(self, policy: Policy) -> float | None:
        """When ``healthy`` or ``degraded`` turns ``revoked`` if nothing else happens."""
        times = [self.valid_until(check, policy) for check in Check]
        times += [fault.deadline for fault in self.faults]
        times.append(self.ak_cert_expiry)
        known = [t for t in times if t is not None]
        return min(known) if known else None

    def event(self, previous: State | None) -> Event:
        return Event(self.state, self.reason, self.line, self.since, previous)

    def health(self, gpus: GpuSummary) -> Health:
        return Health(
            state=self.state,
            reason=self.reason,
            line=self.line,
            since=self.since,
            last_gpu_pass=self.last_gpu_pass,
            last_vtpm_pass=self.last_vtpm_pass,
            token_expiry=self.token_expiry,
            ak_cert_expiry=self.ak_cert_expiry,
            gpus=gpus,
        )


@dataclass(frozen=True)
class Transition:
    """The result of one :func:`step`. ``changed`` when the state, its reason or its line did:
    then the daemon logs :func:`log_line`, sends ``STATUS=`` and, for a new state, an event."""

    before: Status
    after: Status
    now: float

    @property
    def changed(self) -> bool:
        b, a = self.before, self.after
        return (b.state, b.reason, b.line) != (a.state, a.reason, a.line)

    @property
    def state_changed(self) -> bool:
        return self.before.state is not self.after.state

    def event(self) -> Event:
        return self.after.event(self.before.state)


def log_line(transition: Transition) -> str:
    """The one canonical log line of a transition, one printable line:

    ``state=revoked reason=gpu-cc-off from=healthy/attestd-healthy held_s=3600.0: GPU 0: ...``
    """
    b, a = transition.before, transition.after
    held = max(0.0, transition.now - b.since)
    return printable(
        f"state={a.state} reason={a.reason} from={b.state}/{b.reason} held_s={held:.1f}: {a.line}",
        LINE_CHARS + 200,
    )


# --- the machine -----------------------------------------------------------------------------

_CHECK_NAMES = {Check.GPU: "GPU evidence", Check.VTPM: "vTPM attestation"}


def _waiting(fresh: frozenset[Check]) -> str:
    missing = [_CHECK_NAMES[c] for c in Check if c not in fresh]
    if not missing:
        return "full pass"
    return "waiting for a pass of " + " and ".join(missing)


def _with_fault(status: Status, fault: Fault) -> Status:
    kept = tuple(f for f in status.faults if f.source is not fault.source)
    old = [f for f in status.faults if f.source is fault.source]
    if old:  # the same fault going on: keep when it began
        fault = dataclasses.replace(fault, since=old[0].since)
    return dataclasses.replace(
        status, faults=tuple(sorted((*kept, fault), key=lambda f: list(Source).index(f.source)))
    )


def _without(status: Status, *sources: Source) -> Status:
    return dataclasses.replace(
        status, faults=tuple(f for f in status.faults if f.source not in sources)
    )


def _hard_failure(observation: Observation) -> tuple[Reason, str] | None:
    match observation:
        case GpuFastFailed(reason, detail):
            return reason, f"GPU fast check failed: {_detail(detail)}"
        case GpuEvidenceFailed(reason, detail):
            return reason, f"GPU evidence refused: {_detail(detail)}"
        case VtpmNonCompliant(reason, detail):
            return reason, f"vTPM attestation refused: {_detail(detail)}"
    return None


def _record(status: Status, observation: Observation, now: float, policy: Policy) -> Status:
    """The status with what the observation says recorded; the state is decided after."""
    match observation:
        case GpuEvidencePassed():
            status = _without(status, Source.GPU_COLLATERAL, Source.GPU_RESET)
            return dataclasses.replace(status, last_gpu_pass=now, fresh=status.fresh | {Check.GPU})
        case VtpmPassed(token_expiry):
            status = _without(status, Source.VTPM_SERVICE)
            return dataclasses.replace(
                status,
                last_vtpm_pass=now,
                token_expiry=token_expiry,
                fresh=status.fresh | {Check.VTPM},
            )
        case GpuCollateralUnreachable(detail, reason):
            line = f"GPU evidence collateral unreachable: {_detail(detail)}"
            return _with_fault(status, Fault(Source.GPU_COLLATERAL, reason, line, now))
        case VtpmUnreachable(reason, detail):
            line = f"vTPM attestation service unreachable: {_detail(detail)}"
            return _with_fault(status, Fault(Source.VTPM_SERVICE, reason, line, now))
        case GpuReset(detail):
            line = "GPU reset; its evidence must pass again" + (
                f": {_detail(detail)}" if detail else ""
            )
            fault = Fault(
                Source.GPU_RESET, Reason.GPU_RESET, line, now, now + policy.gpu_reset_grace_s
            )
            status = dataclasses.replace(status, fresh=status.fresh - {Check.GPU})
            if any(f.source is Source.GPU_RESET for f in status.faults):
                return status  # a reset during a reset: the first deadline stands
            return _with_fault(status, fault)
        case AkCertRenewalFailed(cause, detail, cert_expiry):
            line = f"AK certificate renewal failed ({cause}): {_detail(detail)}"
            # A failure may bring the known expiry forward, never push it back: only a
            # renewal does that, so a failed one cannot lift an expiry's revocation.
            if status.ak_cert_expiry is not None:
                cert_expiry = min(cert_expiry, status.ak_cert_expiry)
            status = dataclasses.replace(status, ak_cert_expiry=cert_expiry)
            fault = Fault(Source.AK_CERT, Reason.AK_CERT_RENEWAL_FAILED, line, now, cert_expiry)
            return _with_fault(status, fault)
        case AkCertRenewed(cert_expiry):
            status = _without(status, Source.AK_CERT)
            return dataclasses.replace(status, ak_cert_expiry=cert_expiry)
    return status


_SERVICE = {Check.GPU: Source.GPU_COLLATERAL, Check.VTPM: Source.VTPM_SERVICE}


def _ak_expired(status: Status, now: float) -> bool:
    return status.ak_cert_expiry is not None and now >= status.ak_cert_expiry


def _expired(status: Status, now: float, policy: Policy) -> tuple[Reason, str] | None:
    """Why the state is revoked at ``now`` without a new failure, if it is: an expired AK
    certificate (in any state), or, for ``healthy`` and ``degraded``, a grace that ended."""
    if status.ak_cert_expiry is not None and _ak_expired(status, now):
        return Reason.AK_CERT_EXPIRED, f"AK certificate expired at {_utc(status.ak_cert_expiry)}"
    if status.state not in (State.HEALTHY, State.DEGRADED):
        return None
    for fault in status.faults:
        if fault.deadline is not None and now >= fault.deadline:
            return Reason.GRACE_EXPIRED, f"{fault.line} ({fault.reason}), past its grace"
    for check in Check:
        until = status.valid_until(check, policy)
        if until is None or now < until:
            continue
        line = f"no {_CHECK_NAMES[check]} pass since {_utc(until)}, the end of its grace"
        for fault in status.faults:
            if fault.source is _SERVICE[check]:
                line += f": {fault.line} ({fault.reason})"
        return Reason.GRACE_EXPIRED, line
    return None


def _usable(status: Status, now: float, policy: Policy) -> frozenset[Check]:
    """The fresh passes still within their grace."""
    return frozenset(
        check
        for check in status.fresh
        if (until := status.valid_until(check, policy)) is not None and now < until
    )


def _degraded(status: Status, policy: Policy) -> tuple[Reason, str]:
    if not status.faults:
        return Reason.ATTESTD_REATTESTING, f"recovering: {_waiting(status.fresh)}"
    deadline = status.deadline(policy)
    fault = min(
        status.faults,
        key=lambda f: (f.deadline if f.deadline is not None else math.inf, f.since),
    )
    line = fault.line
    if deadline is not None:
        line += f"; revoked at {_utc(deadline)} unless it recovers"
    if len(status.faults) > 1:
        line += f" (and {len(status.faults) - 1} more)"
    return fault.reason, line


def _enter(status: Status, state: State, reason: Reason, line: str, now: float) -> Status:
    line = printable(line, LINE_CHARS)
    if state is status.state:
        return dataclasses.replace(status, reason=reason, line=line)
    # A new state: its time begins now, and a non-healthy one forgets earlier passes.
    fresh = status.fresh if state is State.HEALTHY else frozenset()
    return dataclasses.replace(
        status, state=state, reason=reason, line=line, since=now, fresh=fresh
    )


def step(current: Status, observation: Observation, now: float, policy: Policy) -> Transition:
    """Decide the state after ``observation`` at ``now``."""
    _finite(now, "now")
    failure = _hard_failure(observation)
    if failure is not None:
        reason, line = failure
        if current.state is State.REVOKED and current.reason is reason:
            line = current.line  # the same failure again: its first explanation stands
        after = _enter(current, State.REVOKED, reason, line, now)
        after = dataclasses.replace(after, fresh=frozenset())
        return Transition(current, after, now)

    status = _record(current, observation, now, policy)
    if status.state is not State.REVOKED:
        expired = _expired(status, now, policy)
        if expired is not None:
            return Transition(current, _enter(status, State.REVOKED, *expired, now), now)

    usable = _usable(status, now, policy)
    status = dataclasses.replace(status, fresh=usable)
    # Revoked for an expired AK certificate stays so until a renewal, whatever passes.
    full = usable == frozenset(Check) and not _ak_expired(status, now)

    if full and not status.faults:
        after = _enter(status, State.HEALTHY, Reason.ATTESTD_HEALTHY, HEALTHY_LINE, now)
    elif full or status.state in (State.HEALTHY, State.DEGRADED):
        # Healthy with a fault is degraded. So is a full pass out of starting or revoked with a
        # fault still open (an AK renewal failing, a service unreachable since its pass).
        after = _enter(status, State.DEGRADED, *_degraded(status, policy), now)
    elif status.state is State.STARTING:
        after = _starting(status)
    else:  # revoked: the reason stands until a full pass
        after = status
    return Transition(current, after, now)


def _starting(status: Status) -> Status:
    waiting = _waiting(status.fresh)
    if status.faults:
        fault = status.faults[0]
        return dataclasses.replace(
            status, reason=fault.reason, line=printable(f"{waiting}; {fault.line}", LINE_CHARS)
        )
    return dataclasses.replace(status, reason=Reason.ATTESTD_STARTING, line=waiting)


__all__ = [
    "AkCertRenewalFailed",
    "AkCertRenewed",
    "Check",
    "Fault",
    "GpuCollateralUnreachable",
    "GpuEvidenceFailed",
    "GpuEvidencePassed",
    "GpuFastFailed",
    "GpuFastOk",
    "GpuReset",
    "Observation",
    "Policy",
    "Source",
    "State",
    "Status",
    "Tick",
    "Transition",
    "VtpmNonCompliant",
    "VtpmPassed",
    "VtpmUnreachable",
    "log_line",
    "reason_fits",
    "step",
]
