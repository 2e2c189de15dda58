"""``model-loader`` as a process against a real attestd and the testbed (swtpm vTPM, MAA, Key
Vault, IMDS stand-ins, the fake GPU): a real tmpfs, real Secure Key Release, sd_notify captured
as systemd would receive it.

Each test mounts under a short temporary directory of its own and unmounts in a finalizer,
whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from confinfer import config
from confinfer.errors import Reason
from loader import tmpfs
from loader.keywrap import KeyVaultWrapper
from tests.attestd_proc import Attestd, NotifyListener, running, wait_for
from tests.cli import run_confinfer
from tests.integration.conftest import RunningTestbed
from tests.tutorial_pkg import files_of, make_archive

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MODEL_LOADER = ROOT / ".venv" / "bin" / "model-loader"
SERVING_GID = 10001
# systemd/model-loader.service's CapabilityBoundingSet=: root without CAP_DAC_OVERRIDE.
UNIT_CAPS = ("setpriv", "--bounding-set", "-all,+sys_admin,+chown,+fowner", "--")


# --- the process ------------------------------------------------------------------------------


@dataclass
class Loader:
    proc: subprocess.Popen[bytes]
    notify: NotifyListener
    log_path: Path
    target: Path

    @property
    def handoff(self) -> Path:
        return self.target.parent / "model.json"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def statuses(self) -> list[str]:
        return [m["STATUS"] for m in self.notify.snapshot() if "STATUS" in m]

    def wait_ready(self, timeout: float = 90.0) -> dict[str, str]:
        def ready() -> dict[str, str] | None:
            for message in self.notify.snapshot():
                if message.get("READY") == "1":
                    return message
            if self.proc.poll() is not None:
                raise AssertionError(f"model-loader exited {self.proc.returncode}:\n{self.log()}")
            return None

        return wait_for("READY=1 from model-loader", ready, timeout)

    def wait_exit(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"model-loader did not exit:\n{self.log()}") from None


def mounted(target: Path) -> list[tmpfs.Mount]:
    return tmpfs.mounts_at(target)


def unmount_all(target: Path) -> None:
    for _ in range(5):
        if not mounted(target):
            return
        subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    """A short directory (AF_UNIX paths and mount points), unmounted and removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="ml-", dir="/tmp"))
    try:
        yield path
    finally:
        unmount_all(path / "run" / "m")
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def loader(
    testbed: RunningTestbed,
    attestd: Attestd | None,
    work: Path,
    source: str | Path,
    *,
    name: str = "loader",
    wrap: tuple[str, ...] = (),
    **env: str,
) -> Iterator[Loader]:
    """Start ``model-loader`` serving ``source`` at ``work/run/m`` (under the ``wrap`` command,
    e.g. :data:`UNIT_CAPS`); killed on the way out."""
    target = work / "run" / "m"
    notify = NotifyListener(work / f"{name}.n")
    log_path = work / f"{name}.log"
    full = testbed.environ(
        CONFINFER_ATTESTD_SOCKET=str(attestd.socket_path if attestd else work / "no.sock"),
        CONFINFER_MODEL_SOURCE=str(source),
        CONFINFER_MODEL_DIR=str(target),
        NOTIFY_SOCKET=str(notify.path),
        **env,
    )
    full.pop("JOURNAL_STREAM", None)
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [*wrap, str(MODEL_LOADER)],
            env=full,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        yield Loader(proc, notify, log_path, target)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        notify.close()


def assert_wiped(run: Loader) -> None:
    assert mounted(run.target) == [], "the model tmpfs is still mounted"
    assert not run.handoff.exists()
    assert not any(run.target.iterdir())


def assert_failed(run: Loader, reason: Reason) -> None:
    code = run.wait_exit()
    assert code == reason.exit_code, run.log()
    last = [line for line in run.log().splitlines() if not line.startswith("hint: ")][-1]
    assert last.startswith(f"model-loader: {reason}: "), run.log()
    assert "Traceback" not in run.log()


# --- packages ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Packages:
    model: Path
    sealed: Path
    tutorial: Path


def tiny_model(where: Path) -> Path:
    subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "-m", "testbed.tinymodel", str(where)],
        check=True,
        capture_output=True,
    )
    (where / "tokenizer").mkdir()
    (where / "tokenizer" / "vocab.json").write_text('{"a": 1}', encoding="utf-8")
    return where


def seal(testbed: RunningTestbed, model: Path, out: Path) -> Path:
    done = run_confinfer(
        "seal",
        model,
        "--out",
        out,
        "--key-id",
        testbed.env["CONFINFER_KEY_ID"],
        env=testbed.environ(),
    )
    assert done.returncode == 0, done.stderr
    return out


def tutorial_package(testbed: RunningTestbed, model: Path, out: Path) -> Path:
    """The seed tutorial's layout, its DEK wrapped by the testbed's Key Vault (wrapKey)."""
    from tests.tutorial_pkg import encrypt_archive

    dek = os.urandom(32)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in testbed.env.items():
            mp.setenv(key, value)
        cfg = config.load(out.parent / "no-config", environ=testbed.env)
        wrapped = KeyVaultWrapper(cfg).wrap(bytearray(dek)).wrapped
    out.mkdir()
    (out / "model_archive.tar.enc").write_bytes(
        encrypt_archive(make_archive(model, out.parent), dek)
    )
    (out / "wrapped_model_dek.bin").write_bytes(wrapped)
    return out


@pytest.fixture(scope="module")
def packages(testbed: RunningTestbed, tmp_path_factory: pytest.TempPathFactory) -> Packages:
    base = tmp_path_factory.mktemp("packages")
    model = tiny_model(base / "Tiny-Llama")
    return Packages(
        model, seal(testbed, model, base / "sealed"), tutorial_package(testbed, model, base / "tut")
    )


@pytest.fixture(scope="module")
def attestd(testbed: RunningTestbed) -> Iterator[Attestd]:
    """One attestd for the tests that do not revoke it."""
    with running(testbed.env) as daemon:
        yield daemon


@pytest.fixture(autouse=True)
def no_faults_left(testbed: RunningTestbed) -> Iterator[None]:
    yield
    testbed.cli("fault", "--clear")


# --- the tests --------------------------------------------------------------------------------


def test_serves_the_model_then_wipes_on_sigterm(
    testbed: RunningTestbed, attestd: Attestd, packages: Packages
) -> None:
    # With the unit's capabilities only: the read-only tree must still be wiped.
    with workdir() as work, loader(testbed, attestd, work, packages.sealed, wrap=UNIT_CAPS) as run:
        ready = run.wait_ready()
        assert ready["STATUS"].startswith("model ready: 3.3 MiB in ")
        statuses = run.statuses()
        released = statuses.index("unsealing: key released, decrypting 3.3 MiB")
        assert statuses.index("unsealing: releasing the key") < released
        assert "tmpfs mounted at" in run.log()
        assert ready["STATUS"].endswith(f" s ({run.target})")
        assert any(s.startswith("waiting for attestd") for s in run.statuses())

        # The tmpfs: ours, size-capped, noswap, no exec, devices or setuid.
        (mount,) = mounted(run.target)
        assert mount.ours
        assert {"noswap", "mode=700"} <= set(mount.super_options)
        assert any(o.startswith("size=") for o in mount.super_options)
        options = _mount_options(run.target)
        assert {"nosuid", "nodev", "noexec"} <= options

        # Read-only for the engine's group, owned by root.
        root = os.stat(run.target)
        assert (stat.S_IMODE(root.st_mode), root.st_uid, root.st_gid) == (0o750, 0, SERVING_GID)
        for path in run.target.rglob("*"):
            info = os.lstat(path)
            want = 0o550 if stat.S_ISDIR(info.st_mode) else 0o440
            assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (
                want,
                0,
                SERVING_GID,
            ), path
        assert files_of(packages.model) == files_of(run.target)

        handoff = json.loads(run.handoff.read_text("utf-8"))
        assert stat.S_IMODE(run.handoff.stat().st_mode) == 0o644
        assert handoff["model_path"] == str(run.target)
        assert handoff["source"] == str(packages.sealed)
        assert handoff["files"] == len(files_of(packages.model))
        assert handoff["bytes"] == sum(len(b) for b in files_of(packages.model).values())
        assert handoff["unseal_s"] >= 0

        run.proc.send_signal(signal.SIGTERM)
        assert run.wait_exit() == 0, run.log()
        assert any(m.get("STOPPING") == "1" for m in run.notify.snapshot())
        assert_wiped(run)


def _mount_options(target: Path) -> set[str]:
    for line in Path("/proc/self/mountinfo").read_text("utf-8").splitlines():
        fields = line.split(" ")
        if fields[4] == str(target):
            return set(fields[5].split(","))
    raise AssertionError(f"{target} is not mounted")


def test_tutorial_layout_serves_its_nested_model(
    testbed: RunningTestbed, attestd: Attestd, packages: Packages
) -> None:
    with workdir() as work, loader(testbed, attestd, work, packages.tutorial) as run:
        run.wait_ready()
        nested = run.target / packages.model.name
        assert json.loads(run.handoff.read_text("utf-8"))["model_path"] == str(nested)
        assert files_of(packages.model) == files_of(nested)
        run.proc.send_signal(signal.SIGTERM)
        assert run.wait_exit() == 0
        assert_wiped(run)


def test_a_tampered_package_leaves_nothing_mounted(
    testbed: RunningTestbed, attestd: Attestd, packages: Packages, tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(packages.sealed, bad)
    sealed = bad / "model.sealed"
    data = bytearray(sealed.read_bytes())
    data[-100] ^= 0x01  # inside the last chunk's ciphertext
    sealed.write_bytes(bytes(data))
    with workdir() as work, loader(testbed, attestd, work, bad) as run:
        assert_failed(run, Reason.CHUNK_INTEGRITY)
        assert_wiped(run)
        assert not any(m.get("READY") for m in run.notify.snapshot())


def test_kill_mid_unseal_then_restart_cleans_the_stale_mount(
    testbed: RunningTestbed, attestd: Attestd, packages: Packages
) -> None:
    testbed.cli("fault", "keyvault", "--latency", "8")
    with workdir() as work:
        with loader(testbed, attestd, work, packages.sealed, name="first") as first:
            wait_for("the tmpfs", lambda: True if mounted(first.target) else None, 60)
            first.proc.send_signal(signal.SIGKILL)
            first.wait_exit()
        # What systemd finds after the kill: the mount, with whatever was written so far.
        assert [m.ours for m in mounted(first.target)] == [True]
        (first.target / "partial.bin").write_bytes(b"plaintext" * 1000)
        testbed.cli("fault", "--clear")
        second_run = loader(testbed, attestd, work, packages.sealed, name="second", wrap=UNIT_CAPS)
        with second_run as second:
            second.wait_ready()
            assert len(mounted(second.target)) == 1
            assert not (second.target / "partial.bin").exists()
            assert files_of(packages.model) == files_of(second.target)
            assert "still mounted" in second.log()
            second.proc.send_signal(signal.SIGTERM)
            assert second.wait_exit() == 0
            assert_wiped(second)


def test_a_foreign_mount_is_refused(
    testbed: RunningTestbed, attestd: Attestd, packages: Packages
) -> None:
    with workdir() as work:
        target = work / "run" / "m"
        target.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "other", str(target)], check=True)
        (target / "theirs").write_text("keep me")
        with loader(testbed, attestd, work, packages.sealed) as run:
            assert_failed(run, Reason.MODEL_DIR_BUSY)
        assert (target / "theirs").read_text() == "keep me"
        assert [m.source for m in mounted(target)] == ["other"]


def test_gpu_cc_off_wipes_and_exits_with_attestds_reason(
    testbed: RunningTestbed, packages: Packages
) -> None:
    try:
        with running(testbed.env) as daemon, workdir() as work:
            with loader(testbed, daemon, work, packages.sealed) as run:
                run.wait_ready()
                assert files_of(packages.model) == files_of(run.target)
                start = time.monotonic()
                testbed.cli("gpu", "cc-off")
                assert_failed(run, Reason.GPU_CC_OFF)
                print(f"cc-off to model wiped and loader gone: {time.monotonic() - start:.2f} s")
                assert_wiped(run)
                assert "confidential computing is off" in run.log()
    finally:
        testbed.cli("gpu", "cc-on")


def test_a_revocation_interrupts_the_key_release(
    testbed: RunningTestbed, packages: Packages
) -> None:
    testbed.cli("fault", "keyvault", "--latency", "20")
    try:
        with running(testbed.env) as daemon, workdir() as work:
            with loader(testbed, daemon, work, packages.sealed) as run:
                wait_for(
                    "the key release",
                    lambda: "unsealing: releasing the key" in run.statuses() or None,
                    60,
                )
                start = time.monotonic()
                testbed.cli("gpu", "cc-off")
                assert_failed(run, Reason.GPU_CC_OFF)
                assert time.monotonic() - start < 15  # not after the slow release
                assert_wiped(run)
    finally:
        testbed.cli("gpu", "cc-on")


def test_a_refused_release_never_mounts_the_tmpfs(
    testbed: RunningTestbed, attestd: Attestd, packages: Packages
) -> None:
    testbed.cli("fault", "kv-release", "--status", "403")
    with workdir() as work, loader(testbed, attestd, work, packages.sealed) as run:
        assert_failed(run, Reason.RELEASE_REFUSED)
        assert "tmpfs mounted" not in run.log()
        assert not any(s.startswith("unsealing: key released") for s in run.statuses())
        assert_wiped(run)


def test_attestd_gone_past_the_grace_wipes(testbed: RunningTestbed, packages: Packages) -> None:
    with workdir() as work, running(testbed.env) as daemon:
        grace = loader(testbed, daemon, work, packages.sealed, CONFINFER_LOADER_ATTESTD_GRACE_S="2")
        with grace as run:
            run.wait_ready()
            daemon.stop()
            assert_failed(run, Reason.ATTESTD_UNAVAILABLE)
            assert "loader_attestd_grace_s = 2" in run.log()
            assert_wiped(run)


def test_no_attestd_gives_up_after_the_wait(testbed: RunningTestbed, packages: Packages) -> None:
    with workdir() as work:
        with loader(
            testbed, None, work, packages.sealed, CONFINFER_LOADER_ATTESTD_WAIT_S="2"
        ) as run:
            assert_failed(run, Reason.ATTESTD_UNAVAILABLE)
            assert "not healthy after 2 s" in run.log()
            assert "waiting for attestd: attestd at" in " ".join(run.statuses())
            assert mounted(run.target) == []
