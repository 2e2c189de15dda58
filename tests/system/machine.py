"""A real systemd, booted as PID 1 of a systemd-nspawn machine, for system tests.

:meth:`Machine.boot` starts one machine from the cached root file system (tests/system/rootfs.py)
the way shared/TESTBED.md measured it on these hosts:

- ``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 systemd-nspawn -D ROOT -b -M NAME --console=pipe
  --register=no --keep-unit --capability=CAP_NET_ADMIN --system-call-filter='@keyring bpf'``
  (the last two let a Docker engine run inside; hybrid cgroups inside break runc);
- the machine boots from an overlay: the cached tree is the read-only lower layer, the upper
  layer is the test's own directory, so nothing is unpacked per test and the cache is never
  written. Files a test needs before boot go into the upper layer (``files=``). A Docker
  engine's data root must be a plain bind (``Bind(dir, Path("/var/lib/docker"), False)``),
  never the overlay;
- the launcher enters the machine's own cgroup, ``t-NAME``, in each hierarchy before it execs
  nspawn, so machines never share a scope;
- the leader is nspawn's child whose ``comm`` is ``systemd``; the boot is over when
  ``/run/systemd/private`` exists and ``systemctl is-system-running --wait`` answers
  ``running`` or ``degraded`` (:attr:`Machine.failed_units` says what failed);
- commands run with ``nsenter -t LEADER -a`` and a clean environment (``machinectl`` and
  ``systemctl -M`` do not work with ``--register=no``). They stay in the caller's cgroup, so
  anything meant to outlive the command runs as a unit (``systemd-run``);
- :meth:`Machine.await_reboot` follows a reboot the machine asks for (nspawn exits 133) and
  boots it again on the same upper layer: its files stay, its boot id changes;
- :meth:`Machine.shutdown` sends SIGTERM to nspawn and waits. nspawn is never sent SIGKILL (the
  machine would keep running, reparented); if it does not exit in time, the machine's cgroup
  is killed as a whole (``cgroup.kill``), then its cgroup directories are removed depth-first.
  :meth:`Machine.leftovers` lists anything the machine left on the host.

The machine shares the host's network namespace: services the host runs on loopback (the
testbed, swtpm) are reachable inside at the same addresses, and what the machine listens on
is on the host's loopback too. The project checkout and a venv interpreter that lives outside
/usr are bound read-only at their own paths (:func:`project_binds`), so ``.venv`` and the
editable install work inside unchanged.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

T = TypeVar("T")

CGROUP_ROOT = Path("/sys/fs/cgroup")
NSPAWN_RUN = Path("/run/systemd/nspawn/propagate")
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NSPAWN_FLAGS = (
    "--boot",
    "--console=pipe",
    "--register=no",
    "--keep-unit",
    # For a Docker engine inside (TESTBED.md, found flag by flag): its network setup needs
    # CAP_NET_ADMIN, runc joins a session keyring and attaches BPF device filters.
    "--capability=CAP_NET_ADMIN",
    "--system-call-filter=@keyring bpf",
)
SYSTEM_UNITS = Path("/etc/systemd/system")
BOOT_TIMEOUT_S = 90.0
COMMAND_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
KILL_TIMEOUT_S = 10.0
NSPAWN_REBOOT = 133  # systemd-nspawn's exit status when the machine asked for a reboot
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,30}")


class MachineError(Exception):
    """A machine did not boot, answer or stop as asked; the message says what and shows why."""


@dataclass(frozen=True)
class Bind:
    """A host directory or file bound into the machine (at the same path unless ``target``)."""

    source: Path
    target: Path | None = None
    read_only: bool = True

    def option(self) -> str:
        target = self.target or self.source
        for path in (self.source, target):
            if ":" in str(path) or not path.is_absolute():
                raise MachineError(f"bind path {path} must be absolute and free of ':'")
        return f"{'--bind-ro' if self.read_only else '--bind'}={self.source}:{target}"


def project_binds(repo: Path) -> list[Bind]:
    """The checkout at its own path (read-only) and, when the checkout's ``.venv`` was made
    from an interpreter outside /usr (pyenv, a hand-built Python), that installation too: the
    venv's ``bin/python`` is a symlink to it."""
    repo = repo.resolve()
    binds = [Bind(repo)]
    cfg = repo / ".venv" / "pyvenv.cfg"
    if cfg.is_file():
        for line in cfg.read_text(encoding="utf-8").splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == "home":
                prefix = Path(value.strip()).resolve().parent
                if prefix.parts[:2] != ("/", "usr") and not prefix.is_relative_to(repo):
                    binds.append(Bind(prefix))
    return binds


def cgroup_dirs(name: str) -> list[Path]:
    """The machine's own cgroup in each hierarchy the host mounts; the cgroup2 one first."""
    leaf = f"t-{name}"
    if (CGROUP_ROOT / "unified" / "cgroup.procs").exists():  # hybrid: v1 name=systemd + v2
        return [CGROUP_ROOT / "unified" / leaf, CGROUP_ROOT / "systemd" / leaf]
    if (CGROUP_ROOT / "cgroup.controllers").exists():  # unified only
        return [CGROUP_ROOT / leaf]
    return [CGROUP_ROOT / "systemd" / leaf]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text(encoding="ascii", errors="replace")
        except OSError:
            continue
        if int(stat_line[stat_line.rfind(")") + 2 :].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a killed machine's leader is reparented to
    the host's init, which reaps it a moment later)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    return stat_line[stat_line.rfind(")") + 2 :].split()[0] not in ("Z", "X")


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError:
        return ""


def wait_for(predicate: Callable[[], T], timeout: float, *, what: str, interval: float = 0.2) -> T:
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` s pass
    (MachineError naming ``what`` and the last value). Exceptions end the wait at once."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise MachineError(
                f"timed out after {timeout:g} s waiting for {what} (last: {value!r})"
            )
        time.sleep(interval)


class Machine:
    """One booted machine. Use :meth:`boot`, and as a context manager (or call
    :meth:`shutdown`) so it is always stopped."""

    def __init__(
        self, name: str, directory: Path, nspawn: subprocess.Popen[bytes], cgroups: list[Path]
    ) -> None:
        self.name = name
        self.directory = directory
        self.console = directory / "console.log"
        self.upper = directory / "upper"
        self.cgroups = cgroups
        self._nspawn = nspawn
        self.leader = 0
        self.boot_s = 0.0
        self.system_state = ""
        self.failed_units: list[str] = []
        self.stop_s: float | None = None  # how long the first shutdown() took
        self.reboots = 0
        self._settle = True
        self._relaunch: tuple[list[str], dict[str, str]] = ([], {})
        nsenter = shutil.which("nsenter")
        if nsenter is None:
            raise MachineError("nsenter not found (util-linux)")
        self._nsenter = nsenter

    # --- lifetime --------------------------------------------------------------------------

    @classmethod
    def boot(
        cls,
        name: str,
        rootfs: Path,
        *,
        tmp_path: Path,
        binds: Iterable[Bind] = (),
        files: Mapping[str, str | bytes | None] | None = None,
        timeout: float = BOOT_TIMEOUT_S,
        settle: bool = True,
    ) -> Machine:
        """Boot a machine named ``NAME-<random>`` from the tree ``rootfs``.

        ``files`` are written into the overlay before boot (absolute paths inside; ``None``
        hides the lower layer's file). Each machine gets a fresh ``/etc/machine-id`` and its
        name as ``/etc/hostname``. Without ``settle`` it returns once systemd answers, not
        when the boot's jobs are done (a boot that runs long work, or reboots, as onboarding).
        """
        if not _NAME.fullmatch(name):
            raise MachineError(f"machine name {name!r} must match {_NAME.pattern}")
        name = f"{name}-{secrets.token_hex(3)}"
        directory = tmp_path / f"machine-{name}"
        upper = directory / "upper"
        upper.mkdir(parents=True)
        seed: dict[str, str | bytes | None] = {
            "/etc/machine-id": secrets.token_hex(16) + "\n",
            "/etc/hostname": name + "\n",
        }
        seed.update(files or {})
        for path, content in seed.items():
            _seed(upper, path, content)
        options = [b.option() for b in binds]
        cgroups = cgroup_dirs(name)
        nspawn_argv = [
            "systemd-nspawn",
            f"--directory={rootfs}",
            f"--overlay={rootfs}:{upper}:/",
            f"--machine={name}",
            *NSPAWN_FLAGS,
            *options,
        ]
        # The launcher moves itself into the machine's cgroups, then becomes nspawn.
        launcher = 'while [ "$1" != -- ]; do echo $$ >"$1/cgroup.procs" || exit 125; shift; done'
        argv = ["sh", "-c", f'{launcher}; shift; exec "$@"', "sh", *map(str, cgroups), "--"]
        env = {"PATH": CLEAN_PATH, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1", "LANG": "C.UTF-8"}
        started = time.monotonic()
        try:
            for cgroup in cgroups:
                cgroup.mkdir()
            nspawn = _launch([*argv, *nspawn_argv], env, directory / "console.log")
        except BaseException:
            for cgroup in cgroups:
                _remove_cgroup(cgroup)
            raise
        machine = cls(name, directory, nspawn, cgroups)
        machine._relaunch = ([*argv, *nspawn_argv], env)
        machine._settle = settle
        try:
            machine._wait_booted(started + timeout)
        except BaseException:
            machine.shutdown()
            raise
        machine.boot_s = time.monotonic() - started
        return machine

    def await_reboot(self, timeout: float = BOOT_TIMEOUT_S) -> float:
        """The machine rebooted itself (``systemctl reboot`` inside: nspawn exits with 133):
        wait for that, then boot it again on the same upper layer, so what it wrote stays and
        the boot id is new. Returns the seconds until it was up again."""
        started = time.monotonic()
        try:
            code = self._nspawn.wait(timeout)
        except subprocess.TimeoutExpired:
            raise MachineError(
                f"{self.name} did not reboot within {timeout:g} s\n{_tail(self.console)}"
            ) from None
        if code != NSPAWN_REBOOT:
            raise MachineError(
                f"systemd-nspawn exited {code}, not {NSPAWN_REBOOT} (a reboot)\n"
                + _tail(self.console)
            )
        self._kill_cgroup_if_populated()
        argv, env = self._relaunch
        self._nspawn = _launch(argv, env, self.console)
        self.leader = 0
        self.reboots += 1
        self._wait_booted(time.monotonic() + BOOT_TIMEOUT_S)
        return time.monotonic() - started

    def _wait_booted(self, deadline: float) -> None:
        def leader() -> int:
            if self._nspawn.poll() is not None:
                raise MachineError(
                    f"systemd-nspawn exited {self._nspawn.returncode} before the machine booted:"
                    f"\n{_tail(self.console)}"
                )
            return next((p for p in _children(self._nspawn.pid) if _comm(p) == "systemd"), 0)

        def left() -> float:
            return max(deadline - time.monotonic(), 0.1)

        self.leader = wait_for(leader, left(), what=f"{self.name}'s systemd", interval=0.05)
        private = Path(f"/proc/{self.leader}/root/run/systemd/private")
        wait_for(private.exists, left(), what=f"{private}", interval=0.05)
        if not self._settle:
            self.system_state = "starting"
            return
        proc = self.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=left())
        self.system_state = proc.stdout.strip()
        listed = self.systemctl("list-units", "--failed", "--plain", "--no-legend", check=False)
        self.failed_units = [line.split()[0] for line in listed.stdout.splitlines() if line]
        if self.system_state not in ("running", "degraded"):
            raise MachineError(
                f"{self.name} did not boot: system state {self.system_state!r}, failed units "
                f"{self.failed_units}\n{_tail(self.console)}"
            )

    def __enter__(self) -> Machine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    @property
    def running(self) -> bool:
        return self._nspawn.poll() is None

    def shutdown(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the machine (SIGTERM to nspawn: a clean poweroff), kill what is left of its
        cgroup if that takes longer than ``timeout``, and remove its cgroup directories."""
        started = time.monotonic()
        if self._nspawn.poll() is None:
            self._nspawn.send_signal(signal.SIGTERM)
            try:
                self._nspawn.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_cgroup()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._nspawn.wait(KILL_TIMEOUT_S)
                if self.leader:
                    wait_for(
                        lambda: not _alive(self.leader),
                        KILL_TIMEOUT_S,
                        what=f"{self.name}'s systemd to die",
                        interval=0.05,
                    )
        self._kill_cgroup_if_populated()
        for cgroup in self.cgroups:
            _remove_cgroup(cgroup)
        propagate = NSPAWN_RUN / self.name
        if propagate.is_dir():
            shutil.rmtree(propagate, ignore_errors=True)
        if self.stop_s is None:
            self.stop_s = time.monotonic() - started

    def _kill_cgroup(self) -> None:
        kill = self.cgroups[0] / "cgroup.kill"
        if kill.exists():
            kill.write_text("1", encoding="ascii")
            return
        for pid in _cgroup_pids(self.cgroups):  # a kernel before 5.14: one by one
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _kill_cgroup_if_populated(self) -> None:
        if _cgroup_pids(self.cgroups):
            self._kill_cgroup()
            wait_for(
                lambda: not _cgroup_pids(self.cgroups),
                KILL_TIMEOUT_S,
                what=f"the processes of {self.name}'s cgroup to exit",
            )

    def leftovers(self) -> list[str]:
        """What this machine left on the host; empty after a clean :meth:`shutdown`."""
        found = []
        if self._nspawn.poll() is None:
            found.append(f"systemd-nspawn pid {self._nspawn.pid} still runs")
        if self.leader and _alive(self.leader):
            found.append(f"leader pid {self.leader} ({_comm(self.leader)}) still runs")
        found += [f"cgroup {c} still exists" for c in self.cgroups if c.exists()]
        marker = f"/t-{self.name}/"
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    cgroup = (entry / "cgroup").read_text(encoding="utf-8", errors="replace")
                except OSError:
                    continue
                in_cgroup = marker in cgroup or cgroup.rstrip().endswith(f"/t-{self.name}")
                if in_cgroup and _alive(int(entry.name)):
                    found.append(f"process {entry.name} ({_comm(int(entry.name))}) in {marker}")
        mounts = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="replace")
        found += [f"mount {line}" for line in mounts.splitlines() if str(self.directory) in line]
        if (NSPAWN_RUN / self.name).exists():
            found.append(f"{NSPAWN_RUN / self.name} still exists")
        return found

    # --- commands --------------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT_S,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the machine (all its namespaces, a clean environment plus
        ``env``). With ``check``, a non-zero exit raises MachineError with the command, the
        status and stderr."""
        if not self.leader:
            raise MachineError(f"{self.name} has no leader yet")
        environ = {
            "PATH": CLEAN_PATH,
            "LANG": "C.UTF-8",
            "TERM": "dumb",
            "SYSTEMD_COLORS": "0",
            "SYSTEMD_PAGER": "",
            **(env or {}),
        }
        try:
            proc = subprocess.run(
                [self._nsenter, "-t", str(self.leader), "-a", *argv],
                input=input,
                capture_output=True,
                text=True,
                env=environ,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise MachineError(
                f"{self.name}: {' '.join(argv)} timed out after {timeout:g} s"
            ) from exc
        if check and proc.returncode != 0:
            raise MachineError(
                f"{self.name}: {' '.join(argv)} exited {proc.returncode}: "
                f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
            )
        return proc

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", *args], check=check, timeout=timeout)

    def unit_property(self, unit: str, prop: str) -> str:
        """One property of a unit, as ``systemctl show -P`` prints it."""
        return self.systemctl("show", "-P", prop, unit).stdout.rstrip("\n")

    def unit_properties(self, unit: str, *props: str) -> dict[str, str]:
        args = [arg for prop in props for arg in ("-p", prop)]
        out = self.systemctl("show", *args, unit).stdout
        return dict(line.partition("=")[::2] for line in out.splitlines() if "=" in line)

    def journal(self, unit: str | None = None, *, lines: int | None = None) -> str:
        """This boot's journal, of one unit or all, with monotonic timestamps."""
        argv = ["journalctl", "-b", "--no-pager", "-o", "short-monotonic"]
        argv += ["-u", unit] if unit else []
        argv += ["-n", str(lines)] if lines else []
        return self.run(argv).stdout

    def path(self, path: str) -> Path:
        """The host's view of ``path`` inside the machine (for reading; may cross symlinks
        the wrong way, so write through :meth:`write_file`)."""
        return Path(f"/proc/{self.leader}/root") / path.lstrip("/")

    def write_file(self, path: str, content: str, mode: int = 0o644) -> None:
        """Create or replace a file inside the machine, parents included."""
        script = 'umask 022; mkdir -p "$(dirname "$1")" && cat >"$1.tmp" && chmod "$2" "$1.tmp"'
        script += ' && mv -f "$1.tmp" "$1"'
        self.run(["sh", "-c", script, "sh", path, f"{mode:o}"], input=content)

    def daemon_reload(self) -> None:
        self.systemctl("daemon-reload")

    def install_unit(self, source: Path | str, name: str | None = None) -> str:
        """Install a unit file (a host path, or the text of one with ``name``) into
        /etc/systemd/system and reload; returns the unit's name."""
        if isinstance(source, Path):
            text, name = source.read_text(encoding="utf-8"), name or source.name
        elif name is None:
            raise MachineError("install_unit(text) needs the unit's name")
        else:
            text = source
        self.write_file(str(SYSTEM_UNITS / name), text)
        self.daemon_reload()
        return name

    def install_drop_in(self, unit: str, text: str, name: str = "50-test.conf") -> None:
        """Add ``/etc/systemd/system/UNIT.d/NAME`` and reload."""
        self.write_file(str(SYSTEM_UNITS / f"{unit}.d" / name), text)
        self.daemon_reload()

    def wait_for(
        self, predicate: Callable[[], T], timeout: float, *, what: str, interval: float = 0.2
    ) -> T:
        """:func:`wait_for`, failing at once when the machine has stopped."""

        def checked() -> T:
            if not self.running:
                raise MachineError(f"{self.name} stopped while waiting for {what}")
            return predicate()

        return wait_for(checked, timeout, what=what, interval=interval)

    def wait_for_property(
        self, unit: str, prop: str, accept: Callable[[str], bool] | str, timeout: float
    ) -> str:
        """Wait until a unit property is ``accept`` (or satisfies it); returns the value."""
        test = accept if callable(accept) else accept.__eq__
        seen: list[str] = []

        def check() -> bool:
            seen.append(self.unit_property(unit, prop))
            return test(seen[-1])

        try:
            self.wait_for(check, timeout, what=f"{unit} {prop}")
        except MachineError as exc:
            raise MachineError(f"{exc}; values seen: {sorted(set(seen))}") from None
        return seen[-1]


def _launch(argv: list[str], env: dict[str, str], console: Path) -> subprocess.Popen[bytes]:
    with console.open("ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a ^C to pytest is not a SIGINT to the machine
        )


def _seed(upper: Path, path: str, content: str | bytes | None) -> None:
    if not path.startswith("/") or ".." in Path(path).parts:
        raise MachineError(f"files: {path!r} must be an absolute path inside the machine")
    target = upper / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if content is None:  # an overlayfs whiteout: the lower layer's file is hidden
        os.mknod(target, stat.S_IFCHR, os.makedev(0, 0))
    else:
        target.write_bytes(content.encode() if isinstance(content, str) else content)


def _cgroup_pids(cgroups: Iterable[Path]) -> set[int]:
    pids: set[int] = set()
    for cgroup in cgroups:
        if cgroup.is_dir():
            for procs in cgroup.rglob("cgroup.procs"):
                with contextlib.suppress(OSError):
                    pids.update(int(p) for p in procs.read_text(encoding="ascii").split())
    return pids


def _remove_cgroup(cgroup: Path) -> None:
    """rmdir a cgroup and every group below it, deepest first (bounded retries: the kernel
    lets go of an exited process's cgroup a moment after it is reaped)."""
    if not cgroup.is_dir():
        return
    dirs = sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    deadline = time.monotonic() + KILL_TIMEOUT_S
    for directory in [*dirs, cgroup]:
        while True:
            try:
                directory.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if time.monotonic() >= deadline:
                    raise MachineError(f"cannot remove cgroup {directory}: {exc}") from exc
                time.sleep(0.1)
