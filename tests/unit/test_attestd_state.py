"""attestd's state machine: a table test for each rule, and hypothesis over random sequences
of observations checking the invariants the rest of the appliance relies on."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from attestd import state as sm
from attestd.state import (
    AkCertRenewalFailed,
    AkCertRenewed,
    GpuCollateralUnreachable,
    GpuEvidenceFailed,
    GpuEvidencePassed,
    GpuFastFailed,
    GpuFastOk,
    GpuReset,
    Observation,
    Policy,
    Status,
    Tick,
    Transition,
    VtpmNonCompliant,
    VtpmPassed,
    VtpmUnreachable,
    log_line,
    step,
)
from confinfer.attestd_api import Event, GpuSummary, Health, State, reason_fits
from confinfer.errors import Kind, Reason

pytestmark = [pytest.mark.unit, pytest.mark.timeout(300)]

POLICY = Policy(gpu_grace_s=100.0, vtpm_grace_s=200.0, gpu_reset_grace_s=30.0)
TOKEN = 10_000.0  # a token expiry far beyond the tests' times

GPU_OK = GpuEvidencePassed("1 GPU, nonce matches")
VTPM_OK = VtpmPassed(TOKEN, "sevsnpvm, compliant")
CC_OFF = GpuFastFailed(Reason.GPU_CC_OFF, "GPU-1: CC feature off")
MAA_DOWN = VtpmUnreachable(Reason.MAA_UNAVAILABLE, "HTTP 503 after 4 retries")
RIM_DOWN = GpuCollateralUnreachable("RIM service: connection refused")


def run(observations: Sequence[tuple[float, Observation]], start: Status | None = None) -> Status:
    status = start or Status.initial(0.0)
    for now, observation in observations:
        status = step(status, observation, now, POLICY).after
    return status


def healthy_at(t: float = 2.0) -> Status:
    status = run([(t - 1, GPU_OK), (t, VTPM_OK)])
    assert status.state is State.HEALTHY
    return status


# --- starting -> healthy only after a full pass ------------------------------------------------


def test_initial_state() -> None:
    status = Status.initial(5.0)
    assert (status.state, status.reason, status.since) == (
        State.STARTING,
        Reason.ATTESTD_STARTING,
        5.0,
    )
    assert status.line == "waiting for a pass of GPU evidence and vTPM attestation"
    assert status.status_line() == (
        "starting (attestd-starting): waiting for a pass of GPU evidence and vTPM attestation"
    )


@pytest.mark.parametrize(
    ("observations", "state", "reason"),
    [
        ([GPU_OK], State.STARTING, Reason.ATTESTD_STARTING),
        ([VTPM_OK], State.STARTING, Reason.ATTESTD_STARTING),
        ([GpuFastOk(), Tick()], State.STARTING, Reason.ATTESTD_STARTING),
        ([GPU_OK, GPU_OK], State.STARTING, Reason.ATTESTD_STARTING),
        ([GPU_OK, VTPM_OK], State.HEALTHY, Reason.ATTESTD_HEALTHY),
        ([VTPM_OK, GPU_OK], State.HEALTHY, Reason.ATTESTD_HEALTHY),
        ([MAA_DOWN], State.STARTING, Reason.MAA_UNAVAILABLE),
        ([GPU_OK, MAA_DOWN, VTPM_OK], State.HEALTHY, Reason.ATTESTD_HEALTHY),
        ([RIM_DOWN], State.STARTING, Reason.GPU_COLLATERAL_UNAVAILABLE),
        ([GPU_OK, GpuReset("xid 79"), VTPM_OK], State.STARTING, Reason.GPU_RESET),
        ([CC_OFF], State.REVOKED, Reason.GPU_CC_OFF),
        # a pass before a failure does not count towards the full pass
        ([GPU_OK, CC_OFF, VTPM_OK], State.REVOKED, Reason.GPU_CC_OFF),
        # a full pass with a fault still open is degraded, not healthy
        ([VTPM_OK, MAA_DOWN, GPU_OK], State.DEGRADED, Reason.MAA_UNAVAILABLE),
    ],
)
def test_starting(observations: list[Observation], state: State, reason: Reason) -> None:
    status = run([(float(i + 1), o) for i, o in enumerate(observations)])
    assert (status.state, status.reason) == (state, reason)


def test_starting_says_what_it_waits_for() -> None:
    assert run([(1, GPU_OK)]).line == "waiting for a pass of vTPM attestation"
    status = run([(1, MAA_DOWN)])
    assert status.line == (
        "waiting for a pass of GPU evidence and vTPM attestation; "
        "vTPM attestation service unreachable: HTTP 503 after 4 retries"
    )


def test_a_pass_past_its_grace_does_not_count_at_start() -> None:
    """GPU evidence passed, then MAA stayed down longer than the GPU grace: a new GPU pass is
    needed, not a healthy state built on stale evidence."""
    status = run([(1, GPU_OK), (2, MAA_DOWN), (150, VTPM_OK)])
    assert (status.state, status.reason) == (State.STARTING, Reason.ATTESTD_STARTING)
    assert status.line == "waiting for a pass of GPU evidence"
    assert run([(151, GPU_OK)], status).state is State.HEALTHY


def test_a_token_that_expires_before_the_grace_bounds_the_pass() -> None:
    status = run([(1, VtpmPassed(token_expiry=20.0)), (25, GPU_OK)])
    assert status.state is State.STARTING


# --- any measured hard failure -> revoked at once --------------------------------------------

HARD_FAILURES: list[Observation] = [
    GpuFastFailed(Reason.GPU_CC_OFF, "CC off"),
    GpuFastFailed(Reason.GPU_NOT_PRODUCTION, "environment DEVEL"),
    GpuFastFailed(Reason.GPU_DEVTOOLS, "DevTools on"),
    GpuFastFailed(Reason.GPU_COUNT_MISMATCH, "1 GPU, 2 configured"),
    GpuFastFailed(Reason.GPU_LOST, "GPU-1 gone"),
    GpuEvidenceFailed(Reason.GPU_EVIDENCE_INVALID, "measres: fail"),
    GpuEvidenceFailed(Reason.GPU_NONCE_MISMATCH, "eat_nonce differs"),
    VtpmNonCompliant(Reason.POLICY_UNSATISFIED, "x-ms-compliance-status is not compliant"),
    VtpmNonCompliant(Reason.TOKEN_BAD_SIGNATURE, "signature"),
    VtpmNonCompliant(Reason.MAA_REFUSED, "400 InvalidEvidence"),
]


def _prefix(observation: Observation) -> str:
    if isinstance(observation, GpuFastFailed):
        return "GPU fast check failed: "
    if isinstance(observation, GpuEvidenceFailed):
        return "GPU evidence refused: "
    return "vTPM attestation refused: "


@pytest.mark.parametrize("failure", HARD_FAILURES)
@pytest.mark.parametrize(
    "before",
    [
        Status.initial(0.0),
        healthy_at(),
        run([(3, MAA_DOWN)], healthy_at()),
        run([(3, CC_OFF)], healthy_at()),
    ],
    ids=["starting", "healthy", "degraded", "revoked"],
)
def test_hard_failure_revokes_at_once(failure: Observation, before: Status) -> None:
    transition = step(before, failure, 10.0, POLICY)
    after = transition.after
    assert after.state is State.REVOKED
    assert after.reason is getattr(failure, "reason", None)
    if before.state is State.REVOKED and before.reason is after.reason:
        assert after.line == before.line  # the same failure again: its first line stands
        assert not transition.changed
    else:
        assert after.line == _prefix(failure) + getattr(failure, "detail", "")
    assert after.fresh == frozenset()
    if before.state is not State.REVOKED:
        assert after.since == 10.0


@pytest.mark.parametrize("reason", [Reason.MAA_UNAVAILABLE, Reason.ATTESTD_HEALTHY])
def test_a_hard_failure_cannot_carry_an_unavailable_reason(reason: Reason) -> None:
    with pytest.raises(ValueError, match="not a hard failure"):
        GpuFastFailed(reason, "x")
    with pytest.raises(ValueError, match="not a hard failure"):
        VtpmNonCompliant(reason, "x")


@pytest.mark.parametrize(
    "reason", [Reason.GPU_CC_OFF, Reason.POLICY_UNSATISFIED, Reason.ATTESTD_HEALTHY]
)
def test_unreachable_needs_an_unavailable_reason(reason: Reason) -> None:
    with pytest.raises(ValueError, match="not an unavailable reason"):
        VtpmUnreachable(reason, "x")
    with pytest.raises(ValueError, match="not an unavailable reason"):
        GpuCollateralUnreachable("x", reason)


# --- unreachable -> degraded within grace, revoked after ---------------------------------------


def test_maa_unreachable_is_degraded_within_grace_then_revoked() -> None:
    status = healthy_at(2.0)  # vTPM passed at 2: good until 202
    degraded = step(status, MAA_DOWN, 50.0, POLICY)
    assert degraded.after.state is State.DEGRADED
    assert degraded.after.reason is Reason.MAA_UNAVAILABLE
    # The GPU pass (at 1, grace 100) runs out first: the line names the earliest deadline.
    assert degraded.after.line == (
        "vTPM attestation service unreachable: HTTP 503 after 4 retries; "
        "revoked at 1970-01-01T00:01:41Z unless it recovers"
    )
    gpu_again = step(degraded.after, GPU_OK, 60.0, POLICY).after
    assert gpu_again.state is State.DEGRADED
    assert gpu_again.deadline(POLICY) == 160.0
    still = step(gpu_again, Tick(), 159.9, POLICY).after
    assert still.state is State.DEGRADED
    over = step(still, Tick(), 160.0, POLICY).after
    assert (over.state, over.reason) == (State.REVOKED, Reason.GRACE_EXPIRED)
    assert over.line == ("no GPU evidence pass since 1970-01-01T00:02:40Z, the end of its grace")


def test_vtpm_grace_expiry_names_the_unreachable_service() -> None:
    status = run([(1, GPU_OK), (2, VTPM_OK), (3, MAA_DOWN), (100, GPU_OK), (199, GPU_OK)])
    assert status.state is State.DEGRADED
    over = step(status, Tick(), 202.0, POLICY).after
    assert (over.state, over.reason) == (State.REVOKED, Reason.GRACE_EXPIRED)
    assert over.line == (
        "no vTPM attestation pass since 1970-01-01T00:03:22Z, the end of its grace: "
        "vTPM attestation service unreachable: HTTP 503 after 4 retries (maa-unavailable)"
    )


def test_degraded_is_bounded_by_the_token_too() -> None:
    status = run([(1, GPU_OK), (2, VtpmPassed(token_expiry=50.0)), (10, MAA_DOWN)])
    assert status.state is State.DEGRADED
    assert status.deadline(POLICY) == 50.0
    assert run([(50, Tick())], status).state is State.REVOKED


def test_collateral_unreachable_is_degraded() -> None:
    status = run([(10, RIM_DOWN)], healthy_at())
    assert (status.state, status.reason) == (State.DEGRADED, Reason.GPU_COLLATERAL_UNAVAILABLE)
    assert run([(101, Tick())], status).reason is Reason.GRACE_EXPIRED


def test_unreachable_past_its_grace_already_revokes() -> None:
    status = healthy_at(2.0)
    after = step(status, MAA_DOWN, 500.0, POLICY).after
    assert (after.state, after.reason) == (State.REVOKED, Reason.GRACE_EXPIRED)


def test_healthy_without_new_results_expires_on_a_tick() -> None:
    """A silent check loop: nothing observed, the grace runs out, the state is revoked."""
    status = healthy_at(2.0)
    assert step(status, Tick(), 100.9, POLICY).after.state is State.HEALTHY
    after = step(status, Tick(), 101.0, POLICY).after
    assert (after.state, after.reason) == (State.REVOKED, Reason.GRACE_EXPIRED)


def test_regular_passes_keep_healthy_forever() -> None:
    status = healthy_at(2.0)
    for t in range(10, 2000, 50):
        for observation in (GpuFastOk(), GPU_OK, VTPM_OK, Tick()):
            transition = step(status, observation, float(t), POLICY)
            assert not transition.changed
            status = transition.after
    assert status.state is State.HEALTHY
    assert status.since == 2.0


# --- back to healthy only through a full pass ---------------------------------------------------


def test_degraded_recovers_only_through_a_full_pass() -> None:
    status = run([(10, MAA_DOWN)], healthy_at())
    recovering = step(status, VTPM_OK, 20.0, POLICY).after
    assert (recovering.state, recovering.reason) == (
        State.DEGRADED,
        Reason.ATTESTD_REATTESTING,
    )
    assert recovering.line == "recovering: waiting for a pass of GPU evidence"
    healthy = step(recovering, GPU_OK, 21.0, POLICY)
    assert healthy.after.state is State.HEALTHY
    assert healthy.after.since == 21.0
    assert healthy.event() == Event(
        State.HEALTHY, Reason.ATTESTD_HEALTHY, sm.HEALTHY_LINE, 21.0, State.DEGRADED
    )


def test_revoked_recovers_only_through_a_full_pass() -> None:
    status = run([(10, CC_OFF)], healthy_at())
    for observation in (GPU_OK, GpuFastOk(), Tick(), GPU_OK):
        status = step(status, observation, 20.0, POLICY).after
        assert (status.state, status.reason) == (State.REVOKED, Reason.GPU_CC_OFF)
    assert run([(21, VTPM_OK)], status).state is State.HEALTHY


def test_revoked_with_a_fault_open_recovers_to_degraded() -> None:
    status = run([(10, CC_OFF), (11, GPU_OK), (12, RIM_DOWN), (13, VTPM_OK)])
    assert (status.state, status.reason) == (State.DEGRADED, Reason.GPU_COLLATERAL_UNAVAILABLE)
    assert status.since == 13.0
    # degraded began at 13: the way to healthy is a full pass after it
    status = run([(14, GPU_OK)], status)
    assert (status.state, status.reason) == (State.DEGRADED, Reason.ATTESTD_REATTESTING)
    assert run([(15, VTPM_OK)], status).state is State.HEALTHY


def test_gpu_reset_is_degraded_until_its_evidence_passes() -> None:
    status = run([(10, GpuReset("Xid 79"))], healthy_at())
    assert (status.state, status.reason) == (State.DEGRADED, Reason.GPU_RESET)
    assert status.line.startswith("GPU reset; its evidence must pass again: Xid 79; revoked at")
    # a second reset does not move the deadline
    assert run([(20, GpuReset())], status).deadline(POLICY) == 40.0
    assert run([(40, Tick())], status).reason is Reason.GRACE_EXPIRED
    recovered = run([(20, GPU_OK)], status)
    assert recovered.reason is Reason.ATTESTD_REATTESTING
    assert run([(21, VTPM_OK)], recovered).state is State.HEALTHY


def test_ak_renewal_failure_is_degraded_until_the_certificate_expires() -> None:
    status = run(
        [(10, AkCertRenewalFailed(Reason.IMDS_UNAVAILABLE, "timeout", 90.0))], healthy_at()
    )
    assert (status.state, status.reason) == (State.DEGRADED, Reason.AK_CERT_RENEWAL_FAILED)
    assert status.line == (
        "AK certificate renewal failed (imds-unavailable): timeout; "
        "revoked at 1970-01-01T00:01:30Z unless it recovers"
    )
    over = run([(90, Tick())], status)
    assert (over.state, over.reason) == (State.REVOKED, Reason.AK_CERT_EXPIRED)
    # revoked for an expired certificate: passes are not enough, a renewal is needed
    assert run([(91, GPU_OK), (92, VTPM_OK)], over).state is State.REVOKED
    renewed = run([(93, AkCertRenewed(10_000.0)), (94, GPU_OK), (95, VTPM_OK)], over)
    assert renewed.state is State.HEALTHY


def test_ak_renewed_then_a_full_pass_is_healthy() -> None:
    status = run([(10, AkCertRenewalFailed(Reason.IMDS_TOKEN_REFUSED, "403", 500.0))], healthy_at())
    status = run([(11, AkCertRenewed(900.0))], status)
    assert (status.state, status.reason) == (State.DEGRADED, Reason.ATTESTD_REATTESTING)
    assert run([(12, GPU_OK), (13, VTPM_OK)], status).state is State.HEALTHY


def test_an_expired_ak_certificate_at_start_revokes() -> None:
    status = run([(1, AkCertRenewed(5.0)), (6, Tick())])
    assert (status.state, status.reason) == (State.REVOKED, Reason.AK_CERT_EXPIRED)


# --- lines, events, health ----------------------------------------------------------------------


def test_log_line_is_canonical() -> None:
    transition = step(healthy_at(2.0), CC_OFF, 62.0, POLICY)
    assert log_line(transition) == (
        "state=revoked reason=gpu-cc-off from=healthy/attestd-healthy held_s=60.0: "
        "GPU fast check failed: GPU-1: CC feature off"
    )
    assert transition.changed and transition.state_changed
    assert transition.event() == Event(
        State.REVOKED,
        Reason.GPU_CC_OFF,
        "GPU fast check failed: GPU-1: CC feature off",
        62.0,
        State.HEALTHY,
    )


def test_hostile_details_become_one_printable_line() -> None:
    detail = "nvattest said:\n<0>forged line\x1b[2J" + "x" * 5000
    after = step(healthy_at(), GpuEvidenceFailed(Reason.GPU_EVIDENCE_INVALID, detail), 5, POLICY)
    assert after.after.line.isprintable()
    assert "\\n<0>forged line\\x1b[2J" in after.after.line
    assert len(after.after.line) < 400
    assert log_line(after).isprintable()


def test_health_from_status() -> None:
    status = healthy_at(2.0)
    health = status.health(GpuSummary(0, 1, ()))
    assert health == Health(
        State.HEALTHY,
        Reason.ATTESTD_HEALTHY,
        sm.HEALTHY_LINE,
        2.0,
        1.0,
        2.0,
        TOKEN,
        None,
        GpuSummary(0, 1, ()),
    )
    assert Health.from_json(health.to_json()) == health


@pytest.mark.parametrize(
    "kwargs",
    [
        {"gpu_grace_s": 0.0, "vtpm_grace_s": 1.0},
        {"gpu_grace_s": 1.0, "vtpm_grace_s": -1.0},
        {"gpu_grace_s": float("inf"), "vtpm_grace_s": 1.0},
        {"gpu_grace_s": 1.0, "vtpm_grace_s": 1.0, "gpu_reset_grace_s": float("nan")},
    ],
)
def test_policy_is_checked(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="grace_s"):
        Policy(**kwargs)


def test_time_must_be_finite() -> None:
    with pytest.raises(ValueError, match="now"):
        step(Status.initial(0), Tick(), float("nan"), POLICY)
    with pytest.raises(ValueError, match="token_expiry"):
        VtpmPassed(float("inf"))


# --- invariants over random sequences ----------------------------------------------------------

_details = st.text(max_size=40)
_unavailable = st.sampled_from(
    [r for r in Reason if r.kind is Kind.UNAVAILABLE and r not in sm._STATE_REASONS]
)
_measured = st.sampled_from([r for r in Reason if r.kind is not Kind.UNAVAILABLE])
_observations: st.SearchStrategy[Observation] = st.one_of(
    st.just(Tick()),
    st.just(GpuFastOk()),
    st.builds(GpuFastFailed, _measured, _details),
    st.builds(GpuReset, _details),
    st.builds(GpuEvidencePassed, _details),
    st.builds(GpuEvidenceFailed, _measured, _details),
    st.builds(GpuCollateralUnreachable, _details, _unavailable),
    st.builds(VtpmPassed, st.floats(0, 3000), _details),
    st.builds(VtpmNonCompliant, _measured, _details),
    st.builds(VtpmUnreachable, _unavailable, _details),
    st.builds(AkCertRenewalFailed, st.sampled_from(list(Reason)), _details, st.floats(0, 2000)),
    st.builds(AkCertRenewed, st.floats(1000, 9000)),
)
# Mostly passes and ticks, so that sequences reach healthy and then break in every way.
_routine = st.sampled_from([GPU_OK, VTPM_OK, Tick(), GpuFastOk()])
_weighted = st.integers(0, 9).flatmap(lambda i: _routine if i < 8 else _observations)
_policies = st.builds(Policy, st.floats(20, 500), st.floats(20, 500), st.floats(1, 100))
_sequences = st.lists(st.tuples(st.floats(0, 10), _weighted), max_size=60)


def _walk(
    policy: Policy, steps: list[tuple[float, Observation]]
) -> list[tuple[Observation, Transition]]:
    status = Status.initial(0.0)
    now = 0.0
    out = []
    for gap, observation in steps:
        now += gap
        transition = step(status, observation, now, policy)
        out.append((observation, transition))
        status = transition.after
    return out


def _is_pass(observation: Observation) -> bool:
    return isinstance(observation, GpuEvidencePassed | VtpmPassed)


def _is_failure(observation: Observation) -> bool:
    return isinstance(observation, GpuFastFailed | GpuEvidenceFailed | VtpmNonCompliant)


@settings(max_examples=1000)
@given(_policies, _sequences)
def test_invariants(policy: Policy, steps: list[tuple[float, Observation]]) -> None:
    walk = _walk(policy, steps)
    gpu_since = vtpm_since = False  # passes since the last non-healthy state began
    for observation, transition in walk:
        before, after = transition.before, transition.after
        if transition.state_changed:
            event(f"{before.state} -> {after.state}")

        # every state carries a registered reason that fits it, and a printable line
        assert after.reason in set(Reason)
        assert reason_fits(after.state, after.reason), (after.state, after.reason)
        assert after.line and after.line.isprintable()
        assert log_line(transition).isprintable()
        assert after.status_line().isprintable()
        Event.from_json(transition.event().to_json())  # what goes on the socket parses back

        # a measured hard failure is revoked at once, whatever came before
        if _is_failure(observation):
            assert after.state is State.REVOKED
            assert after.reason is getattr(observation, "reason", None)

        # track full passes since the last entry into a non-healthy state (or failure)
        if after.state is not State.HEALTHY and (
            transition.state_changed or _is_failure(observation)
        ):
            gpu_since = vtpm_since = False
        else:
            gpu_since |= isinstance(observation, GpuEvidencePassed)
            vtpm_since |= isinstance(observation, VtpmPassed)

        # never healthy without a full pass since the last non-healthy state
        if after.state is State.HEALTHY:
            assert gpu_since and vtpm_since
            assert after.last_gpu_pass is not None and after.last_vtpm_pass is not None
            assert not after.faults

        # revoked never leaves except by a full pass since it began (the last pass, or the
        # renewal of an expired AK certificate, completes it)
        if before.state is State.REVOKED and after.state is not State.REVOKED:
            assert _is_pass(observation) or isinstance(observation, AkCertRenewed)
            assert after.state is State.DEGRADED or (gpu_since and vtpm_since)

        # starting leaves only for revoked, or through a full pass
        if before.state is State.STARTING and after.state in (State.HEALTHY, State.DEGRADED):
            assert _is_pass(observation)

        # degraded never outlives grace: while degraded, no pass is past its grace and no
        # fault past its deadline
        if after.state is State.DEGRADED:
            deadline = after.deadline(policy)
            assert deadline is not None and transition.now < deadline
            for check in sm.Check:
                until = after.valid_until(check, policy)
                assert until is not None and transition.now < until
            assert after.faults or after.reason is Reason.ATTESTD_REATTESTING

        # the time in a state begins when it is entered
        if transition.state_changed:
            assert after.since == transition.now
        else:
            assert after.since == before.since

        # a changed state, reason or line is a transition; nothing else is
        assert transition.changed == (
            (before.state, before.reason, before.line) != (after.state, after.reason, after.line)
        )


@given(_policies, _sequences, st.floats(0, 3000))
def test_a_tick_never_makes_anything_better(
    policy: Policy, steps: list[tuple[float, Observation]], gap: float
) -> None:
    """Time alone never moves towards healthy: a tick keeps the state, or revokes."""
    walk = _walk(policy, steps)
    status = walk[-1][1].after if walk else Status.initial(0.0)
    now = (walk[-1][1].now if walk else 0.0) + gap
    after = step(status, Tick(), now, policy).after
    assert after.state is status.state or after.state is State.REVOKED
    if after.state is State.REVOKED and status.state is not State.REVOKED:
        assert after.reason in (Reason.GRACE_EXPIRED, Reason.AK_CERT_EXPIRED)


def test_a_failed_renewal_never_lifts_an_expired_certificates_revocation() -> None:
    # Found by test_invariants: the AK certificate expired (revoked), both checks passed,
    # then a failed renewal reported a later expiry. Only a renewal may push it back.
    walk = _walk(
        Policy(20.0, 20.0, 1.0),
        [
            (0.0, AkCertRenewalFailed(Reason.USAGE, "", 0.0)),
            (0.0, GpuEvidencePassed(detail="1 GPU, nonce matches")),
            (0.0, VtpmPassed(token_expiry=10000.0, detail="sevsnpvm, compliant")),
            (0.0, AkCertRenewalFailed(Reason.USAGE, "", 1.0)),
        ],
    )
    after = walk[-1][1].after
    assert (after.state, after.reason) == (State.REVOKED, Reason.AK_CERT_EXPIRED)
    assert after.ak_cert_expiry == 0.0
