"""vllm-supervisor as a process against a real dockerd that this module starts on the host.

No registry is reachable, so the image is imported from a two-file root file system: the host's
static busybox and a stand-in engine script used as the image's entry point. The stand-in takes
``vllm serve``'s arguments (``/model --served-model-name N --host H --port P``, then
``serving_args``), checks what the container spec promises (loopback, a readable read-only
``/model``, a read-only root), answers ``/v1/models`` at once and ``/health`` only after
``--ready-after`` whole seconds (as vLLM does), and exits with the code a test writes to
``<model>/exit-code``. dockerd runs with its own data and exec roots, no bridge and no iptables
(TESTBED.md), and is stopped, its mounts undone and its directories removed, whatever happened.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import docker  # type: ignore[import-untyped]
import pytest

from tests.attestd_proc import NotifyListener, running
from tests.integration.conftest import RunningTestbed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
BUSYBOX = Path("/bin/busybox")
IMAGE = "confinfer-test/stand-in-engine:1"
ENTRYPOINT = '["/bin/busybox", "sh", "/engine"]'
DOCKERD_START_S = 30
T = TypeVar("T")

ENGINE = r"""
set -eu
fail() { echo "stand-in engine: $2" >&2; exit "$1"; }
[ "${1:-}" = /model ] || fail 64 "first argument is not /model: ${1:-}"
shift
host= port= name= ready_after=1
while [ $# -gt 0 ]; do
    case "$1" in
        --host) host=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        --served-model-name) name=$2; shift 2 ;;
        --ready-after) ready_after=$2; shift 2 ;;
        *) shift ;;
    esac
done
echo "stand-in engine: serving $name on $host:$port as $(busybox id -u):$(busybox id -g)"
[ "$host" = 127.0.0.1 ] || fail 65 "not loopback: $host"
[ -r /model/config.json ] || fail 66 "no /model/config.json"
if busybox touch /model/.w 2>/dev/null; then fail 67 "/model is writable"; fi
if busybox touch /.w 2>/dev/null; then fail 68 "/ is writable"; fi
busybox mkdir -p "$HOME/www/v1"
echo '{"object":"list","data":[]}' > "$HOME/www/v1/models"
busybox httpd -f -p "$host:$port" -h "$HOME/www" &
httpd=$!
trap 'kill $httpd; echo "stand-in engine: stopped"; exit 0' TERM INT
ticks=$((ready_after * 10)) n=0
while :; do
    if [ -e /model/exit-code ]; then
        code=$(busybox cat /model/exit-code)
        echo "stand-in engine: exiting with $code"
        kill $httpd
        exit "$code"
    fi
    if [ "$n" -eq "$ticks" ]; then
        echo ok > "$HOME/www/health"
        echo "stand-in engine: ready"
    fi
    n=$((n + 1))
    busybox sleep 0.1
done
"""


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value is not None:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# --- dockerd ---------------------------------------------------------------------------------


@dataclass
class Dockerd:
    root: Path
    proc: subprocess.Popen[bytes]
    client: Any

    @property
    def host(self) -> str:
        return f"unix://{self.root}/docker.sock"

    def ours(self) -> list[Any]:
        return list(self.client.containers.list(all=True, filters={"label": "confinfer.role"}))


def _mounts_under(root: Path) -> list[str]:
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        for line in info:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == str(root) or point.startswith(f"{root}/"):
                points.append(point)
    return points


def _pids_naming(root: Path) -> list[int]:
    """Processes whose command line names ``root`` (dockerd's containerd and its shims)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if str(root).encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
    return pids


def _stop_dockerd(root: Path, proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    for pid in _pids_naming(root):  # only what our dockerd started, by id
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for point in reversed(_mounts_under(root)):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def dockerd() -> Iterator[Dockerd]:
    binary = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if not Path(binary).exists():
        pytest.skip("dockerd cannot run here: not installed (scripts/setup-env installs docker.io)")
    root = Path(tempfile.mkdtemp(prefix="cfdk.", dir="/tmp"))
    root.chmod(0o755)
    log = (root / "dockerd.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            *("--data-root", str(root / "data"), "--exec-root", str(root / "exec")),
            *("-H", f"unix://{root}/docker.sock", "--pidfile", str(root / "dockerd.pid")),
            *("--bridge", "none", "--iptables=false", "--ip6tables=false", "--ip-masq=false"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    client = None
    try:
        deadline = time.monotonic() + DOCKERD_START_S
        while client is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (root / "dockerd.log").read_text(errors="replace")[-1500:]
                pytest.skip(f"dockerd cannot run here (exit {proc.poll()}): {tail}")
            if (root / "docker.sock").exists():
                with contextlib.suppress(docker.errors.DockerException):
                    candidate = docker.DockerClient(base_url=f"unix://{root}/docker.sock")
                    candidate.ping()
                    client = candidate
            time.sleep(0.1)
        yield Dockerd(root, proc, client)
    finally:
        if client is not None:
            with contextlib.suppress(docker.errors.DockerException):
                for container in client.containers.list(all=True):
                    container.remove(force=True)
            client.close()
        _stop_dockerd(root, proc)


@pytest.fixture(scope="module")
def image(dockerd: Dockerd) -> str:
    """The stand-in engine image, imported from a tar of busybox and the script."""
    if not BUSYBOX.exists():
        pytest.fail(f"{BUSYBOX} is missing: scripts/setup-env installs busybox-static")
    static = subprocess.run(["ldd", str(BUSYBOX)], capture_output=True, text=True, check=False)
    assert "not a dynamic executable" in static.stdout + static.stderr, "need a static busybox"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tar.gettarinfo(str(BUSYBOX), arcname="bin/busybox")
        info.mode, info.uid, info.gid, info.uname, info.gname = 0o755, 0, 0, "", ""
        with BUSYBOX.open("rb") as stream:
            tar.addfile(info, stream)
        script = ENGINE.encode()
        info = tarfile.TarInfo("engine")
        info.size, info.mode = len(script), 0o644
        tar.addfile(info, io.BytesIO(script))
        # No /cache in the root file system: docker would copy its mode onto the tmpfs.
    repository, tag = IMAGE.split(":")
    dockerd.client.api.import_image_from_data(
        buf.getvalue(), repository=repository, tag=tag, changes=[f"ENTRYPOINT {ENTRYPOINT}"]
    )
    return IMAGE


# --- the supervisor --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(port: int, path: str) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


@dataclass
class Run:
    proc: subprocess.Popen[str]
    notify: NotifyListener
    model: Path
    port: int
    config: Path

    def notes(self, key: str) -> list[str]:
        return [m[key] for m in self.notify.snapshot() if key in m]

    def ready(self) -> bool:
        return "1" in self.notes("READY")

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err


@pytest.fixture
def supervise(dockerd: Dockerd, image: str) -> Iterator[Callable[..., Run]]:
    runs: list[Run] = []
    work = Path(tempfile.mkdtemp(prefix="cfsv.", dir="/tmp"))
    work.chmod(0o755)  # the engine (uid 10001) walks down to the model, as on the VM

    def start(
        *serving_args: str, image_name: str | None = None, attestd: Path | None = None
    ) -> Run:
        model_dir = work / f"run{len(runs)}" / "model"
        model = model_dir / "tiny"
        model.mkdir(parents=True)
        (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
        for path in (model_dir.parent, model_dir, model):
            path.chmod(0o755)
        (model_dir.parent / "model.json").write_text(
            json.dumps({"model_path": str(model), "bytes": 42, "files": 1, "unseal_s": 0.1})
        )
        port = free_port()
        cfg = work / f"serving{len(runs)}.toml"
        cfg.write_text(
            "\n".join(
                [
                    f'model_dir = "{model_dir}"',
                    f'serving_image = "{image_name or image}"',
                    f"serving_port = {port}",
                    'serving_model_name = "tiny"',
                    "serving_gpus = false",
                    f'docker_host = "{dockerd.host}"',
                    "serving_ready_timeout_s = 60",
                    f"serving_args = {json.dumps(list(serving_args))}",
                    f'attestd_socket = "{attestd or work / "no-attestd.sock"}"',
                ]
            )
            + "\n"
        )
        notify = NotifyListener(work / f"notify{len(runs)}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONFINFER_")}
        env["NOTIFY_SOCKET"] = str(notify.path)
        proc = subprocess.Popen(
            [sys.executable, "-m", "serving.supervisor", "--config", str(cfg)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        run = Run(proc, notify, model, port, cfg)
        runs.append(run)
        return run

    yield start
    for run in runs:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.communicate(timeout=30)
        run.notify.close()
    with contextlib.suppress(docker.errors.DockerException):
        for container in dockerd.ours():
            container.remove(force=True)
    shutil.rmtree(work, ignore_errors=True)


def test_ready_only_after_health_hardened_and_sigterm_removes_it(
    dockerd: Dockerd, image: str, supervise: Callable[..., Run]
) -> None:
    # A container of an earlier run, under our name and label: it is replaced.
    leftover = dockerd.client.containers.create(
        image, ["/x"], name="confinfer-vllm", labels={"confinfer.role": "serving"}
    )
    run = supervise("--ready-after", "3")

    wait_for("the engine's HTTP server", lambda: get(run.port, "/v1/models") == 200 or None)
    notes = run.notify.snapshot()
    assert get(run.port, "/health") == 404  # so /health has never answered 200 until now
    assert not [m for m in notes if "READY" in m], "READY before /health answered"
    assert any(
        m.get("STATUS", "").startswith(f"starting the engine: {image} serving {run.model}")
        for m in notes
    )

    wait_for("READY=1", lambda: run.ready() or None)
    assert get(run.port, "/health") == 200
    [status] = [m["STATUS"] for m in run.notify.snapshot() if "READY" in m]
    assert status.startswith(f"serving tiny on 127.0.0.1:{run.port} (engine ready in ")

    [container] = dockerd.ours()
    assert container.id != leftover.id
    attrs = container.attrs
    host = attrs["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Init"] is True
    assert host["NetworkMode"] == "host"
    assert host["RestartPolicy"]["Name"] == "no"
    assert host["PidsLimit"] == 8192
    assert host["ShmSize"] == 1024**3
    assert not host.get("DeviceRequests")
    assert host["Tmpfs"]["/cache"].startswith("rw,noexec,nosuid,nodev,")
    assert attrs["Config"]["User"] == "10001:10001"
    assert attrs["Config"]["Entrypoint"] == json.loads(ENTRYPOINT)
    assert attrs["Config"]["Cmd"][:7] == [
        *("/model", "--served-model-name", "tiny", "--host", "127.0.0.1", "--port"),
        str(run.port),
    ]
    [mount] = attrs["Mounts"]
    assert (mount["Type"], mount["Source"], mount["Destination"]) == (
        "bind",
        str(run.model),
        "/model",
    )
    assert mount["RW"] is False
    env = dict(item.split("=", 1) for item in attrs["Config"]["Env"])
    assert env["HOME"] == "/cache" and env["HF_HUB_OFFLINE"] == "1"

    run.proc.send_signal(signal.SIGTERM)
    code, err = run.finish()
    assert code == 0, err
    assert "1" in run.notes("STOPPING")
    assert dockerd.ours() == []
    assert "engine: stand-in engine: ready" in err  # the engine's output reached our stderr
    assert "serving container removed" in err


def test_the_engine_exiting_fails_the_unit_and_removes_the_container(
    dockerd: Dockerd, supervise: Callable[..., Run]
) -> None:
    run = supervise("--ready-after", "1")
    wait_for("READY=1", lambda: run.ready() or None)
    (run.model / "exit-code").write_text("3\n")
    code, err = run.finish()
    assert code == 74, err
    [line] = [x for x in err.splitlines() if x.startswith("vllm-supervisor: ")]
    assert line.startswith(
        "vllm-supervisor: engine-exited: the engine's container exited with code 3 while serving;"
    )
    assert "stand-in engine: exiting with 3" in line
    assert dockerd.ours() == []
    assert "STOPPING" not in {k for m in run.notify.snapshot() for k in m}


def test_an_engine_that_dies_before_ready_is_reported_and_removed(
    dockerd: Dockerd, supervise: Callable[..., Run]
) -> None:
    run = supervise("--ready-after", "30")
    wait_for("the engine's HTTP server", lambda: get(run.port, "/v1/models") == 200 or None)
    (run.model / "exit-code").write_text("9\n")
    code, err = run.finish()
    assert code == 74, err
    assert "exited with code 9 before it was ready" in err
    assert not run.ready()
    assert dockerd.ours() == []


def test_cleanup_removes_what_a_killed_supervisor_left(
    dockerd: Dockerd, supervise: Callable[..., Run]
) -> None:
    run = supervise("--ready-after", "1")
    wait_for("READY=1", lambda: run.ready() or None)
    run.proc.kill()  # no finally runs: the container stays (it is not in our process tree)
    run.finish()
    assert len(dockerd.ours()) == 1
    proc = subprocess.run(
        [sys.executable, "-m", "serving.supervisor", "--config", str(run.config), "--cleanup"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("CONFINFER_")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert dockerd.ours() == []


def test_a_missing_image_is_refused_and_nothing_is_pulled(
    dockerd: Dockerd, supervise: Callable[..., Run]
) -> None:
    run = supervise(image_name="confinfer-test/absent:1")
    code, err = run.finish()
    assert code == 78, err
    assert "vllm-supervisor: serving-image-missing: " in err
    assert dockerd.ours() == []
    assert [i.tags for i in dockerd.client.images.list()] == [[IMAGE]]


def test_a_revocation_kills_the_engine_at_once(
    dockerd: Dockerd, supervise: Callable[..., Run], testbed: RunningTestbed
) -> None:
    with running(testbed.env) as daemon:
        run = supervise("--ready-after", "1", attestd=daemon.socket_path)
        wait_for("READY=1", lambda: run.ready() or None)
        assert len(dockerd.ours()) == 1
        testbed.cli("gpu", "cc-off")
        try:
            code, err = run.finish()
        finally:
            testbed.cli("gpu", "cc-on")
    assert code == 0, err  # a stop, as asked: model-loader reports the revocation
    assert dockerd.ours() == []
    assert "attestd revoked attestation (gpu-cc-off)" in err
    assert "serving container killed and removed" in err
    stopping = [m for m in run.notify.snapshot() if "STOPPING" in m]
    assert stopping[0]["STATUS"] == "stopping the engine: attestd revoked attestation (gpu-cc-off)"
