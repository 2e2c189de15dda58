"""Boot to serving: the whole chain under real systemd, in one machine, with the real programs.

On the host: the testbed (MAA, Key Vault, IMDS stand-ins over TLS, swtpm as the vTPM, the fake
NVML GPU and the stand-in nvattest) and the sealed packages (the vLLM test image's tiny model,
sealed with the testbed's KEK; a tampered copy; a large one for the kill test). In the machine:
the units of systemd/ as shipped, with the checkout's venv at /opt/confinfer/bin, Caddy through
caddy-run, the rootfs's own Docker engine with the vLLM CPU test image, and the real engine.

The machine's set-up is tests/system/appliance.py's, shared with the demo (scripts/demo).

In order (the module shares one machine, and each test leaves it as the next expects):

1. ``confinfer.target`` starts; a chat completion over TLS with the key, 401 without; every
   unit's ``StatusText`` says what it is doing;
2. attestd restarted (inside the loader's grace) keeps serving: same loader, same engine;
3. the GPU's CC mode off: attestd revokes, the loader wipes and exits, systemd stops vllm, the
   container is gone, the tmpfs unmounted, Caddy answers 503 with ``gpu-cc-off``; the time the
   revocation took is reported;
4. ``kill -9`` of the loader in the middle of a decrypt: no plaintext is left once systemd has
   restarted it;
5. a tampered package, and a release Key Vault refuses, never start vllm.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import boot as boot_bench
from bench.boot import Record
from tests.integration.conftest import RunningTestbed, run_cli, start_testbed
from tests.system.appliance import (
    MODEL,
    PADDING_BYTES,
    TARGET,
    UNITS,
    Appliance,
    Packages,
    binds,
    boot_docker,
    install,
    make_packages,
    use_package,
)
from tests.system.conftest import MachineFactory
from tests.system.vllm_engine import report, seed_data_root
from tests.system.vllm_engine import tiny_model as tiny_model  # the fixtures
from tests.system.vllm_engine import vllm_image as vllm_image
from tests.system.vllm_image import Image

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

SERVE_TIMEOUT_S = 420.0


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
    return make_packages(testbed, tiny_model, tmp_path_factory.mktemp("packages"))


@pytest.fixture(scope="module")
def appliance(
    machine_factory: MachineFactory,
    repo: Path,
    testbed: RunningTestbed,
    packages: Packages,
    vllm_image: Image,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Appliance]:
    data_root = tmp_path_factory.mktemp("docker-data")
    if seed_data_root(vllm_image, data_root):
        report("docker data root seeded from the cache")
    host = binds(repo, testbed, packages, data_root)
    machine = machine_factory("serving", binds=host)
    report(f"vllm image {boot_docker(machine, vllm_image, data_root)}")
    yield install(machine, repo, testbed, packages, vllm_image, host)
    machine.systemctl("stop", TARGET, *UNITS, check=False, timeout=120)
    testbed.cli("fault", "--clear", check=False)
    testbed.cli("gpu", "cc-on", check=False)


# --- 1. boot to serving -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def marks() -> dict[str, float]:
    """The moments the tests acted on (CLOCK_MONOTONIC, the journal's clock too): bench.boot
    reads them with the journal."""
    return {}


def bench_out(app: Appliance, marks: dict[str, float]) -> list[Record]:
    """The journal as records; written with the marks for ``python -m bench.boot`` when it
    runs this test."""
    lines = app.journal_json()
    where = os.environ.get(boot_bench.ENV_DIR)
    if where:
        (Path(where) / boot_bench.JOURNAL_FILE).write_text("\n".join(lines) + "\n")
        (Path(where) / boot_bench.MARKS_FILE).write_text(json.dumps(marks))
    return boot_bench.parse_journal(lines)


def test_serves_a_chat_completion_over_tls(appliance: Appliance, marks: dict[str, float]) -> None:
    app = appliance
    marks["start"] = time.monotonic()
    app.machine.systemctl("start", "--no-block", TARGET)
    app.wait("vllm.service", "ActiveState", "active", SERVE_TIMEOUT_S)
    report(f"confinfer.target to serving in {time.monotonic() - marks['start']:.1f} s")
    marks["first_token"] = app.first_token()
    stages = boot_bench.boot_stages(bench_out(app, marks), marks)
    report("boot stages: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    status, answer = app.chat(app.api_key)
    assert status == 200, answer
    assert answer["object"] == "chat.completion"
    assert answer["model"] == "tiny"
    assert 1 <= answer["usage"]["completion_tokens"] <= 8
    assert app.chat(None)[0] == 401
    assert app.chat("not-the-key")[0] == 401
    assert app.mounted()

    texts = {u: app.machine.unit_property(u, "StatusText") for u in UNITS}
    assert texts["attestd.service"].startswith("healthy (attestd-healthy): "), texts
    assert re.fullmatch(
        r"model ready: .+ in [0-9.]+ s \(/run/confinfer/model\)", texts["model-loader.service"]
    ), texts
    assert texts["vllm.service"].startswith(
        f"serving tiny on 127.0.0.1:{app.engine_port} (engine ready in "
    ), texts
    # Caddy sets no STATUS=; it is active and its journal names no error
    assert app.machine.unit_property("caddy.service", "ActiveState") == "active"
    status, health = app.https("/attestation/health")
    assert (status, health["state"]) == (200, "healthy")


# --- 2. attestd restarts inside the grace -----------------------------------------------------


def test_an_attestd_restart_keeps_serving(appliance: Appliance) -> None:
    app = appliance
    pids = {
        u: app.machine.unit_property(u, "MainPID") for u in ("model-loader.service", "vllm.service")
    }
    app.machine.systemctl("restart", "attestd.service", timeout=180)
    app.wait("attestd.service", "ActiveState", "active", 60)
    status, answer = app.chat(app.api_key)
    assert status == 200, answer
    after = {u: app.machine.unit_property(u, "MainPID") for u in pids}
    assert after == pids, app.status()
    assert app.mounted()


# --- 3. revocation ----------------------------------------------------------------------------


def test_cc_off_wipes_stops_the_engine_and_caddy_says_why(
    appliance: Appliance, marks: dict[str, float]
) -> None:
    app = appliance
    marks["cc_off"] = time.monotonic()
    app.testbed.cli("gpu", "cc-off")
    try:
        app.wait("vllm.service", "ActiveState", "inactive", 60)
        took = time.monotonic() - marks["cc_off"]
        app.machine.wait_for(lambda: not app.container_exists(), 30, what="the container gone")
        report(f"revocation: CC off to vllm stopped in {took:.2f} s")
        times = boot_bench.revocation(bench_out(app, marks), marks)
        report("revocation: " + ", ".join(f"{k} {v:.3f}" for k, v in times.items()))
        journal = app.machine.journal("vllm.service")
        assert "attestd revoked attestation (gpu-cc-off): " in journal, journal[-3000:]
        assert "serving container killed and removed" in journal, journal[-3000:]
        assert not app.mounted()
        ls = app.machine.run(["ls", "-A", MODEL], check=False).stdout.strip()
        assert ls == "", ls
        assert app.machine.run(["test", "-e", "/run/confinfer/model.json"], check=False).returncode
        status, body = app.https("/v1/chat/completions", {"model": "tiny"}, key=app.api_key)
        assert status == 503, body
        assert (body["state"], body["reason"]) == ("revoked", "gpu-cc-off"), body
        journal = app.machine.journal("model-loader.service")
        assert "model-loader: gpu-cc-off: attestd revoked attestation" in journal, journal[-3000:]
    finally:
        app.testbed.cli("gpu", "cc-on")
        app.machine.systemctl("stop", TARGET, *UNITS, timeout=120)
        app.machine.systemctl("reset-failed", check=False)


# --- 4. kill -9 mid-decrypt -------------------------------------------------------------------


def test_a_loader_killed_mid_decrypt_leaves_no_plaintext(
    appliance: Appliance, vllm_image: Image
) -> None:
    app = appliance
    use_package(app, app.packages.large, vllm_image)
    app.machine.systemctl("mask", "--runtime", "vllm.service")  # the engine is not under test
    try:
        app.machine.systemctl("start", "--no-block", "model-loader.service")
        app.machine.wait_for(app.mounted, 180, what="the tmpfs mounted", interval=0.05)

        def written() -> int:
            out = app.machine.run(["du", "-sb", MODEL], check=False).stdout.split()
            return int(out[0]) if out else 0

        # hold it once plaintext is flowing (8 MiB of the padded model's ~390 MiB)
        app.machine.wait_for(
            lambda: written() > 8 << 20, 120, what="a decrypt under way", interval=0.05
        )
        pid = app.machine.unit_property("model-loader.service", "MainPID")
        app.machine.run(["kill", "-STOP", pid])
        size = written()
        assert 8 << 20 < size < PADDING_BYTES, size  # part of the model, not all of it
        status = app.machine.unit_property("model-loader.service", "StatusText")
        app.machine.systemctl("kill", "-s", "KILL", "model-loader.service")
        app.wait("model-loader.service", "SubState", "auto-restart", 30)
        assert not app.mounted(), "plaintext left mounted after the kill"
        report(f"killed mid-decrypt at {size >> 20} MiB ({status!r})")
        app.wait("model-loader.service", "ActiveState", "active", 180)
        assert app.machine.unit_property("model-loader.service", "MainPID") != pid
        assert app.machine.unit_property("model-loader.service", "StatusText").startswith(
            "model ready: "
        )
    finally:
        app.machine.systemctl("stop", "model-loader.service", timeout=120)
        app.machine.systemctl("unmask", "--runtime", "vllm.service")
        use_package(app, app.packages.sealed, vllm_image)
        app.machine.systemctl("reset-failed", check=False)
    assert not app.mounted()


# --- 5. never vLLM without a model ------------------------------------------------------------


@pytest.mark.parametrize("case", ["tampered", "refused"])
def test_no_model_never_starts_the_engine(
    appliance: Appliance, vllm_image: Image, case: str
) -> None:
    app = appliance
    started = app.machine.journal("vllm.service").count("Started vllm.service")
    code = "65" if case == "tampered" else "77"
    exited = f"Main process exited, code=exited, status={code}/"
    before = app.machine.journal("model-loader.service")
    if case == "tampered":
        use_package(app, app.packages.tampered, vllm_image)
    else:
        app.testbed.cli("fault", "kv-release", "--status", "403")
    try:
        app.machine.systemctl("start", "--no-block", TARGET)
        app.machine.wait_for(
            lambda: (
                app.machine.journal("model-loader.service").count(exited) > before.count(exited)
            ),
            240,
            what=f"the loader to exit with status {code}",
        )
        time.sleep(5)  # past RestartSec=2
        props = app.machine.unit_properties(
            "model-loader.service", "ActiveState", "NRestarts", "ExecMainStatus"
        )
        journal = app.machine.journal("model-loader.service")[len(before) :]
        if case == "tampered":
            assert props["ActiveState"] == "failed", props
            assert (props["NRestarts"], props["ExecMainStatus"]) == ("0", "65"), props
        else:
            assert "release-refused" in journal, journal[-3000:]
            # the key first, then the tmpfs: a refused release never mounts it
            assert "tmpfs mounted" not in journal, journal[-3000:]
        assert app.machine.journal("vllm.service").count("Started vllm.service") == started
        assert app.machine.unit_property("vllm.service", "ActiveState") != "active"
        assert not app.container_exists()
        assert not app.mounted()
        status, body = app.https("/v1/models", key=app.api_key)
        assert status == 503, body
    finally:
        app.testbed.cli("fault", "--clear")
        use_package(app, app.packages.sealed, vllm_image)
        app.machine.systemctl("stop", TARGET, *UNITS, timeout=120)
        app.machine.systemctl("reset-failed", check=False)
