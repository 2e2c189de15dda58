"""The Debian bookworm root file system that tests/system boots under systemd-nspawn.

Built once with ``debootstrap --variant=minbase``, configured for machines that share the
host's network (below), packed as ``rootfs-<key>.tar.zst`` and unpacked next to it as
``rootfs-<key>/``, the read-only lower layer every machine boots from (``--overlay``). Both
live in the cache directory (``$CONFINFER_TEST_CACHE``, default ``/var/cache/confinfer-tests``),
shared by every checkout on the host. ``<key>`` hashes what goes in: the suite, the package
list, the host's extra CA certificates and this file, so a change to any of them builds anew
and an unchanged one is reused. Concurrent runs take a lock on the key; everything is built
under a temporary name and renamed into place, so a half-built tree is never used.

Configuration, for machines that share the host's network namespace:

- ``systemd-networkd`` is masked; cloud-init's network configuration is disabled (its fallback
  configuration matches the host's interface); ``docker.service``, ``docker.socket``,
  ``containerd.service`` and ``caddy.service`` are installed but not enabled (Debian's Caddy
  takes port 80), and ``/etc/docker/daemon.json`` keeps the engine off the host's bridges and
  iptables, for the tests that start it;
- the host's extra CA certificates (``/usr/local/share/ca-certificates``) are trusted inside.

Run ``python -m tests.system.rootfs`` to build or reuse ahead of the tests; it prints the path.
``--prune`` first removes the caches of other keys (not while tests boot from them).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
CACHE_ENV = "CONFINFER_TEST_CACHE"
MIRROR_ENV = "CONFINFER_TEST_DEBIAN_MIRROR"
DEFAULT_CACHE = Path("/var/cache/confinfer-tests")
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")

# What the units under test need. The first line is the appliance's own (TESTBED.md); then the
# shared libraries behind the project's .venv: tpm2-pytss links the TSS2 libraries and loads
# the swtpm and device TCTIs at run time, and an interpreter built outside Debian (pyenv) links
# the rest. cryptography's wheels bring their own OpenSSL.
PACKAGES = (
    *("systemd", "systemd-sysv", "dbus", "python3", "python3-cffi-backend", "docker.io"),
    *("caddy", "tpm2-tools", "cloud-init", "iproute2", "curl", "ca-certificates", "libnuma1"),
    # What the user data's packages: adds to a stock image (the cloud-init system test).
    *("python3-venv", "gnupg"),
    *("libtss2-esys-3.0.2-0", "libtss2-fapi1", "libtss2-mu0", "libtss2-rc0", "libtss2-sys1"),
    *("libtss2-tctildr0", "libtss2-tcti-swtpm0", "libtss2-tcti-device0"),
    *("libssl3", "libffi8", "libbz2-1.0", "liblzma5", "libsqlite3-0", "libreadline8"),
    *("libncursesw6", "libuuid1", "zlib1g", "libstdc++6", "libexpat1"),
)

# Units that would act on the host's network namespace, which the machines share.
MASKED_UNITS = (
    "systemd-networkd.service",
    "systemd-networkd.socket",
    "systemd-networkd-wait-online.service",
)
DISABLED_UNITS = ("docker.service", "docker.socket", "containerd.service", "caddy.service")
DOCKER_DAEMON_JSON = {"bridge": "none", "iptables": False, "ip6tables": False, "ip-masq": False}
CLOUD_CFG = "# tests/system/rootfs.py: the machines share the host's network\n"
CLOUD_CFG += "network: {config: disabled}\n"

DEBOOTSTRAP_TIMEOUT_S = 1200
STEP_TIMEOUT_S = 300
LOCK_TIMEOUT_S = 1800  # another run may be building the same key


class RootfsError(Exception):
    """The root file system could not be built; the message names the failed step."""


@dataclass(frozen=True)
class Rootfs:
    """A ready root file system: the unpacked tree and the tarball it came from."""

    key: str
    tree: Path
    tarball: Path
    built_s: float | None  # debootstrap and packing, when this call built it
    unpacked_s: float | None  # unpacking, when this call unpacked it
    wait_s: float  # time spent waiting for another run's lock


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def _host_certificates() -> list[Path]:
    return sorted(HOST_CA_DIR.glob("*.crt")) if HOST_CA_DIR.is_dir() else []


def key() -> str:
    """A hash of every input of the build."""
    digest = hashlib.sha256()
    digest.update(json.dumps([SUITE, PACKAGES]).encode())
    digest.update(Path(__file__).read_bytes())
    for cert in _host_certificates():
        digest.update(cert.name.encode() + b"\0" + cert.read_bytes())
    return digest.hexdigest()[:16]


def mirror() -> str:
    """The Debian mirror the host's apt uses for the suite, or ``$CONFINFER_TEST_DEBIAN_MIRROR``."""
    if os.environ.get(MIRROR_ENV):
        return os.environ[MIRROR_ENV]
    apt = Path("/etc/apt")
    for path in sorted(apt.glob("sources.list.d/*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace")):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                name, sep, value = line.partition(":")
                if sep and not line.startswith((" ", "#")):
                    fields[name.strip().lower()] = value.strip()
            if (
                "deb" in fields.get("types", "").split()
                and SUITE in fields.get("suites", "").split()
            ):
                uris = fields.get("uris", "").split()
                if uris and "security" not in uris[0]:
                    return uris[0]
    for path in [apt / "sources.list", *sorted(apt.glob("sources.list.d/*.list"))]:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            words = re.sub(r"\[[^]]*\]", "", line).split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                return words[1]
    return DEFAULT_MIRROR


def _run(argv: list[str], *, timeout: float = STEP_TIMEOUT_S, log: Path | None = None) -> None:
    out = log.open("ab") if log else None
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out or subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    finally:
        if out:
            out.close()
    if proc.returncode != 0:
        tail = (
            log.read_text(errors="replace")[-3000:]
            if log
            else proc.stdout.decode(errors="replace")[-3000:]
        )
        raise RootfsError(f"{' '.join(argv)} exited {proc.returncode}:\n{tail}")


def configure(root: Path, log: Path | None = None) -> None:
    """Adjust a debootstrapped tree for machines that share the host's network."""
    systemctl = ["systemctl", f"--root={root}"]
    _run([*systemctl, "mask", *MASKED_UNITS], log=log)
    _run([*systemctl, "disable", *DISABLED_UNITS], log=log)
    docker = root / "etc/docker"
    docker.mkdir(parents=True, exist_ok=True)
    (docker / "daemon.json").write_text(json.dumps(DOCKER_DAEMON_JSON) + "\n", encoding="utf-8")
    (root / "etc/cloud/cloud.cfg.d/99-confinfer-tests.cfg").write_text(CLOUD_CFG, "utf-8")
    certs = _host_certificates()
    if certs:
        target = root / HOST_CA_DIR.relative_to("/")
        target.mkdir(parents=True, exist_ok=True)
        for cert in certs:
            shutil.copyfile(cert, target / cert.name)
        _run(["chroot", str(root), "update-ca-certificates"], log=log)
    # Each machine gets its own machine id and host name at boot (machine.py writes them into
    # its overlay); debootstrap copied the host's name.
    (root / "etc/machine-id").write_text("", encoding="ascii")
    (root / "etc/hostname").write_text("localhost\n", encoding="ascii")
    _run(["chroot", str(root), "apt-get", "clean"], log=log)
    lists = root / "var/lib/apt/lists"
    for entry in lists.iterdir() if lists.is_dir() else ():
        if entry.is_file() and entry.name != "lock":
            entry.unlink()


def _tar_flags() -> list[str]:
    return ["--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls"]


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _lock(path: Path, timeout: float) -> Iterator[float]:
    """An exclusive flock on ``path``, waited for at most ``timeout`` s; yields the wait."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    started = time.monotonic()
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() - started > timeout:
                    raise RootfsError(
                        f"{path}: still locked by another build after {timeout} s"
                    ) from None
                time.sleep(1)
        yield time.monotonic() - started
    finally:
        os.close(fd)


def _build_tarball(tarball: Path, work: Path, log: Path) -> None:
    root = work / "root"
    root.mkdir(parents=True)
    argv = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}"]
    _run([*argv, SUITE, str(root), mirror()], timeout=DEBOOTSTRAP_TIMEOUT_S, log=log)
    configure(root, log)
    tmp = tarball.with_name(f".{tarball.name}.{os.getpid()}.tmp")
    try:
        _run(
            ["tar", *_tar_flags(), "-I", "zstd -T0 -3", "-C", str(root), "-cf", str(tmp), "."],
            log=log,
        )
        os.replace(tmp, tarball)
    finally:
        tmp.unlink(missing_ok=True)


def _unpack(tarball: Path, tree: Path, log: Path) -> None:
    tmp = tree.with_name(f".{tree.name}.{os.getpid()}.tmp")
    _remove_tree(tmp)
    tmp.mkdir(mode=0o755)
    try:
        _run(["tar", *_tar_flags(), "-I", "zstd", "-xpf", str(tarball), "-C", str(tmp)], log=log)
        os.rename(tmp, tree)
    finally:
        _remove_tree(tmp)


def ensure(directory: Path | None = None) -> Rootfs:
    """The root file system for the current inputs: reused when present, else unpacked from
    its tarball, else built (about a minute or two of debootstrap)."""
    directory = directory or cache_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o755)
    name = f"rootfs-{key()}"
    tree, tarball = directory / name, directory / f"{name}.tar.zst"
    if tree.is_dir():
        return Rootfs(name, tree, tarball, None, None, 0.0)
    log = directory / f"{name}.log"
    built_s = unpacked_s = None
    with _lock(directory / f"{name}.lock", LOCK_TIMEOUT_S) as waited:
        if tree.is_dir():  # another run finished it while this one waited
            return Rootfs(name, tree, tarball, None, None, waited)
        log.write_text(f"building {name} from {mirror()}\n", encoding="utf-8")
        for stale in directory.glob(f".{name}*"):  # a build that died under this lock
            _remove_tree(stale)
        if not tarball.is_file():
            started = time.monotonic()
            work = directory / f".{name}.{os.getpid()}.build"
            try:
                _build_tarball(tarball, work, log)
            finally:
                _remove_tree(work)
            built_s = time.monotonic() - started
        started = time.monotonic()
        _unpack(tarball, tree, log)
        unpacked_s = time.monotonic() - started
    return Rootfs(name, tree, tarball, built_s, unpacked_s, waited)


def prune(directory: Path | None = None, keep: str | None = None) -> list[Path]:
    """Remove the cached trees and tarballs of other keys; returns what was removed."""
    directory = directory or cache_dir()
    keep = keep or f"rootfs-{key()}"
    removed = []
    for path in [*directory.glob("rootfs-*"), *directory.glob(".rootfs-*")]:
        if not path.name.lstrip(".").startswith(keep):
            _remove_tree(path)
            removed.append(path)
    return removed


def main(argv: list[str]) -> int:
    if "--prune" in argv[1:]:
        for path in prune():
            print(f"removed {path}", file=sys.stderr)
    started = time.monotonic()
    try:
        rootfs = ensure()
    except RootfsError as exc:
        print(f"rootfs: {exc}", file=sys.stderr)
        return 1
    steps = [f"built in {rootfs.built_s:.1f} s"] if rootfs.built_s is not None else []
    if rootfs.unpacked_s is not None:
        steps.append(f"unpacked in {rootfs.unpacked_s:.1f} s")
    took = f"{time.monotonic() - started:.1f} s"
    print(f"rootfs {', '.join(steps) or 'reused'} ({took} in all)", file=sys.stderr)
    print(rootfs.tree)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
