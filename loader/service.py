"""``model-loader [--config FILE]...``: the program behind ``model-loader.service``.

It serves one sealed model out of a private tmpfs for exactly as long as attestd vouches for the
VM (DESIGN.md §3):

1. empties and unmounts a model tmpfs a killed predecessor left (and its hand-off file);
2. waits for attestd to be ``healthy`` (its event stream; ``loader_attestd_wait_s``);
3. gets the sealed package: ``model_source`` is a package directory, or a Blob prefix that is
   downloaded into a private staging directory (loader.blob);
4. releases the KEK (Secure Key Release), then mounts the tmpfs at ``model_dir`` in the host's
   mount namespace (loader.tmpfs) and unseals into it on every CPU the unit is given, through the
   same code as ``confinfer unseal --skr``; a refused release never mounts anything;
5. hands the tree to the engine read-only (root:``serving_gid``, directories 0550, files 0440,
   the root 0750) and writes ``model.json`` next to the mount (loader.tmpfs.write_handoff);
6. sends ``READY=1`` and follows attestd: ``revoked`` wipes and exits with attestd's reason;
   ``degraded`` keeps serving; a broken stream is reconnected with backoff, and attestd out of
   reach (or not attesting) for longer than ``loader_attestd_grace_s`` wipes and exits
   ``attestd-unavailable``. SIGTERM wipes and exits 0.

A revocation (or the grace running out) during steps 3 and 4 interrupts them at once. Any
failure wipes what was written, unmounts, removes the hand-off file and exits with one line,
``model-loader: <reason>: <message>``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from confinfer import config, daemons, log, sdnotify
from confinfer.attestd_api import Client, Event, State
from confinfer.config import Config
from confinfer.errors import (
    ConfigError,
    ConfinferError,
    Interrupted,
    Kind,
    Reason,
    ServiceError,
    UsageError,
    printable,
)
from confinfer.follow import EventSource, Follower
from loader import blob, signals, tmpfs
from loader import format as fmt
from loader.progress import Progress, human_bytes

LOG = logging.getLogger("model-loader")

CONNECT_TIMEOUT_S = 2.0
TICK_S = 1.0


# --- following attestd ------------------------------------------------------------------------


def revocation(event: Event) -> ConfinferError:
    """The failure a ``revoked`` event ends the loader with: attestd's own reason."""
    return ConfinferError(
        f"attestd revoked attestation: {printable(event.line, 300)}; the model was wiped",
        reason=event.reason,
        hint="see `confinfer status` and `journalctl -u attestd`; the model is served again "
        "once attestd is healthy and model-loader restarts",
    )


class Watch:
    """The decisions about attestd once the model is (being) loaded, without I/O.

    ``revoked`` ends it. ``healthy`` and ``degraded`` keep it. While attestd cannot be reached,
    or reports ``starting`` (it restarted and has not attested yet), a clock runs; past
    ``grace_s`` it ends too (``attestd-unavailable``).
    """

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.last: Event | None = None
        self.lost_since: float | None = None
        self.why = ""

    def event(self, event: Event, now: float) -> ConfinferError | None:
        self.last = event
        if event.state is State.REVOKED:
            return revocation(event)
        if event.state is State.STARTING:
            self.why = f"attestd is starting ({event.reason}): {printable(event.line, 200)}"
            if self.lost_since is None:
                self.lost_since = now
            return self.expired(now)
        self.lost_since = None
        self.why = ""
        return None

    def lost(self, why: str, now: float) -> ConfinferError | None:
        self.why = why
        if self.lost_since is None:
            self.lost_since = now
        return self.expired(now)

    def expired(self, now: float) -> ConfinferError | None:
        if self.lost_since is None or now - self.lost_since <= self.grace_s:
            return None
        return ServiceError(
            f"attestd has not vouched for this VM for {now - self.lost_since:.0f} s "
            f"(loader_attestd_grace_s = {self.grace_s:g}): {self.why}; the model was wiped",
            reason=Reason.ATTESTD_UNAVAILABLE,
            hint="check `systemctl status attestd`",
        )

    def verdict(self, now: float) -> ConfinferError | None:
        """What the state seen so far means now (for the moment loading begins)."""
        if self.last is not None and self.last.state is State.REVOKED:
            return revocation(self.last)
        return self.expired(now)


class Phase:
    WAITING = "waiting"  # for healthy: nothing to protect yet
    LOADING = "loading"  # fetch and unseal: a verdict interrupts the main thread
    SERVING = "serving"  # READY: verdicts go through the queue


@dataclass(frozen=True)
class Lost:
    """attestd could not be reached, or its stream broke."""

    why: str


@dataclass(frozen=True)
class Verdict:
    error: ConfinferError


Item = Event | Lost | Verdict


class Guard:
    """Where the feed's observations meet the main thread, under one lock.

    Every event and every lost connection goes into :attr:`items` for the main thread (status
    lines, the wait for healthy) and, from the loading phase on, through a :class:`Watch`. A
    verdict while loading is also raised in the main thread by ``interrupt``.
    """

    def __init__(
        self,
        grace_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        interrupt: Callable[[ConfinferError], None] | None = None,
    ) -> None:
        self.items: queue.Queue[Item] = queue.Queue()
        self.watch = Watch(grace_s)
        self.phase = Phase.WAITING
        self._clock = clock
        self._interrupt = interrupt
        self._lock = threading.Lock()
        self._delivered = False

    def _deliver(self, verdict: ConfinferError | None) -> None:
        if verdict is None or self.phase == Phase.WAITING or self._delivered:
            return
        self._delivered = True
        self.items.put(Verdict(verdict))
        if self.phase == Phase.LOADING and self._interrupt is not None:
            self._interrupt(verdict)

    def on_event(self, event: Event) -> None:
        with self._lock:
            self.items.put(event)
            self._deliver(self.watch.event(event, self._clock()))

    def on_lost(self, why: str) -> None:
        with self._lock:
            self.items.put(Lost(why))
            self._deliver(self.watch.lost(why, self._clock()))

    def check(self) -> None:
        with self._lock:
            self._deliver(self.watch.expired(self._clock()))

    def begin(self, phase: str) -> None:
        """Enter the loading or serving phase; raises at once what the state already means."""
        with self._lock:
            self.phase = phase
            verdict = self.watch.verdict(self._clock())
            if verdict is not None and not self._delivered:
                self._delivered = True
                raise verdict


# --- signals ----------------------------------------------------------------------------------


class Stopper:
    """SIGTERM and SIGINT, and a verdict from the feed thread while loading, as one exception
    in the main thread: the first one raises, later ones are only noted (so a cleanup in
    progress is never cut short)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._pending: ConfinferError | None = None
        self._fired = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._fired:
            return
        self._fired = True
        if self._pending is not None:
            raise self._pending
        self.signum = signum
        sdnotify.stopping("stopping: wiping the model")
        raise Interrupted(f"stopped by {signal.Signals(signum).name}")

    def interrupt(self, verdict: ConfinferError) -> None:
        """From another thread: raise ``verdict`` in the main thread."""
        self._pending = verdict
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGTERM)

    def disarm(self) -> None:
        self._fired = True


# --- the service ------------------------------------------------------------------------------


@dataclass
class Loaded:
    model_path: Path
    bytes: int
    files: int
    unseal_s: float
    noswap: bool


class Service:
    """One run of model-loader with ``cfg``."""

    def __init__(
        self,
        cfg: Config,
        *,
        environ: Mapping[str, str] | None = None,
        client: EventSource | None = None,
        stopper: Stopper | None = None,
    ) -> None:
        self.cfg = cfg
        self.environ = os.environ if environ is None else environ
        self.client: EventSource = client or Client(cfg.attestd_socket, timeout=CONNECT_TIMEOUT_S)
        self.stopper = stopper or Stopper()
        self.target = tmpfs.mount_point(cfg.model_dir)
        self.handoff = self.target.parent / tmpfs.HANDOFF_NAME
        self.guard = Guard(cfg.loader_attestd_grace_s, interrupt=self.stopper.interrupt)
        self._mounted = False
        self._noswap = False

    # the run

    def run(self) -> int:
        source = self._source()
        unwrapper = self._unwrapper()
        tmpfs.remove_handoff(self.handoff)
        if tmpfs.clean_stale(self.target):
            LOG.info("removed the model tmpfs a previous run left at %s", self.target)
        feed = Follower(self.client, self.guard)
        feed.start()
        try:
            self._wait_healthy()
            self.guard.begin(Phase.LOADING)
            loaded = self._load(source, unwrapper)
            del unwrapper
            gc.collect()  # nothing of the key schedule or the DEK outlives the unseal
            self.guard.begin(Phase.SERVING)
            line = (
                f"model ready: {human_bytes(loaded.bytes)} in {loaded.unseal_s:.1f} s "
                f"({loaded.model_path})"
            )
            LOG.info(
                "%s; %d files, unseal_s=%.3f, noswap=%s, source %s",
                line,
                loaded.files,
                loaded.unseal_s,
                "yes" if loaded.noswap else "no",
                printable(source, 200),
            )
            sdnotify.ready(line)
            self._follow(line)
        except Interrupted:
            LOG.info("stopping: wiping the model")
            return 0 if self.stopper.signum == signal.SIGTERM else Kind.INTERRUPTED.exit_code
        finally:
            self.stopper.disarm()
            with signals.deferred():
                feed.close()
                self._wipe()
        return 0  # pragma: no cover - _follow only returns by raising

    def _source(self) -> str:
        source = self.cfg.model_source
        if not source:
            raise ConfigError(
                "model_source is not set: model-loader has nothing to serve",
                reason=Reason.MODEL_SOURCE_INVALID,
                hint="set model_source to the package directory or its Blob URL",
            )
        if blob.is_blob_url(source):
            blob.BlobSource.parse(source)  # a bad URL is a configuration error, found now
        return source

    def _unwrapper(self) -> Any:
        from loader import keywrap

        if self.cfg.skr_tool is not None:
            return keywrap.CompatUnwrapper(self.cfg.skr_tool, self.cfg)
        return keywrap.SkrUnwrapper(self.cfg)

    def _wait_healthy(self) -> None:
        wait_s = self.cfg.loader_attestd_wait_s
        deadline = time.monotonic() + wait_s
        last = "no answer yet"
        sdnotify.status("waiting for attestd")
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServiceError(
                    f"attestd is not healthy after {wait_s:g} s (loader_attestd_wait_s): {last}",
                    reason=Reason.ATTESTD_UNAVAILABLE,
                    hint="check `systemctl status attestd` and `confinfer status`",
                )
            self._watchdog()
            try:
                item = self.guard.items.get(timeout=min(left, TICK_S))
            except queue.Empty:
                continue
            if isinstance(item, Event):
                if item.state is State.HEALTHY:
                    LOG.info("attestd is healthy: %s", printable(item.line, 200))
                    return
                seen = f"{item.state} ({item.reason}): {printable(item.line, 300)}"
            elif isinstance(item, Lost):
                seen = printable(item.why, 300)
            else:
                continue
            if seen != last:
                last = seen
                LOG.info("waiting for attestd: %s", last)
                sdnotify.status(f"waiting for attestd: {last}")

    def _watchdog(self) -> None:
        if sdnotify.watchdog_interval() is not None:
            sdnotify.watchdog()

    def _follow(self, ready_line: str) -> None:
        shown = ready_line
        while True:
            self._watchdog()
            try:
                item = self.guard.items.get(timeout=TICK_S)
            except queue.Empty:
                self.guard.check()
                continue
            if isinstance(item, Verdict):
                sdnotify.status(f"wiping the model: {item.error.reason}")
                raise item.error
            line = ready_line
            if isinstance(item, Event) and item.state is State.DEGRADED:
                line = f"{ready_line}; attestd degraded ({item.reason})"
                LOG.warning("attestd degraded (%s): %s", item.reason, printable(item.line, 300))
            elif isinstance(item, Lost):
                line = f"{ready_line}; attestd unreachable"
                LOG.warning("attestd: %s", printable(item.why, 300))
            elif isinstance(item, Event) and item.state is State.STARTING:
                line = f"{ready_line}; attestd starting"
            if line != shown:
                shown = line
                sdnotify.status(line)

    # loading

    @contextlib.contextmanager
    def _package(self, source: str) -> Iterator[Path]:
        if not blob.is_blob_url(source):
            pkg = Path(source)
            if not pkg.is_dir():
                raise UsageError(
                    f"model_source {pkg} is not a directory", reason=Reason.PACKAGE_UNREADABLE
                )
            yield pkg
            return
        where = blob.BlobSource.parse(source)
        with blob.staging_dir(self.environ) as staging:
            sdnotify.status(f"downloading the package from {where}")
            start = time.monotonic()
            got = blob.download(self.cfg, where, staging, workers=_cpus())
            LOG.info(
                "downloaded the package (%s) from %s in %.1f s",
                human_bytes(got),
                where,
                time.monotonic() - start,
            )
            yield staging

    def _load(self, source: str, unwrapper: Any) -> Loaded:
        from loader import tutorial
        from loader.dest import Destination
        from loader.keywrap import zero
        from loader.unseal import SealedPackage, unseal_package

        cfg = self.cfg
        with self._package(source) as pkg_dir:
            sealed = os.path.lexists(pkg_dir / fmt.PACKAGE_FILE)
            tut = None if sealed else tutorial.detect(pkg_dir)
            if sealed:
                with SealedPackage.open(pkg_dir) as pkg:
                    plain = pkg.header.total_size
                    entries = len(pkg.header.files) + len(pkg.header.directories)
                    wrapped, key_id = pkg.header.wrapped_dek, pkg.header.key_id
            elif tut is not None:
                plain = max(tut.archive.stat().st_size - tutorial.NONCE_LEN - tutorial.TAG_LEN, 0)
                entries = 0
                wrapped, key_id = tut.read_wrapped_dek(), None
            else:
                raise UsageError(
                    f"{pkg_dir} holds neither {fmt.PACKAGE_FILE} nor the tutorial layout "
                    f"({tutorial.ARCHIVE_NAME} with {tutorial.WRAPPED_DEK_NAME})",
                    reason=Reason.PACKAGE_UNREADABLE,
                )
            size = tmpfs.tmpfs_size(plain, entries, cfg.model_tmpfs_bytes)
            caps = [c for c in (cfg.max_bytes, cfg.model_tmpfs_bytes) if c is not None]
            progress = Progress("unsealing", enabled=False)
            # The key first: the tmpfs is mounted only once Key Vault has released it, so a
            # refused release never leaves a mount behind.
            sdnotify.status("unsealing: releasing the key")
            asked = time.monotonic()
            dek = unwrapper.unwrap(wrapped, key_id)
            release_s = time.monotonic() - asked
            LOG.info("the key was released in %.2f s", release_s)
            try:
                self._mount(size, plain)
                dest = Destination(self.target, max_bytes=min(caps) if caps else None)
                start = time.monotonic()
                with _Ticker(progress, self._watchdog), dest:
                    if tut is None:
                        unseal_package(
                            pkg_dir, dest, _Released(dek), progress=progress, workers=_cpus()
                        )
                    else:
                        progress.set_total(tut.archive.stat().st_size)
                        tutorial.unseal_tutorial(tut.archive, dest, dek, progress.advance)
            finally:
                zero(dek)
                del dek
            unseal_s = time.monotonic() - start
        files, nbytes = tmpfs.hand_over(self.target, cfg.serving_gid)
        model_path = tmpfs.find_model_path(self.target)
        tmpfs.write_handoff(
            self.handoff,
            {
                "model_path": str(model_path),
                "bytes": nbytes,
                "files": files,
                "release_s": round(release_s, 3),
                "unseal_s": round(unseal_s, 3),
                "source": source,
            },
        )
        return Loaded(model_path, nbytes, files, unseal_s, self._noswap)

    def _mount(self, size: int, plain: int) -> None:
        """The tmpfs, once the key is released: a refused release never leaves a mount."""
        self._noswap = tmpfs.mount(self.target, size, allow_swap=self.cfg.model_allow_swap)
        self._mounted = True
        LOG.info(
            "tmpfs mounted at %s (%s, noswap=%s)",
            self.target,
            human_bytes(size),
            "yes" if self._noswap else "no",
        )
        sdnotify.status(f"unsealing: key released, decrypting {human_bytes(plain)}")

    # wiping

    def _wipe(self) -> None:
        """Hand-off file, files, mount: everything goes, whatever failed before.

        A failed unseal has been wiped by its destination already. The served tree is emptied
        by :func:`loader.tmpfs.clear_tree`, which first gives each entry back to its owner's
        write (the tree is read-only by then, and the unit has no CAP_DAC_OVERRIDE); then the
        tmpfs goes.
        """
        tmpfs.remove_handoff(self.handoff)
        if self._mounted:
            left = tmpfs.clear_tree(self.target)
            if left:
                LOG.error("%d entries of the model resisted removal; unmounting", left)
            tmpfs.unmount(self.target)
            self._mounted = False
            LOG.info("model wiped and %s unmounted", self.target)


class _Released:
    """The unwrapper for a DEK Key Vault has released already: it hands it over once."""

    def __init__(self, dek: bytearray) -> None:
        self._dek: bytearray | None = dek

    def unwrap(self, wrapped: bytes, key_id: str | None) -> bytearray:
        dek, self._dek = self._dek, None
        if dek is None:
            raise RuntimeError("the released DEK was handed over already")
        return dek


class _Ticker:
    """While unsealing: progress as STATUS= every second, and the watchdog while bytes move."""

    def __init__(self, progress: Progress, watchdog: Callable[[], None]) -> None:
        self._progress = progress
        self._watchdog = watchdog
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="unseal-status", daemon=True)

    def _run(self) -> None:
        seen = -1
        while not self._stop.wait(TICK_S):
            done = self._progress.done
            if done != seen:
                seen = done
                self._watchdog()
                sdnotify.status(self._progress.line())

    def __enter__(self) -> _Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)


def _cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except OSError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# --- the command ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    return daemons.parser(
        "model-loader",
        "Serve a sealed model from a private tmpfs while attestd vouches for the VM.",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    log.setup(debug=args.debug)
    stopper = Stopper()
    stopper.install()
    try:
        cfg = config.load(files=daemons.config_files(args))
        return Service(cfg, stopper=stopper).run()
    except Interrupted:
        return 0 if stopper.signum == signal.SIGTERM else Kind.INTERRUPTED.exit_code
    except ConfinferError as exc:
        if args.debug:
            LOG.exception("failed")
        return daemons.fail("model-loader", exc)
    except Exception:
        LOG.exception("internal error")
        return Kind.SOFTWARE.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = [
    "Guard",
    "Service",
    "Stopper",
    "Watch",
    "main",
]
