"""Hands-off boot from the user data: cloud-init with a NoCloud seed, onboarding with its real
reboots, then the appliance serving a chat completion through Caddy.

The machine boots the stock test rootfs (docker.io, caddy, python3-venv, cloud-init; nothing of
confinfer). Its seed is the user data ``confinfer deploy`` renders (``deploy.user_data``) from a
deploy.toml whose ``[bootstrap]`` names a wheelhouse built here by cloud-init/build-wheelhouse
(bound in read-only at /srv/confinfer, pinned by its SHA-256), and whose ``[appliance]`` sets
``onboard_hardware = "testbed"``: the one switch that puts the strict stand-ins of
testbed/onboard.py where apt, the driver and nvidia-smi would act. Everything else is real:
cloud-init's modules (apt's packages from the mirror, write_files, runcmd), the bootstrap (digest
check, pip ``--no-index --require-hashes`` into /opt/confinfer, ``confinfer install-units``),
``confinfer-onboard.service`` and its two ``systemctl reboot``s (nspawn exits 133 and the test
boots the same overlay again, with a new boot id), then the units of the wheel.

What the seed adds beside the user data is what Azure's side would be: the testbed's endpoints
and fake GPU for attestd and the loader (the drop-ins of tests/system/appliance.py), and
cloud-init's datasource and networking off (the machine shares the host's network). Caddy's
environment and the API key come from the user data (``[caddy]``, ``tls = "internal"``).

Checked: cloud-init is done without errors and ran the bootstrap once; every stage applied once
and in order, the reboots where the stages asked, none twice (the stand-ins' log); onboarding's
STATUS= and ``confinfer onboard status``; a chat completion over TLS with the key (401 without);
then one more reboot: onboarding does nothing, the appliance serves again.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from confinfer import deploy
from testbed.env import read_env_file
from tests.integration.conftest import RunningTestbed, run_cli, start_testbed
from tests.system import rootfs as rootfs_builder
from tests.system.appliance import (
    TESTBED_ENV,
    Appliance,
    Packages,
    boot_docker,
    drop_ins,
    environment_file,
    make_packages,
)
from tests.system.conftest import MachineFactory
from tests.system.machine import Bind, Machine, MachineError, project_binds
from tests.system.vllm_engine import (
    ENGINE_ARGS,
    free_port,
    report,
    seed_data_root,
)
from tests.system.vllm_engine import tiny_model as tiny_model  # the fixtures
from tests.system.vllm_engine import vllm_image as vllm_image
from tests.system.vllm_image import Image

pytestmark = [pytest.mark.system, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
WHEELHOUSE_DIR = "/srv/confinfer"
STAND_IN_LOG = "/var/lib/confinfer/testbed/log.jsonl"
REBOOT_STAGES = ("kernel", "driver")
STAGES = ("kernel", "driver", "cc-mode", "gpu-tools", "container-toolkit", "appliance")
HANDS_OFF_TIMEOUT_S = 1200.0
BUILD_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class Wheelhouse:
    directory: Path
    sha256: str


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Wheelhouse:
    """The appliance's wheelhouse, built with the interpreter the rootfs runs (Debian 12's
    python3 on this Debian 12 host); pip's own cache keeps the dependencies' wheels."""
    out = tmp_path_factory.mktemp("wheelhouse")
    out.chmod(0o755)
    host = subprocess.run(
        ["/usr/bin/python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    env = dict(os.environ, PIP_CACHE_DIR=str(rootfs_builder.cache_dir() / "pip"))
    started = time.monotonic()
    proc = subprocess.run(
        [str(REPO / "cloud-init" / "build-wheelhouse"), str(out), "/usr/bin/python3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    digest, path = proc.stdout.strip().splitlines()[-1].split()
    assert Path(path) == out / "wheelhouse.tar.gz"
    report(f"wheelhouse for python {host} built in {time.monotonic() - started:.1f} s")
    return Wheelhouse(out, digest)


@pytest.fixture(scope="module")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningTestbed]:
    directory = tmp_path_factory.mktemp("testbed")
    try:
        yield start_testbed(directory)
    finally:
        run_cli("down", "--dir", str(directory), check=False)


@pytest.fixture(scope="module")
def packages(
    testbed: RunningTestbed, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Packages:
    return make_packages(testbed, tiny_model, tmp_path_factory.mktemp("packages"), extras=False)


def deploy_toml(
    path: Path, image: Image, packages: Packages, ports: tuple[int, int, int], sha: str
) -> Path:
    engine_port, https_port, http_port = ports
    appliance = {
        "model_source": str(packages.sealed),
        "serving_image": image.name,
        "serving_port": engine_port,
        "serving_model_name": "tiny",
        "serving_gpus": False,
        "serving_args": list(ENGINE_ARGS),
        "serving_ready_timeout_s": 360,
        "onboard_hardware": "testbed",
    }
    key = path.parent / "id.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE4k test\n")
    lines = [
        "[azure]",
        'resource_group = "confinfer-test"',
        'location = "eastus2"',
        'name_prefix = "cinf"',
        'vault_name = "cinf-kv-test"',
        f"ssh_public_key = {json.dumps(str(key))}",
        "",
        "[appliance]",
        *(f"{k} = {json.dumps(v)}" for k, v in appliance.items()),
        "",
        "[bootstrap]",
        f'wheelhouse_url = "file://{WHEELHOUSE_DIR}/wheelhouse.tar.gz"',
        f'wheelhouse_sha256 = "{sha}"',
        "",
        "# Caddy's own CA on loopback ports: the test machine shares the host's network.",
        "[caddy]",
        'tls = "internal"',
        'domain = "localhost"',
        'bind = "127.0.0.1"',
        f"https_port = {https_port}",
        f"http_port = {http_port}",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def seed_files(
    user_data: str, testbed: RunningTestbed, home_bound: bool
) -> dict[str, str | bytes | None]:
    files: dict[str, str | bytes | None] = {
        "/var/lib/cloud/seed/nocloud/user-data": user_data,
        "/var/lib/cloud/seed/nocloud/meta-data": (
            f"instance-id: iid-confinfer-{secrets.token_hex(4)}\nlocal-hostname: confinfer-test\n"
        ),
        # The test machine's, never Azure's: NoCloud, and no network configuration (the
        # machine shares the host's network namespace).
        "/etc/cloud/cloud.cfg.d/99-confinfer-test.cfg": (
            "datasource_list: [ NoCloud, None ]\n"
            "network: {config: disabled}\n"
            "locale: C.UTF-8\n"
            "ssh_genkeytypes: []\n"
        ),
        TESTBED_ENV: environment_file(read_env_file(testbed.dir / "testbed.env")),
    }
    for unit, text in drop_ins(Path("/opt/confinfer"), testbed.dir, home_bound).items():
        files[f"/etc/systemd/system/{unit}.d/60-test.conf"] = text + "\n"
    return files


def stand_in_log(machine: Machine) -> list[dict[str, object]]:
    text = machine.run(["cat", STAND_IN_LOG], check=False).stdout
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def until_serving(machine: Machine, timeout: float) -> list[str]:
    """Follow the machine through the reboots onboarding asks for until vllm.service is
    active; returns what onboarding's STATUS= said along the way."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        if not machine.running:
            took = machine.await_reboot(60)
            report(f"cloud-init machine rebooted ({machine.reboots}) in {took:.1f} s")
            continue
        try:
            props = machine.unit_properties("confinfer-onboard.service", "StatusText")
            vllm = machine.unit_property("vllm.service", "ActiveState")
            onboard = machine.unit_property("confinfer-onboard.service", "ActiveState")
        except (MachineError, subprocess.SubprocessError, OSError):
            time.sleep(0.5)  # going down for a reboot
            continue
        text = props.get("StatusText", "")
        if text and (not seen or seen[-1] != text):
            seen.append(text)
        if onboard == "failed":
            raise AssertionError(
                "onboarding failed:\n"
                + machine.journal("confinfer-onboard.service")[-4000:]
                + machine.run(["cat", "/var/log/cloud-init-output.log"], check=False).stdout[-4000:]
            )
        if vllm == "active":
            return seen
        time.sleep(1.0)
    raise AssertionError(
        f"not serving {timeout:g} s after boot; onboarding said {seen}\n"
        + machine.run(["cat", "/var/log/cloud-init-output.log"], check=False).stdout[-4000:]
        + machine.journal(lines=80)
    )


def test_the_user_data_boots_hands_off_to_serving(
    machine_factory: MachineFactory,
    testbed: RunningTestbed,
    packages: Packages,
    vllm_image: Image,
    wheelhouse: Wheelhouse,
    tmp_path: Path,
) -> None:
    engine_port, https_port = free_port(), free_port()
    ports = (engine_port, https_port, free_port())
    api_key = secrets.token_urlsafe(32)
    plan = deploy.load_plan(
        deploy_toml(tmp_path / "deploy.toml", vllm_image, packages, ports, wheelhouse.sha256)
    )
    user_data = deploy.user_data(plan, api_key=api_key)
    assert len(user_data.encode()) <= deploy.CUSTOM_DATA_LIMIT
    data_root = tmp_path / "docker-data"
    data_root.mkdir()
    if not seed_data_root(vllm_image, data_root):
        # Imported in a machine of its own (and cached): cloud-init's package step may restart
        # the engine of the machine under test while an import streams.
        with machine_factory(
            "dockerprep", binds=[Bind(data_root, Path("/var/lib/docker"), read_only=False)]
        ) as prep:
            report(f"vllm image {boot_docker(prep, vllm_image, data_root)}")
    binds = [
        # The testbed's stand-in executables (nvattest, the legacy verifier) run on the
        # checkout's interpreter: the hardware's side, never the appliance, which runs from
        # /opt/confinfer as the wheelhouse installed it.
        *project_binds(REPO),
        Bind(wheelhouse.directory, Path(WHEELHOUSE_DIR)),
        Bind(testbed.dir, read_only=False),
        Bind(packages.sealed.parent),
        Bind(data_root, Path("/var/lib/docker"), read_only=False),
    ]
    home_bound = any(b.source.parts[1:2] in (("root",), ("home",)) for b in binds)
    started = time.monotonic()
    machine = machine_factory(
        "cloudinit",
        binds=binds,
        files=seed_files(user_data, testbed, home_bound),
        settle=False,
    )
    statuses = until_serving(machine, HANDS_OFF_TIMEOUT_S)
    report(f"user data to serving in {time.monotonic() - started:.1f} s, {machine.reboots} reboots")

    # cloud-init: done, no errors, the bootstrap ran once (runcmd is per instance).
    status = machine.run(["cloud-init", "status", "--long"], check=False).stdout
    assert "status: done" in status, status
    schema = machine.run(["cloud-init", "schema", "--system"], check=False)
    assert schema.returncode == 0, schema.stdout + schema.stderr
    output = machine.run(["cat", "/var/log/cloud-init-output.log"], check=False).stdout
    assert output.count("confinfer-bootstrap: installed;") == 1, output[-3000:]
    assert "refused" not in output

    # Onboarding: each stage applied once, in order, the reboots where they belong.
    assert machine.reboots == len(REBOOT_STAGES)
    log = stand_in_log(machine)
    assert not [e for e in log if e.get("violation")], log
    applied = [e["stage"] for e in log if e["op"] == "apply"]
    assert applied == [s for s in STAGES if s not in ("cc-mode", "appliance")], log
    boots = {e["boot_id"] for e in log}
    assert len(boots) == 1 + len(REBOOT_STAGES), log
    # STATUS= as it stays once onboarding is through (sampled: earlier lines may be missed)
    assert statuses[-1].startswith("onboarding done: 6/6 stages"), statuses
    onboard_status = ["/opt/confinfer/bin/confinfer", "onboard", "status", "--format", "json"]
    state = json.loads(machine.run(onboard_status).stdout)
    assert [(s["name"], s["status"]) for s in state["stages"]] == [(s, "done") for s in STAGES]

    # Serving, through Caddy, with the key.
    app = Appliance(machine, testbed, packages, https_port, engine_port, api_key)
    code, answer = app.chat(api_key)
    assert code == 200, answer
    assert answer["object"] == "chat.completion"
    assert app.chat(None)[0] == 401
    text = machine.unit_property("model-loader.service", "StatusText")
    assert text.startswith("model ready: "), text

    # One more reboot: onboarding finds everything done and applies nothing; serving returns.
    before = len(stand_in_log(machine))
    machine.run(["systemctl", "reboot", "--no-block"])
    machine.await_reboot(60)
    until_serving(machine, 600)
    assert [e for e in stand_in_log(machine)[before:] if e["op"] == "apply"] == []
    assert app.chat(api_key)[0] == 200
    onboard = machine.unit_property("confinfer-onboard.service", "StatusText")
    report(f"after a further reboot: onboarding says {onboard!r}")
