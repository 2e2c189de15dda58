"""Serving the vLLM test image (tests/system/vllm_image.py) in the system tests.

- fixtures ``vllm_image`` (session: the image, built or reused) and ``tiny_model`` (session:
  testbed/tinymodel.py's model with its tokenizer); bring them into a test module with
  ``from tests.system.vllm_engine import vllm_image as vllm_image`` (and ``tiny_model``);
- :func:`docker_run_argv`: the engine run as the appliance runs it, with :data:`ENGINE_ENV`
  and :data:`ENGINE_ARGS` (shared/TESTBED.md's measured recipe);
- :func:`load_image`: the image into the Docker engine of a machine, through a cached Docker
  data root when there is one (:func:`seed_data_root` before boot);
- :func:`wait_healthy` and :func:`http` to talk to it on loopback.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from testbed import tinymodel
from tests.system import rootfs
from tests.system.machine import CLEAN_PATH, NSPAWN_RUN, Machine, MachineError, wait_for
from tests.system.vllm_image import (
    IMAGE_USER,
    VENV,
    Image,
    cache_dir,
    docker_import_argv,
    ensure,
)

IMPORT_TIMEOUT_S = 300
TOKENIZER_TIMEOUT_S = 300

# How the engine runs in the image (shared/TESTBED.md): as the appliance's uid on a read-only
# root, every cache under the /cache tmpfs, nothing fetched from the hub, no usage reports.
ENGINE_ENV = {
    "HOME": "/cache",
    "TMPDIR": "/cache",
    "VLLM_RPC_BASE_PATH": "/cache",
    "VLLM_CACHE_ROOT": "/cache/vllm",
    "VLLM_CONFIG_ROOT": "/cache/vllm-config",
    "TORCHINDUCTOR_CACHE_DIR": "/cache/inductor",
    "TRITON_CACHE_DIR": "/cache/triton",
    "NUMBA_CACHE_DIR": "/cache/numba",
    "OUTLINES_CACHE_DIR": "/cache/outlines",
    "XDG_CACHE_HOME": "/cache/xdg",
    "XDG_CONFIG_HOME": "/cache/xdg-config",
    "HF_HOME": "/cache/hf",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
# The tiny model on CPU: full precision, eager (no compile step), a small context and KV cache.
ENGINE_ARGS = (
    "--dtype=float32",
    "--max-model-len=256",
    "--enforce-eager",
    "--kv-cache-memory-bytes=67108864",
)
CACHE_TMPFS = "rw,noexec,nosuid,nodev,size=256m,mode=1777"
SHM_SIZE = "256m"  # docker's 64 MiB default fails: "Insufficient space in /dev/shm"


def docker_run_argv(
    image: str,
    *,
    name: str,
    model_dir: str,
    port: int,
    api_key: str | None = None,
    served_model_name: str = "tiny",
    docker: str = "docker",
) -> list[str]:
    """``docker run -d`` of the engine, hardened as the appliance runs it: read-only root, no
    capabilities, no new privileges, the appliance's uid, an init as PID 1, the host's
    network, a tmpfs for every cache and the model bound read-only at /model."""
    argv = [docker, "run", "--detach", f"--name={name}", "--read-only", "--cap-drop=ALL"]
    argv += ["--security-opt=no-new-privileges", f"--user={IMAGE_USER}", "--network=host"]
    argv += ["--init", f"--shm-size={SHM_SIZE}", f"--tmpfs=/cache:{CACHE_TMPFS}"]
    argv += [f"--volume={model_dir}:/model:ro"]
    argv += [f"--env={var}={value}" for var, value in ENGINE_ENV.items()]
    argv += [image, "--model=/model", f"--served-model-name={served_model_name}"]
    argv += ["--host=127.0.0.1", f"--port={port}", *ENGINE_ARGS]
    return argv + ([f"--api-key={api_key}"] if api_key else [])


def import_image(machine: Machine, image: Image, timeout: float = IMPORT_TIMEOUT_S) -> float:
    """Import the image into the Docker engine running in ``machine`` (its tree streamed from
    the host); returns the seconds it took."""
    nsenter = shutil.which("nsenter") or "nsenter"
    env = {"PATH": CLEAN_PATH, "LANG": "C.UTF-8"}
    started = time.monotonic()
    with tempfile.TemporaryFile() as tar_errors:
        tar = subprocess.Popen(
            ["tar", *rootfs._tar_flags(), "-C", str(image.tree), "-c", "."],
            stdout=subprocess.PIPE,
            stderr=tar_errors,
        )
        try:
            load = subprocess.run(
                [nsenter, "-t", str(machine.leader), "-a", *docker_import_argv(), image.name],
                stdin=tar.stdout,
                capture_output=True,
                env=env,
                timeout=timeout,
                check=False,
            )
        finally:
            if tar.stdout:
                tar.stdout.close()
            try:
                tar.wait(30)
            except subprocess.TimeoutExpired:
                tar.kill()
                tar.wait()
        tar_errors.seek(0)
        tar_tail = tar_errors.read()[-1000:].decode(errors="replace")
    if load.returncode != 0 or tar.returncode != 0:
        raise MachineError(
            f"docker import {image.name} exited {load.returncode} (tar {tar.returncode}): "
            f"{load.stderr.decode(errors='replace')[-2000:]}{tar_tail}"
        )
    return time.monotonic() - started


# --- a cached Docker data root -----------------------------------------------------------------
#
# Importing the image takes 30-50 s; a Docker data root that holds it already, copied, takes a
# few. The cache is the data root of an engine that has just imported the image (stopped, so
# its databases are at rest), keyed by the image and by the machine's root file system (the
# engine's version). A copy hard-links the image layer's files (overlay2/<id>/diff: docker
# only ever reads them, as the lower layer of containers) and copies everything else (the
# engine's databases and metadata, which it rewrites in place). Nothing may write into an
# image layer's files through /var/lib/docker directly.


def data_root_cache(image: Image) -> Path:
    return cache_dir() / f"docker-{image.key}-{rootfs.key()}"


def _clone_data_root(source: Path, target: Path) -> None:
    """``target`` (an empty directory) becomes a copy of ``source`` that shares the image
    layers' files with it."""
    rootfs._run(["cp", "-a", "--link", f"{source}/.", str(target)])
    for top, dirs, files in os.walk(target):
        here = Path(top)
        if here.parent.name == "overlay2" and here.parent.parent == target:
            dirs[:] = [d for d in dirs if d != "diff"]
        for name in files:
            path = here / name
            info = path.lstat()
            if not stat.S_ISREG(info.st_mode):
                continue
            private = here / f".{name}.clone"
            shutil.copy2(path, private)
            os.chown(private, info.st_uid, info.st_gid)
            os.replace(private, path)


def seed_data_root(image: Image, data_root: Path) -> bool:
    """Fill ``data_root`` (empty, on the cache's file system) from the cached data root, before
    the machine boots with it as /var/lib/docker; False when there is none to use."""
    cached = data_root_cache(image)
    if not cached.is_dir() or cached.stat().st_dev != data_root.stat().st_dev:
        return False
    _clone_data_root(cached, data_root)
    return True


def _save_data_root(machine: Machine, image: Image, data_root: Path) -> None:
    """Keep the machine's data root (the image just imported) as the cache: with the engine
    stopped, copied under a temporary name and renamed into place."""
    cached = data_root_cache(image)
    if cached.exists() or cached.parent.stat().st_dev != data_root.stat().st_dev:
        return
    machine.systemctl("stop", "docker.service", "docker.socket", timeout=120)
    try:
        with rootfs._lock(cached.with_name(cached.name + ".lock"), IMPORT_TIMEOUT_S):
            if cached.exists():
                return
            tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
            rootfs._remove_tree(tmp)
            tmp.mkdir()
            try:
                _clone_data_root(data_root, tmp)
                os.rename(tmp, cached)
            finally:
                rootfs._remove_tree(tmp)
    finally:
        machine.systemctl("start", "docker.service", timeout=120)


def load_image(machine: Machine, image: Image, data_root: Path) -> str:
    """Make sure the Docker engine running in ``machine`` (data root ``data_root`` on the
    host) has the image: there already (seeded), or imported and then cached. Says which."""
    inspect = machine.run(["docker", "image", "inspect", image.name], check=False)
    if inspect.returncode == 0:
        return "from the cached docker data root"
    took = import_image(machine, image)
    started = time.monotonic()
    _save_data_root(machine, image, data_root)
    return f"imported in {took:.1f} s (cached in {time.monotonic() - started:.1f} s)"


def write_tiny_model(image: Image, directory: Path, seed: int = 0) -> Path:
    """testbed/tinymodel.py's model in ``directory``, with its tokenizer trained by the
    image's own Python (the ``tokenizers`` the engine uses; the host need not have it).
    Readable by the image's uid."""
    if seed:
        raise ValueError("the tokenizer step trains for seed 0 (python -m testbed.tinymodel)")
    tinymodel.write(directory, seed)
    source = Path(tinymodel.__file__).resolve()
    machine = f"tinymodel-{secrets.token_hex(4)}"
    argv = ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--read-only"]
    argv += [f"--machine={machine}"]
    argv += [f"--directory={image.tree}", "--private-network", "--resolv-conf=off"]
    argv += [f"--bind-ro={source}:/run/tinymodel.py", f"--bind={directory}:/run/model"]
    argv += ["--setenv=PYTHONDONTWRITEBYTECODE=1", "--setenv=HF_HUB_OFFLINE=1"]
    argv += [f"{VENV}/bin/python", "/run/tinymodel.py", "/run/model", "--tokenizer"]
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env={"PATH": CLEAN_PATH, "LANG": "C.UTF-8"},
            timeout=TOKENIZER_TIMEOUT_S,
            check=False,
        )
    finally:
        shutil.rmtree(NSPAWN_RUN / machine, ignore_errors=True)
    if proc.returncode != 0:
        raise MachineError(
            f"{' '.join(argv)} exited {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}"
        )
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)
    return directory


def free_port() -> int:
    """A TCP port free on loopback now (the machines share the host's network)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http(
    url: str,
    body: object | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30,
) -> tuple[int, bytes]:
    """One request to the engine on loopback: (status, body); HTTP errors are answers."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=dict(headers or {}))  # noqa: S310
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_healthy(port: int, timeout: float, *, alive: Callable[[], bool]) -> float:
    """Wait for the engine's ``/health`` to answer 200; returns the seconds waited. Fails at
    once when ``alive()`` says the engine is gone."""
    started = time.monotonic()

    def healthy() -> bool:
        if not alive():
            raise MachineError("the engine exited before /health answered")
        try:
            return http(f"http://127.0.0.1:{port}/health", timeout=5)[0] == 200
        except OSError:
            return False

    wait_for(healthy, timeout, what=f"the engine's /health on port {port}", interval=1.0)
    return time.monotonic() - started


# --- fixtures (import them into a test module or conftest) -----------------------------------


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "the vLLM test image is built with debootstrap and chroot, as root"
    for tool in ("debootstrap", "chroot", "unshare", "systemd-nspawn", "tar", "zstd"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup-env installs it)"
    return None


@pytest.fixture(scope="session")
def vllm_image() -> Image:
    """The vLLM test image (built, unpacked or reused): ``.tree``, ``.tarball``, ``.name``."""
    why = _why_not()
    if why:
        pytest.skip(why)
    image = ensure()
    if image.built_s is not None:
        report(f"vllm image built in {image.built_s:.1f} s ({image.tarball})")
    elif image.unpacked_s is not None:
        report(f"vllm image unpacked in {image.unpacked_s:.1f} s ({image.tree})")
    else:
        report(f"vllm image reused ({image.tree})")
    return image


@pytest.fixture(scope="session")
def tiny_model(vllm_image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """testbed/tinymodel.py's model with its tokenizer, readable by the image's uid."""
    started = time.monotonic()
    directory = write_tiny_model(vllm_image, tmp_path_factory.mktemp("tiny-model") / "model")
    report(f"tiny model with tokenizer written in {time.monotonic() - started:.1f} s")
    yield directory


def report(line: str) -> None:
    """A line for the "system machines" section of pytest's terminal summary (the list of
    tests/system/conftest.py as pytest loaded it, under whichever module name)."""
    path = Path(__file__).with_name("conftest.py")
    for module in list(sys.modules.values()):
        if getattr(module, "__file__", None) == str(path) and hasattr(module, "_TIMES"):
            module._TIMES.append(line)
            return
    print(line, file=sys.stderr)
