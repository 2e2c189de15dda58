"""``vllm-supervisor [--config FILE]... [--cleanup] [--debug]``: the service of vllm.service.

1. Reads model-loader's hand-off (:mod:`serving.handoff`); ``STATUS=starting the engine: ...``.
2. Removes a serving container left by an earlier run and starts the engine's container
   (:mod:`serving.container` decides its every option, :mod:`serving.engine` talks to dockerd).
3. Polls the engine's ``/health`` (:mod:`serving.health`) until it answers 200, at most
   ``serving_ready_timeout_s``; the container exiting meanwhile fails at once, with its exit
   code and the tail of its output. ``READY=1`` only then.
4. Watches: the container exiting fails the unit; ``/health`` is asked every few seconds and
   :data:`UNHEALTHY_AFTER` failures in a row (a hung engine) fail it too; ``WATCHDOG=1`` is sent
   from that loop when systemd asks for it.
5. SIGTERM or SIGINT: ``STOPPING=1``, the container is stopped and removed, exit 0.
6. Follows attestd's event stream (:class:`Revocation`): on ``revoked`` the container is
   killed at once, then as 5. (model-loader wipes on the same event, and systemd stops the
   unit; this only makes the engine go first and fast).

Every way out removes the container, so stopping model-loader (``BindsTo=``) leaves none
behind. A supervisor killed outright (SIGKILL, the watchdog's abort) runs no cleanup: the
container is not in the unit's cgroup, so the unit runs ``vllm-supervisor --cleanup`` as
``ExecStopPost=``, and every start removes a leftover too.

A failure is one line, ``vllm-supervisor: <reason>: <message>``, and the reason's exit code
(docs/operator-guide.md §2.9, §3).
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

from confinfer import config, daemons, log, sdnotify
from confinfer.attestd_api import Client, Event, State
from confinfer.config import Config
from confinfer.errors import ConfinferError, Kind, Reason, printable
from confinfer.follow import Follower
from serving import health
from serving.container import LISTEN_HOST, STOP_TIMEOUT_S, check_serving_args, container_spec
from serving.engine import DockerEngine, Engine
from serving.handoff import Handoff, read_handoff

LOG = logging.getLogger("vllm-supervisor")
ENGINE_LOG = logging.getLogger("vllm-supervisor.engine")

READY_POLL_S = 1.0
HEALTH_INTERVAL_S = 5.0
UNHEALTHY_AFTER = 3  # consecutive /health failures of a ready engine before the unit fails
LOG_TAIL_LINES = 20
LOG_TAIL_CHARS = 1500
CONNECT_TIMEOUT_S = 2.0  # attestd's socket


@dataclass(frozen=True)
class Timing:
    """The supervisor's clocks; the defaults are the service's, tests shorten them."""

    ready_timeout_s: float
    ready_poll_s: float = READY_POLL_S
    health_interval_s: float = HEALTH_INTERVAL_S
    probe_timeout_s: float = health.PROBE_TIMEOUT_S
    unhealthy_after: int = UNHEALTHY_AFTER
    stop_timeout_s: float = STOP_TIMEOUT_S

    @classmethod
    def for_service(cls, cfg: Config, watchdog_s: float | None) -> Timing:
        """The timing under systemd: probes fit inside half the watchdog timeout."""
        if watchdog_s is None:
            return cls(ready_timeout_s=cfg.serving_ready_timeout_s)
        half = watchdog_s / 2
        return cls(
            ready_timeout_s=cfg.serving_ready_timeout_s,
            ready_poll_s=min(READY_POLL_S, half / 2),
            health_interval_s=min(HEALTH_INTERVAL_S, half / 2),
            probe_timeout_s=min(health.PROBE_TIMEOUT_S, half / 2),
        )


class Wakeup:
    """A self-pipe the main loop sleeps on: a signal handler or the waiter thread wakes it.

    Writing one byte to a non-blocking pipe is safe in a signal handler, where taking a lock
    (a Condition, a Queue) is not: the handler runs in the thread that may hold it.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def set(self) -> None:
        try:
            os.write(self._write, b"!")
        except BlockingIOError:
            pass  # already full of wake-ups

    def wait(self, timeout_s: float) -> None:
        """Sleep up to ``timeout_s``, less when woken; a wake-up is consumed."""
        readable, _, _ = select.select([self._read], [], [], max(0.0, timeout_s))
        if readable:
            try:
                while os.read(self._read, 512):
                    pass
            except BlockingIOError:
                pass

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)


class Stop:
    """A stop request: set from a signal handler (``SIGTERM``), by a revocation or by a
    caller. ``why`` says which, for the log."""

    def __init__(self, wakeup: Wakeup) -> None:
        self.signum: int | None = None
        self.why: str | None = None
        self.revocation = False  # the container is killed, not stopped gracefully
        self._wakeup = wakeup

    def __bool__(self) -> bool:
        return self.why is not None

    def request(self, signum: int = signal.SIGTERM) -> None:
        if self.why is None:
            self.signum = signum
            self.why = signal.Signals(signum).name
        self._wakeup.set()

    def revoked(self, reason: str) -> None:
        """attestd revoked attestation (from the follower's thread, not a signal handler).
        The caller kills the engine, then calls :meth:`wake`."""
        self.revocation = True
        if self.why is None:
            self.why = f"attestd revoked attestation ({reason})"

    def wake(self) -> None:
        self._wakeup.set()

    def handler(self, signum: int, frame: FrameType | None) -> None:
        self.request(signum)

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.handler)


class Revocation:
    """The supervisor's listener on attestd's event stream: on ``revoked`` the engine's
    container is killed at once, from the follower's thread, and the supervisor stops.

    model-loader wipes the model on the same event and systemd then stops this unit
    (``BindsTo=``), but killing here first means the engine serves nothing, and lets go of
    the model's pages, within a fraction of a second of the event rather than after that
    chain and a graceful stop. A lost stream is not a revocation: the loader weighs attestd
    being away against its grace, and stops this unit when that runs out.
    """

    def __init__(self, engine: Engine, stop: Stop) -> None:
        self._engine = engine
        self._stop = stop
        self.event: Event | None = None

    def on_event(self, event: Event) -> None:
        if event.state is not State.REVOKED or self.event is not None:
            return
        self.event = event
        LOG.warning(
            "attestd revoked attestation (%s): %s; killing the engine",
            event.reason,
            printable(event.line, 300),
        )
        # First the stop, so that the container's exit reads as expected; then the kill;
        # then the main loop is woken (its own removal kills too, whichever comes first).
        self._stop.revoked(event.reason)
        try:
            if self._engine.kill():
                LOG.info("serving container killed and removed")
        except ConfinferError as exc:
            LOG.error("could not kill the serving container: %s", exc.one_line())
        self._stop.wake()

    def on_lost(self, why: str) -> None:
        LOG.debug("attestd's event stream: %s", why)

    def check(self) -> None:
        pass


def _tail(engine: Engine) -> str:
    text = engine.logs_tail(LOG_TAIL_LINES)
    if not text:
        return "no output"
    return "last output: " + printable(text[-LOG_TAIL_CHARS:], LOG_TAIL_CHARS + 100)


class Supervisor:
    """Runs one engine container for ``handoff`` and follows it until it ends or is stopped."""

    def __init__(
        self,
        cfg: Config,
        handoff: Handoff,
        engine: Engine,
        *,
        timing: Timing,
        wakeup: Wakeup,
        stop: Stop,
        probe: Callable[[int, float], health.Probe] | None = None,
        clock: Callable[[], float] = time.monotonic,
        watchdog: bool = False,
    ) -> None:
        self.cfg = cfg
        self.handoff = handoff
        self.engine = engine
        self.timing = timing
        self._wakeup = wakeup
        self._stop = stop
        self._probe = probe or (lambda port, timeout: health.probe(port, timeout_s=timeout))
        self._clock = clock
        self._watchdog = watchdog
        self._exit_code: int | None = None
        self._wait_error: ConfinferError | None = None
        self._started = False
        self.ready_s: float | None = None

    # --- the service's life ------------------------------------------------------------------

    def run(self) -> int:
        """Start, await readiness, watch; 0 after a stop request. Failures raise."""
        cfg = self.cfg
        try:
            if self._stop:
                return self._stopped()
            removed = self.engine.remove_leftovers()
            if removed:
                LOG.info("removed %d serving container(s) left by an earlier run", removed)
            if self._probe(cfg.serving_port, self.timing.probe_timeout_s).ok:
                raise ConfinferError(
                    f"something already answers on {LISTEN_HOST}:{cfg.serving_port}/health",
                    reason=Reason.ENGINE_START_FAILED,
                    hint="another engine holds serving_port; stop it or change serving_port",
                )
            spec = container_spec(
                cfg,
                self.handoff,
                image_has_entrypoint=self.engine.image_has_entrypoint(cfg.serving_image),
            )
            if self._stop:
                return self._stopped()
            self._started = True
            container_id = self.engine.start(spec)
            LOG.info(
                "started container %s: %s %s",
                container_id[:12],
                spec.image,
                " ".join(spec.command),
            )
            self.engine.forward_logs(ENGINE_LOG)
            threading.Thread(target=self._wait_for_exit, name="engine-wait", daemon=True).start()
            sdnotify.status(f"waiting for the engine's /health on {LISTEN_HOST}:{cfg.serving_port}")
            if not self._await_ready():
                return self._stopped()
            self._watch()
            return self._stopped()
        finally:
            self._remove()

    def _stopped(self) -> int:
        why = self._stop.why or "request"
        LOG.info("stopping: %s", why)
        sdnotify.stopping(f"stopping the engine: {why}")
        return 0

    def _remove(self) -> None:
        if not self._started:
            return
        try:
            if self._stop.revocation:
                self.engine.kill()
            else:
                self.engine.stop(self.timing.stop_timeout_s)
        except ConfinferError as exc:
            # The unit is ending either way; say so, and let the caller's failure (if any) win.
            LOG.error("could not remove the serving container: %s", exc.one_line())
            return
        LOG.info("serving container removed")

    # --- the waiter thread -------------------------------------------------------------------

    def _wait_for_exit(self) -> None:
        try:
            self._exit_code = self.engine.wait()
        except ConfinferError as exc:
            self._wait_error = exc
        self._wakeup.set()

    def _check_exited(self, *, ready: bool) -> None:
        if self._stop:
            return  # a stop request stops the container: its exit is expected
        if self._wait_error is not None:
            raise self._wait_error
        code = self._exit_code
        if code is None:
            return
        when = "while serving" if ready else "before it was ready"
        raise ConfinferError(
            f"the engine's container exited with code {code} {when}; {_tail(self.engine)}",
            reason=Reason.ENGINE_EXITED,
            details={"exit_code": code},
            hint="journalctl -u vllm shows the engine's output",
        )

    # --- readiness ---------------------------------------------------------------------------

    def _ping(self) -> None:
        if self._watchdog:
            sdnotify.watchdog()

    def _await_ready(self) -> bool:
        """Poll ``/health`` until 200 (True), a stop request (False), an exit or the deadline."""
        port = self.cfg.serving_port
        start = self._clock()
        deadline = start + self.timing.ready_timeout_s
        while True:
            if self._stop:
                return False
            self._check_exited(ready=False)
            result = self._probe(port, self.timing.probe_timeout_s)
            self._check_exited(ready=False)
            if self._stop:
                return False
            if result.ok:
                break
            now = self._clock()
            if now >= deadline:
                raise ConfinferError(
                    f"the engine's /health did not answer 200 within "
                    f"{self.timing.ready_timeout_s:g} s (last: {printable(result.detail, 200)}); "
                    f"{_tail(self.engine)}",
                    reason=Reason.ENGINE_NOT_READY,
                    hint="a large model may need a longer serving_ready_timeout_s",
                )
            self._ping()
            self._wakeup.wait(min(self.timing.ready_poll_s, deadline - now))
        self.ready_s = self._clock() - start
        line = self._serving_line()
        LOG.info("%s", line)
        sdnotify.ready(line)
        self._ping()
        return True

    def _serving_line(self) -> str:
        cfg = self.cfg
        took = f" (engine ready in {self.ready_s:.1f} s)" if self.ready_s is not None else ""
        return f"serving {cfg.serving_model_name} on {LISTEN_HOST}:{cfg.serving_port}{took}"

    # --- watching ----------------------------------------------------------------------------

    def _watch(self) -> None:
        """Follow a ready engine until a stop request; an exit or a hang raises."""
        failures = 0
        limit = self.timing.unhealthy_after
        while True:
            self._wakeup.wait(self.timing.health_interval_s)
            if self._stop:
                return
            self._check_exited(ready=True)
            result = self._probe(self.cfg.serving_port, self.timing.probe_timeout_s)
            self._check_exited(ready=True)
            if self._stop:
                return
            if result.ok:
                if failures:
                    LOG.info("the engine's /health answers again")
                    sdnotify.status(self._serving_line())
                failures = 0
            else:
                failures += 1
                detail = printable(result.detail, 200)
                LOG.warning("the engine's /health failed (%d of %d): %s", failures, limit, detail)
                if failures >= limit:
                    raise ConfinferError(
                        f"the engine's /health failed {failures} times in a row "
                        f"(last: {detail}); {_tail(self.engine)}",
                        reason=Reason.ENGINE_UNHEALTHY,
                        hint="the engine hung or lost its GPU; systemd restarts vllm.service",
                    )
                sdnotify.status(f"engine unhealthy ({failures} of {limit}): {detail}")
            self._ping()


# --- the command -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = daemons.parser(
        "vllm-supervisor",
        "Run the serving engine's container; READY only when its /health answers.",
    )
    parser.add_argument(
        "--cleanup",
        action="store_true",
        help="only remove a serving container left behind, then exit (for ExecStopPost=)",
    )
    return parser


def serve(cfg: Config, wakeup: Wakeup, stop: Stop) -> int:
    check_serving_args(cfg.serving_args)
    handoff = read_handoff(cfg.model_dir)
    facts = [
        f"{handoff.bytes} bytes" if handoff.bytes is not None else "",
        f"{handoff.files} files" if handoff.files is not None else "",
        f"unsealed in {handoff.unseal_s:.1f} s" if handoff.unseal_s is not None else "",
        f"from {handoff.source}" if handoff.source is not None else "",
    ]
    LOG.info("model hand-off: %s (%s)", handoff.model_path, ", ".join(f for f in facts if f))
    sdnotify.status(f"starting the engine: {cfg.serving_image} serving {handoff.model_path}")
    engine = DockerEngine(cfg.docker_host)
    follower = Follower(
        Client(cfg.attestd_socket, timeout=CONNECT_TIMEOUT_S), Revocation(engine, stop)
    )
    follower.start()
    try:
        watchdog_s = sdnotify.watchdog_interval()
        supervisor = Supervisor(
            cfg,
            handoff,
            engine,
            timing=Timing.for_service(cfg, watchdog_s),
            wakeup=wakeup,
            stop=stop,
            watchdog=watchdog_s is not None,
        )
        return supervisor.run()
    finally:
        follower.close()
        engine.close()


def cleanup(cfg: Config) -> int:
    """Remove what a killed supervisor left (SIGKILL, a watchdog abort): no ``finally`` ran."""
    engine = DockerEngine(cfg.docker_host)
    try:
        removed = engine.remove_leftovers()
    finally:
        engine.close()
    LOG.info("removed %d serving container(s)", removed)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    log.setup(debug=args.debug)
    wakeup = Wakeup()
    stop = Stop(wakeup)
    stop.install()  # first: a SIGTERM during start-up still removes what was started
    try:
        cfg = config.load(files=daemons.config_files(args))
        return cleanup(cfg) if args.cleanup else serve(cfg, wakeup, stop)
    except ConfinferError as exc:
        if args.debug:
            LOG.exception("failed")
        return daemons.fail("vllm-supervisor", exc)
    except Exception:
        LOG.exception("internal error")  # not an expected failure: a bug; always a traceback
        return Kind.SOFTWARE.exit_code
    finally:
        wakeup.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
