"""attestd, the daemon: it runs the checks on their timers, feeds the state machine, and says
what it decided to systemd, to the journal, to the socket's clients and to the GPU.

Three check loops run side by side on one asyncio event loop; each check itself runs in a
worker thread, and only the event loop thread touches the state:

- **fast** (every ``gpu_fast_check_s``): the NVML checks (:class:`attestd.gpu.GpuChecker`). A
  reset or a changed GPU set wakes the GPU evidence loop at once. This loop is the watchdog's
  heartbeat: ``WATCHDOG=1`` is sent from it, between checks, so a hung NVML call stops the
  pings and systemd kills and restarts the daemon. It also withholds the pings when another
  check has run far past its own deadline (a vTPM call that never returns).
- **gpu** (at start, every ``gpu_evidence_interval_s``, on a reset): full GPU evidence through the
  configured backend (nvattest, or the legacy Python verifier).
- **vtpm** (at start, every ``vtpm_attest_interval_s`` and never later than half the remaining
  life of the last token): renew the AK certificate through IMDS when it is due, then MAA guest
  attestation with the claims policy (:class:`attestd.vtpm.VtpmChecker`).

A failed check is retried with a backoff (:data:`RETRY_FIRST_S` doubling, at most the check's
interval), so an outage never turns into a busy loop. When the state leaves ``healthy`` the
machine forgets earlier passes (attestd.state), and every check that must pass again is woken,
within its backoff.

On each change the daemon logs the one canonical line (:func:`attestd.state.log_line`, at a
priority that fits the state), sends ``STATUS=``, publishes the event, and updates the metrics.
``READY=1`` goes out on the first ``healthy``; the GPU ready state is set on every entry into
``healthy`` and cleared on revocation and at stop. SIGTERM sends ``STOPPING=1``, ends the
event streams, clears the ready state and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from attestd import state as machine
from attestd.events import EventHub
from attestd.gpu import GpuChecker, NvmlError
from attestd.gpuevidence import GpuEvidenceResult, NvattestBackend, NvattestOptions
from attestd.metrics import Metrics
from attestd.state import Check, Observation, Policy, Status, Tick, Transition
from attestd.vtpm import VtpmChecker
from confinfer import __version__, config, daemons, log, sdnotify
from confinfer.attestd_api import Event, Evidence, GpuSummary, Health, State
from confinfer.config import Config
from confinfer.errors import ConfigError, ConfinferError, Kind, Reason, ServiceError, printable

LOG = logging.getLogger("attestd")

RETRY_FIRST_S = 5.0  # the first retry after a failed check; doubles up to the check's interval
TOKEN_REFRESH_FRACTION = 0.5  # attest again after this share of a token's remaining life
MIN_VTPM_INTERVAL_S = 5.0
# A check that runs this long past its own bound is hung: the watchdog pings stop.
HUNG_MARGIN_S = 60.0
MAX_TLS_KEY_BYTES = 256 * 1024

_LEVELS = {
    State.STARTING: logging.INFO,
    State.HEALTHY: logging.INFO,
    State.DEGRADED: logging.WARNING,
    State.REVOKED: logging.ERROR,
}


class EvidenceBackend(Protocol):
    """A GPU evidence backend (attestd.gpuevidence.NvattestBackend, attestd.lgv.LgvBackend)."""

    name: str

    def attest(self, nonce: str | None = None) -> GpuEvidenceResult: ...


def evidence_backend(cfg: Config) -> EvidenceBackend:
    """The configured GPU evidence backend."""
    if cfg.gpu_evidence_backend == "lgv":
        from attestd.lgv import LgvBackend, LgvOptions

        return LgvBackend(LgvOptions.from_config(cfg, cfg.gpu_expected_count))
    return NvattestBackend(NvattestOptions.from_config(cfg, cfg.gpu_expected_count))


def policy_from_config(cfg: Config) -> Policy:
    """The state machine's graces; each must outlast its check's interval, or a healthy VM
    would be revoked between two passes."""
    pairs = (
        ("gpu_grace_s", cfg.gpu_grace_s, "gpu_evidence_interval_s", cfg.gpu_evidence_interval_s),
        ("vtpm_grace_s", cfg.vtpm_grace_s, "vtpm_attest_interval_s", cfg.vtpm_attest_interval_s),
    )
    for grace_key, grace, interval_key, interval in pairs:
        if grace <= interval:
            raise ConfigError(
                f"{grace_key} ({grace:g} s) must be longer than {interval_key} ({interval:g} s)",
                reason=Reason.CONFIG_INVALID,
                hint="a pass must stay good until the next one",
            )
    return Policy(cfg.gpu_grace_s, cfg.vtpm_grace_s, cfg.gpu_reset_grace_s)


def tls_key_sha256(path: Path) -> str:
    """SHA-256 (hex) of the SubjectPublicKeyInfo in a PEM certificate or public key."""
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_TLS_KEY_BYTES + 1)
    except OSError as exc:
        raise ServiceError(
            f"evidence_tls_key {printable(path, 200)}: {printable(exc.strerror or exc, 200)}",
            reason=Reason.EVIDENCE_UNAVAILABLE,
        ) from None
    try:
        if len(data) > MAX_TLS_KEY_BYTES:
            raise ValueError("file too large")
        if b"-----BEGIN CERTIFICATE-----" in data:
            spki = (
                x509.load_pem_x509_certificate(data)
                .public_key()
                .public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
        else:
            spki = serialization.load_pem_public_key(data).public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
    except ValueError as exc:
        raise ServiceError(
            f"evidence_tls_key {printable(path, 200)}: not a PEM certificate or public key: "
            f"{printable(exc, 200)}",
            reason=Reason.EVIDENCE_UNAVAILABLE,
        ) from None
    return hashlib.sha256(spki).hexdigest()


class Daemon:
    """The daemon's state and loops; :meth:`run` until ``stop`` is set.

    Implements the server's Source protocol (attestd.server): :attr:`metrics`, :attr:`events`,
    :meth:`health`, :meth:`current_event` and :meth:`evidence`.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        gpu: GpuChecker,
        backend: EvidenceBackend,
        vtpm: VtpmChecker,
        metrics: Metrics | None = None,
        events: EventHub | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.policy = policy_from_config(cfg)
        self.gpu = gpu
        self.backend = backend
        self.vtpm = vtpm
        self.metrics = metrics or Metrics()
        self.events = events or EventHub()
        self.clock = clock
        self.status = Status.initial(clock())
        self.ready_sent = False
        self.gpu_pass: GpuEvidenceResult | None = None  # the last passing GPU result
        self._wake = {check: asyncio.Event() for check in Check}
        self._running: dict[str, tuple[float, float]] = {}  # check -> (started, bound)
        self._tick: asyncio.TimerHandle | None = None
        self._ready_task: asyncio.Task[None] | None = None
        self._health: tuple[Status, GpuSummary, Health] | None = None
        self.metrics.set_state(self.status.state, self.status.reason)

    # -- the Source protocol -------------------------------------------------------------

    def health(self) -> Health:
        """The current health; the same object until the state or the GPU summary changes."""
        status, summary = self.status, self.gpu.summary()
        cached = self._health
        if cached is None or cached[0] is not status or cached[1] is not summary:
            cached = self._health = (status, summary, status.health(summary))
        return cached[2]

    def current_event(self) -> Event:
        return self.status.event(None)

    async def evidence(self, nonce: bytes) -> Evidence:
        """A fresh MAA token binding ``nonce``, the TLS key and the last GPU result."""
        status, gpu_pass = self.status, self.gpu_pass
        if (
            status.state is not State.HEALTHY
            or gpu_pass is None
            or gpu_pass.raw_json is None
            or gpu_pass.sha256 is None
        ):
            raise ServiceError(
                f"no evidence while attestd is {status.state} ({status.reason}): {status.line}",
                reason=Reason.EVIDENCE_UNAVAILABLE,
            )
        bound = {"gpu-result-sha256": gpu_pass.sha256}
        tls = None
        if self.cfg.evidence_tls_key is not None:
            tls = tls_key_sha256(self.cfg.evidence_tls_key)
            bound["tls-key-sha256"] = tls
        result = await asyncio.to_thread(self.vtpm.attest, nonce=nonce, bound_data=bound)
        obs = result.observation
        if isinstance(obs, machine.VtpmNonCompliant):
            self.feed(obs)  # measured: the VM no longer attests, whoever asked
        if not isinstance(obs, machine.VtpmPassed) or result.token is None:
            reason = getattr(obs, "reason", Reason.EVIDENCE_UNAVAILABLE)
            raise ServiceError(
                f"evidence attestation failed: {printable(getattr(obs, 'detail', ''), 300)}",
                reason=reason if reason.kind is Kind.UNAVAILABLE else Reason.EVIDENCE_UNAVAILABLE,
            )
        return Evidence(
            nonce=nonce.hex(),
            token=result.token,
            gpu_result=gpu_pass.raw_json.decode("utf-8"),
            gpu_result_sha256=gpu_pass.sha256,
            gpu_backend=self.backend.name,
            gpu_attested_at=gpu_pass.started_at,
            tls_key_sha256=tls,
            issued_at=self.clock(),
        )

    # -- the state ---------------------------------------------------------------------

    def feed(self, observation: Observation) -> Transition:
        """One step of the state machine, and everything a change means. Event loop only."""
        now = self.clock()
        transition = machine.step(self.status, observation, now, self.policy)
        self.status = after = transition.after
        if transition.changed:
            LOG.log(_LEVELS[after.state], "%s", machine.log_line(transition))
            if after.state is State.HEALTHY and not self.ready_sent:
                self.ready_sent = True  # the first full pass: READY=1 with its STATUS=
                sdnotify.ready(after.status_line())
            else:
                sdnotify.status(after.status_line())
        if transition.state_changed:
            self.metrics.transition(transition.before.state, after.state)
            self.events.publish(transition.event())
            if after.state is State.HEALTHY:
                self._set_ready(True)
            elif after.state is State.REVOKED:
                self._set_ready(False)
        if transition.changed:
            self.metrics.set_state(after.state, after.reason)
        for check in Check:
            if after.state is not State.HEALTHY and check not in after.fresh:
                self._wake[check].set()
        self._schedule_tick(now)
        return transition

    def _schedule_tick(self, now: float) -> None:
        """A Tick at the next deadline, so a grace ends on time even if nothing is observed."""
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        deadline = self.status.deadline(self.policy)
        if deadline is None or self.status.state is State.REVOKED:
            return
        with contextlib.suppress(RuntimeError):  # no running loop: a unit test's direct feed
            loop = asyncio.get_running_loop()
            delay = min(max(0.0, deadline - now) + 0.01, 86400.0)
            self._tick = loop.call_later(delay, self.feed, Tick())

    def _set_ready(self, ready: bool) -> None:
        """Set or clear the GPU ready state in a worker thread (NVML may be slow)."""

        async def apply() -> None:
            try:
                if ready:
                    await asyncio.to_thread(self.gpu.set_ready)
                else:
                    await asyncio.to_thread(self.gpu.clear_ready)
            except NvmlError as exc:
                LOG.error("cannot %s the GPU ready state: %s", "set" if ready else "clear", exc)
                return
            LOG.info("GPU ready state %s", "set" if ready else "cleared")

        previous = self._ready_task
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()

            async def ordered() -> None:
                if previous is not None:
                    await asyncio.gather(previous, return_exceptions=True)
                await apply()

            self._ready_task = loop.create_task(ordered())

    # -- the loops ---------------------------------------------------------------------

    async def _timed(
        self, check: str, bound: float, run: Callable[[], Awaitable[Observation]]
    ) -> Observation:
        started = time.monotonic()
        self._running[check] = (started, bound)
        try:
            observation = await run()
        finally:
            del self._running[check]
        reason = getattr(observation, "reason", None)
        if isinstance(observation, machine.AkCertRenewalFailed):
            reason = observation.cause
        self.metrics.check(check, time.monotonic() - started, reason, self.clock())
        return observation

    def _hung(self) -> str | None:
        now = time.monotonic()
        for check, (started, bound) in self._running.items():
            if now - started > bound + HUNG_MARGIN_S:
                return check
        return None

    async def fast_loop(self) -> None:
        interval = self.cfg.gpu_fast_check_s
        watchdog = sdnotify.watchdog_interval()
        slice_s = min(interval, watchdog / 2) if watchdog else interval
        while True:
            started = time.monotonic()
            observation = await self._timed(
                "gpu_fast", interval, lambda: asyncio.to_thread(self.gpu.check)
            )
            self.feed(observation)
            if isinstance(observation, machine.GpuReset):
                self._wake[Check.GPU].set()
            while True:
                hung = self._hung()
                if hung is None:
                    sdnotify.watchdog()
                else:
                    LOG.error("the %s check is hung; withholding the watchdog", hung)
                left = interval - (time.monotonic() - started)
                if left <= 0:
                    break
                await asyncio.sleep(min(left, slice_s))

    async def _gpu_once(self) -> Observation:
        result = await asyncio.to_thread(self.backend.attest)
        if result.passed:
            self.gpu_pass = result
        else:
            LOG.warning("GPU evidence (%s) not passed: %s", self.backend.name, result.observation)
        return result.observation

    async def _ak_cert(self) -> None:
        """Renew the AK certificate when it is due; otherwise record its expiry. A vTPM that
        cannot give the certificate is left to the attestation after, which fails closed."""
        started = time.monotonic()
        try:
            renewal = await asyncio.to_thread(self.vtpm.renew_if_due, self.clock())
            current = None
            if renewal is None:
                current = await asyncio.to_thread(self.vtpm.ak_cert_status, self.clock())
        except ConfinferError as exc:
            LOG.warning("cannot read the AK certificate: %s", exc.one_line())
            self.metrics.check("ak_cert", time.monotonic() - started, exc.reason, self.clock())
            return
        if renewal is not None:
            self.metrics.ak_cert_days_left(renewal.days_left)
            observation = renewal.observation
            cause = getattr(observation, "cause", None)
            self.metrics.check("ak_cert", time.monotonic() - started, cause, self.clock())
            self.feed(observation)
            if isinstance(observation, machine.AkCertRenewed):
                LOG.info("AK certificate renewed through IMDS")
        elif current is not None:
            self.metrics.ak_cert_days_left(current.days_left)
            self.metrics.check("ak_cert", time.monotonic() - started, None, self.clock())
            if self.status.ak_cert_expiry != current.expiry:
                self.feed(machine.AkCertRenewed(current.expiry))

    async def _vtpm_once(self) -> Observation:
        await self._ak_cert()
        result = await asyncio.to_thread(self.vtpm.attest)
        if result.expiry is not None:
            self.metrics.token_expiry(result.expiry)
        return result.observation

    def _interval(self, check: Check) -> float:
        if check is Check.GPU:
            return self.cfg.gpu_evidence_interval_s
        interval = self.cfg.vtpm_attest_interval_s
        expiry = self.status.token_expiry
        if expiry is not None:
            left = (expiry - self.clock()) * TOKEN_REFRESH_FRACTION
            interval = min(interval, max(MIN_VTPM_INTERVAL_S, left))
        return interval

    async def check_loop(self, check: Check) -> None:
        """Run ``check`` now, then on its timer, on a wake, or after a backoff."""
        if check is Check.GPU:
            name = "gpu_evidence"
            bound = self.cfg.gpu_evidence_timeout_s + 30.0
            once = self._gpu_once
        else:
            name = "vtpm"
            bound = (self.cfg.http_timeout_s + 10.0) * (self.cfg.max_retries + 1) * 4
            once = self._vtpm_once
        failures = 0
        while True:
            self._wake[check].clear()
            observation = await self._timed(name, bound, once)
            self.feed(observation)
            passed = isinstance(observation, machine.GpuEvidencePassed | machine.VtpmPassed)
            interval = self._interval(check)
            if passed:
                failures = 0
                await self._sleep(check, interval, floor=0.0)
            else:
                failures += 1
                backoff = min(interval, RETRY_FIRST_S * 2 ** min(failures - 1, 20))
                await self._sleep(check, backoff, floor=backoff)

    async def _sleep(self, check: Check, delay: float, *, floor: float) -> None:
        """Sleep ``delay``; a wake ends it early, but never before ``floor``."""
        if floor > 0:
            await asyncio.sleep(floor)
        left = delay - floor
        if left <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake[check].wait(), left)

    async def run(self, stop: asyncio.Event) -> None:
        """Run the loops until ``stop`` is set or one of them fails (a bug: it propagates)."""
        sdnotify.status(self.status.status_line())
        LOG.info(
            "attestd %s: %d GPU(s) expected, evidence by %s, fast checks every %g s",
            __version__,
            self.cfg.gpu_expected_count,
            self.backend.name,
            self.cfg.gpu_fast_check_s,
        )
        watchdog = sdnotify.watchdog_interval()
        if watchdog is not None and watchdog < 2 * min(self.cfg.gpu_fast_check_s, 1.0):
            LOG.warning("WatchdogSec=%g s is short for gpu_fast_check_s", watchdog)
        tasks = [
            asyncio.create_task(self.fast_loop(), name="fast"),
            asyncio.create_task(self.check_loop(Check.GPU), name="gpu"),
            asyncio.create_task(self.check_loop(Check.VTPM), name="vtpm"),
        ]
        stopper = asyncio.create_task(stop.wait(), name="stop")
        try:
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper:
                    task.result()  # a loop never ends by itself: raise what it raised
        finally:
            if self._tick is not None:
                self._tick.cancel()
            for task in [*tasks, stopper]:
                task.cancel()
            await asyncio.gather(*tasks, stopper, return_exceptions=True)

    async def stop_gpu(self) -> None:
        """At stop: the GPU ready state is cleared whatever the state was."""
        if self._ready_task is not None:
            await asyncio.gather(self._ready_task, return_exceptions=True)
        try:
            await asyncio.wait_for(asyncio.to_thread(self.gpu.clear_ready), 10.0)
            LOG.info("GPU ready state cleared")
        except (NvmlError, TimeoutError) as exc:
            LOG.error("cannot clear the GPU ready state at stop: %s", exc)


# --- the command -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = daemons.parser(
        "attestd", "Keep attesting the GPU and the vTPM; answer on a Unix socket."
    )
    parser.add_argument("--socket", metavar="PATH", help="socket path (default: attestd_socket)")
    return parser


def load_config(args: argparse.Namespace) -> Config:
    files = daemons.config_files(args)
    cfg = config.override(config.load(files=files), attestd_socket=args.socket)
    if cfg.gpu_expected_count < 1:
        raise ConfigError(
            "attestd needs gpu_expected_count of at least 1",
            reason=Reason.CONFIG_INVALID,
            hint="a confidential GPU VM has at least one GPU to attest",
        )
    return cfg


async def serve(cfg: Config) -> int:
    from attestd.server import start

    gpu = GpuChecker.from_config(cfg)
    gpu.open()
    daemon = Daemon(cfg, gpu=gpu, backend=evidence_backend(cfg), vtpm=VtpmChecker(cfg))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if not stop.is_set():
            LOG.info("stopping on %s", signal.Signals(signum).name)
            sdnotify.stopping(f"stopping: {daemon.status.status_line()}")
            stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    server = await start(
        daemon,
        cfg.attestd_socket,
        group=cfg.attestd_socket_group,
        evidence_per_min=cfg.evidence_rate_per_min,
    )
    try:
        await daemon.run(stop)
    finally:
        await server.close()
        await daemon.stop_gpu()
        gpu.close()
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    log.setup(debug=args.debug)
    try:
        cfg = load_config(args)
        return asyncio.run(serve(cfg))
    except ConfinferError as exc:
        return daemons.fail("attestd", exc)
    except KeyboardInterrupt:
        return Kind.INTERRUPTED.exit_code


__all__ = [
    "Daemon",
    "EvidenceBackend",
    "build_parser",
    "evidence_backend",
    "main",
    "policy_from_config",
    "tls_key_sha256",
]
