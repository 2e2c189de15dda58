"""cloud-init/bootstrap.sh and cloud-init/build-wheelhouse, run for real under a scratch root
(``CONFINFER_BOOTSTRAP_ROOT``) with a recording ``systemctl`` on PATH: the wheelhouse is refused
unless its SHA-256 is the pinned one, pip installs only what its lock pins, and the real wheel
carries the units and Caddy's files, which ``confinfer install-units`` puts in place."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
BOOTSTRAP = ROOT / "cloud-init" / "bootstrap.sh"
BUILD = ROOT / "cloud-init" / "build-wheelhouse"
SYSTEMCTL = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_SYSTEMCTL_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
"""
FAKE_MODULE = """import json, os, sys
def main():
    with open(os.environ["FAKE_CONFINFER_LOG"], "a") as log:
        log.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def fake_wheel(directory: Path) -> Path:
    """A tiny wheel named confinfer whose ``confinfer`` command records its arguments."""
    files = {
        "fake_confinfer.py": FAKE_MODULE.encode(),
        "confinfer-0.1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: confinfer\n"
        b"Version: 0.1.0\n",
        "confinfer-0.1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n",
        "confinfer-0.1.0.dist-info/entry_points.txt": b"[console_scripts]\n"
        b"confinfer = fake_confinfer:main\n",
    }
    record = [record_line(n, d) for n, d in files.items()]
    record.append("confinfer-0.1.0.dist-info/RECORD,,")
    files["confinfer-0.1.0.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    path = directory / "confinfer-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
    return path


def wheelhouse(directory: Path, *, lock: str | None = None) -> tuple[Path, str]:
    wheel = fake_wheel(directory)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    lock = lock if lock is not None else f"confinfer==0.1.0 --hash=sha256:{digest}\n"
    archive = directory / "wheelhouse.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(wheel, arcname=wheel.name)
        info = tarfile.TarInfo("requirements.lock")
        info.size = len(lock.encode())
        tar.addfile(info, io.BytesIO(lock.encode()))
    return archive, hashlib.sha256(archive.read_bytes()).hexdigest()


class Scratch:
    def __init__(self, tmp: Path) -> None:
        self.root = tmp / "root"
        self.root.mkdir()
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        (bin_dir / "systemctl").write_text(SYSTEMCTL)
        (bin_dir / "systemctl").chmod(0o755)
        self.systemctl_log = tmp / "systemctl.log"
        self.confinfer_log = tmp / "confinfer.log"
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "CONFINFER_BOOTSTRAP_ROOT": str(self.root),
            "FAKE_SYSTEMCTL_LOG": str(self.systemctl_log),
            "FAKE_CONFINFER_LOG": str(self.confinfer_log),
            "TMPDIR": str(tmp),
        }

    def bootstrap(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", str(BOOTSTRAP), *args],
            capture_output=True, text=True, timeout=300, check=False, env=self.env,
        )  # fmt: skip

    def calls(self, log: Path) -> list[list[str]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def scratch(tmp_path: Path) -> Scratch:
    return Scratch(tmp_path)


@pytest.mark.parametrize("form", ["file-url", "path"])
def test_a_pinned_wheelhouse_is_installed_and_onboarding_started(
    scratch: Scratch, tmp_path: Path, form: str
) -> None:
    archive, digest = wheelhouse(tmp_path)
    url = f"file://{archive}" if form == "file-url" else str(archive)
    done = scratch.bootstrap("--wheelhouse", url, "--sha256", digest)
    assert done.returncode == 0, done.stderr
    assert (scratch.root / "opt/confinfer/bin/confinfer").is_file()
    assert scratch.calls(scratch.confinfer_log) == [["install-units", "--root", str(scratch.root)]]
    assert scratch.calls(scratch.systemctl_log) == [
        ["disable", "--now", "caddy.service"],  # Debian's, before ours is installed
        ["daemon-reload"],
        ["enable", "confinfer-onboard.service"],
        ["start", "--no-block", "confinfer-onboard.service"],
    ]
    # Again (a repair): ours is installed by now, so Caddy is left alone.
    (scratch.root / "etc/systemd/system").mkdir(parents=True)
    (scratch.root / "etc/systemd/system/caddy.service").write_text("[Unit]\n")
    assert scratch.bootstrap("--wheelhouse", url, "--sha256", digest).returncode == 0
    assert scratch.calls(scratch.systemctl_log)[4:] == [
        ["daemon-reload"],
        ["enable", "confinfer-onboard.service"],
        ["start", "--no-block", "confinfer-onboard.service"],
    ]
    assert not list(tmp_path.glob("confinfer-bootstrap.*"))  # its scratch directory is gone


def test_a_wheelhouse_with_another_digest_installs_nothing(
    scratch: Scratch, tmp_path: Path
) -> None:
    archive, digest = wheelhouse(tmp_path)
    other = ("0" if digest[0] != "0" else "1") + digest[1:]
    done = scratch.bootstrap("--wheelhouse", f"file://{archive}", "--sha256", other)
    assert done.returncode == 1
    assert done.stderr.strip().endswith(
        f"the wheelhouse's SHA-256 is {digest}, not the pinned {other}: refused, nothing installed"
    )
    assert not (scratch.root / "opt").exists()
    assert scratch.calls(scratch.systemctl_log) == []


def test_a_wheel_the_lock_does_not_pin_is_refused_by_pip(scratch: Scratch, tmp_path: Path) -> None:
    archive, digest = wheelhouse(tmp_path, lock="confinfer==0.1.0 --hash=sha256:" + "0" * 64 + "\n")
    done = scratch.bootstrap("--wheelhouse", str(archive), "--sha256", digest)
    assert done.returncode == 1
    assert "pip could not install the wheelhouse" in done.stderr
    assert scratch.calls(scratch.systemctl_log) == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--wheelhouse", "/x.tar.gz"], "--sha256 must be 64 lower-case hexadecimal digits"),
        (["--wheelhouse", "/x.tar.gz", "--sha256", "AB" * 32], "--sha256 must be 64 lower-case"),
        (["--sha256", "ab" * 32], "--wheelhouse URL is required"),
        (["--wheelhouse", "x.tar.gz", "--sha256", "ab" * 32], "an https:// or file:// URL"),
        (["--wheelhouse", "http://h/x", "--sha256", "ab" * 32], "an https:// or file:// URL"),
        (["--wheelhouse", "/no/such/x.tar.gz", "--sha256", "ab" * 32], "cannot read"),
        (["--reboot"], "unknown argument"),
    ],
)
def test_bad_arguments_are_one_line(scratch: Scratch, args: list[str], needle: str) -> None:
    done = scratch.bootstrap(*args)
    assert done.returncode == 1
    assert needle in done.stderr.splitlines()[-1]
    assert done.stderr.splitlines()[-1].startswith("confinfer-bootstrap: ")


def test_a_query_in_the_url_is_never_printed(scratch: Scratch) -> None:
    done = scratch.bootstrap(
        "--wheelhouse", "https://127.0.0.1:9/wh.tar.gz?sig=SECRETSAS", "--sha256", "ab" * 32
    )
    assert done.returncode == 1
    assert "SECRETSAS" not in done.stdout + done.stderr
    assert "https://127.0.0.1:9/wh.tar.gz" in done.stderr


def test_the_real_wheelhouse_installs_the_appliance_and_its_units(
    scratch: Scratch, tmp_path: Path
) -> None:
    """build-wheelhouse here, bootstrap from it: the real confinfer, its real install-units."""
    out = tmp_path / "out"
    built = subprocess.run(
        [str(BUILD), str(out), sys.executable],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    archive = out / "wheelhouse.tar.gz"
    digest = built.stdout.split()[-2]
    assert digest == hashlib.sha256(archive.read_bytes()).hexdigest()
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        lock = tar.extractfile("./requirements.lock")
        assert lock is not None
        pinned = lock.read().decode().splitlines()
    wheels = [n for n in names if n.endswith(".whl")]
    assert len(pinned) == len(wheels) and all("--hash=sha256:" in line for line in pinned)
    [ours] = [n for n in wheels if Path(n).name.startswith("confinfer-")]
    with tarfile.open(archive) as tar:
        member = tar.extractfile(ours)
        assert member is not None
        with zipfile.ZipFile(io.BytesIO(member.read())) as wheel:
            data = [n for n in wheel.namelist() if ".data/data/share/confinfer/" in n]
            run = wheel.getinfo(next(n for n in data if n.endswith("/caddy/caddy-run")))
    assert any(n.endswith("/systemd/confinfer-onboard.service") for n in data)
    assert any(n.endswith("/systemd/attestd.service.d/50-socket-group.conf") for n in data)
    assert (run.external_attr >> 16) & 0o111  # executable in the wheel

    done = scratch.bootstrap("--wheelhouse", f"file://{archive}", "--sha256", digest)
    assert done.returncode == 0, done.stderr[-2000:]
    bin_dir = scratch.root / "opt/confinfer/bin"
    for program in ("attestd", "model-loader", "vllm-supervisor", "confinfer", "caddy-run"):
        assert (bin_dir / program).is_file(), program
    units = scratch.root / "etc/systemd/system"
    for unit in (ROOT / "systemd").rglob("*"):
        if unit.is_file():
            installed = units / unit.relative_to(ROOT / "systemd")
            assert installed.read_bytes() == unit.read_bytes(), installed
    caddyfile = scratch.root / "opt/confinfer/caddy/Caddyfile"
    assert caddyfile.read_bytes() == (ROOT / "images/caddy/Caddyfile").read_bytes()
    assert scratch.calls(scratch.systemctl_log)[-2:] == [
        ["enable", "confinfer-onboard.service"],
        ["start", "--no-block", "confinfer-onboard.service"],
    ]
