"""Boot to serving: the whole chain under real systemd, in one machine, with the real programs.

On the host: the testbed (MAA, Key Vault, IMDS stand-ins over TLS, swtpm as the vTPM, the fake
NVML GPU and the stand-in nvattest) and the sealed packages (the vLLM test image's tiny model,
sealed with the testbed's KEK; a tampered copy; a large one for the kill test). In the machine:
the units of systemd/ as shipped, with the checkout's venv at /opt/confinfer/bin, Caddy through
caddy-run, the rootfs's own Docker engine with the vLLM CPU test image, and the real engine.

The drop-ins relax only what the test layout needs, each line says why: the testbed's
environment, the venv's interpreter under /root (``ProtectHome=read-only``), the testbed under the
host's /tmp (attestd's ``PrivateTmp=no``), shorter ``RestartSec=`` and GPU check interval.

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

import http.client
import json
import os
import re
import secrets
import shutil
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench import boot as boot_bench
from bench.boot import Record
from testbed.env import read_env_file
from tests.cli import run_confinfer
from tests.integration.conftest import RunningTestbed, run_cli, start_testbed
from tests.system.conftest import MachineFactory
from tests.system.machine import Bind, Machine, project_binds
from tests.system.vllm_engine import ENGINE_ARGS, free_port, load_image, report, seed_data_root
from tests.system.vllm_engine import tiny_model as tiny_model  # the fixtures
from tests.system.vllm_engine import vllm_image as vllm_image
from tests.system.vllm_image import Image

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
UNITS = ("attestd.service", "model-loader.service", "vllm.service", "caddy.service")
TARGET = "confinfer.target"
TESTBED_ENV = "/etc/confinfer/testbed.env"
MODEL = "/run/confinfer/model"
CONTAINER = "confinfer-vllm"
SERVE_TIMEOUT_S = 420.0
PADDING_BYTES = 384 << 20  # the kill test's package: long enough a decrypt to stop it in


def environment_file(values: dict[str, str]) -> str:
    """``KEY="value"`` lines as systemd's EnvironmentFile= reads them."""
    lines = []
    for key, value in values.items():
        if "\n" in value or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"cannot write {key}={value!r} as an environment file line")
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'{key}="{escaped}"')
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Packages:
    sealed: Path
    tampered: Path
    large: Path


@dataclass(frozen=True)
class Appliance:
    machine: Machine
    testbed: RunningTestbed
    packages: Packages
    https_port: int
    engine_port: int
    api_key: str

    def https(
        self, path: str, body: dict[str, Any] | None = None, *, key: str | None = None
    ) -> tuple[int, Any]:
        ca = self.machine.path("/var/lib/caddy/pki/authorities/local/root.crt")
        context = ssl.create_default_context(cafile=str(ca))
        conn = http.client.HTTPSConnection(
            "localhost", self.https_port, context=context, timeout=60
        )
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request("POST" if body is not None else "GET", path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            try:
                return resp.status, json.loads(raw)
            except ValueError:
                return resp.status, raw.decode(errors="replace")
        finally:
            conn.close()

    def chat(self, key: str | None) -> tuple[int, Any]:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hello there"}],
            "max_tokens": 8,
            "temperature": 0,
        }
        return self.https("/v1/chat/completions", body, key=key)

    def first_token(self) -> float:
        """A streamed chat completion through Caddy: the moment its first content arrived."""
        ca = self.machine.path("/var/lib/caddy/pki/authorities/local/root.crt")
        context = ssl.create_default_context(cafile=str(ca))
        conn = http.client.HTTPSConnection(
            "localhost", self.https_port, context=context, timeout=60
        )
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hello there"}],
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
        }
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"}
        try:
            conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()[:2000]
            for _ in range(200):
                line = resp.readline()
                if not line:
                    break
                if not line.startswith(b"data: {"):
                    continue
                delta = json.loads(line[6:])["choices"][0].get("delta", {})
                if delta.get("content"):
                    return time.monotonic()
            raise AssertionError("the stream ended without a content chunk")
        finally:
            conn.close()

    def journal_json(self) -> list[str]:
        return self.machine.run(
            ["journalctl", "-b", "-o", "json", "--no-pager"]
        ).stdout.splitlines()

    def status(self) -> str:
        text = self.machine.systemctl(
            "status", "--no-pager", "-l", "-n", "20", *UNITS, check=False
        ).stdout
        return text + "\n--- journal ---\n" + self.machine.journal(lines=120)

    def mounted(self) -> bool:
        proc = self.machine.run(["findmnt", "-n", "-o", "SOURCE", MODEL], check=False)
        return proc.stdout.strip() == "confinfer-model"

    def container_exists(self) -> bool:
        proc = self.machine.run(
            ["docker", "ps", "-a", "-q", "--filter", f"name=^{CONTAINER}$"], check=False
        )
        return bool(proc.stdout.strip())

    def wait(self, unit: str, prop: str, value: str, timeout: float) -> None:
        try:
            self.machine.wait_for_property(unit, prop, value, timeout)
        except Exception as exc:
            raise AssertionError(f"{exc}\n{self.status()}") from None


# --- the host's side --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningTestbed]:
    directory = tmp_path_factory.mktemp("testbed")
    try:
        yield start_testbed(directory)
    finally:
        run_cli("down", "--dir", str(directory), check=False)


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


@pytest.fixture(scope="module")
def packages(
    testbed: RunningTestbed, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Packages:
    base = tmp_path_factory.mktemp("packages")
    base.chmod(0o755)
    sealed = seal(testbed, tiny_model, base / "sealed")
    tampered = base / "tampered"
    shutil.copytree(sealed, tampered)
    victim = max((p for p in tampered.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    padded = base / "padded-model"
    shutil.copytree(tiny_model, padded)
    with (padded / "padding.bin").open("wb") as out:
        for _ in range(PADDING_BYTES >> 20):
            out.write(secrets.token_bytes(1 << 20))
    large = seal(testbed, padded, base / "large")
    shutil.rmtree(padded)
    return Packages(sealed, tampered, large)


# --- the machine ------------------------------------------------------------------------------


def drop_ins(repo: Path, testbed_dir: Path, home_bound: bool) -> dict[str, str]:
    home = ["# The venv's interpreter lives under /root: readable, not writable."]
    home += ["ProtectHome=read-only"] if home_bound else []
    return {
        "attestd.service": "\n".join(
            [
                "[Service]",
                "# The testbed's URLs, TCTI, fake NVML and stand-in nvattest.",
                f"EnvironmentFile={TESTBED_ENV}",
                "# Notice CC off within a second.",
                "Environment=CONFINFER_GPU_FAST_CHECK_S=0.5",
                "# The testbed lives under the host's /tmp, bound in: a private /tmp hides it.",
                "PrivateTmp=no",
                "# The fake GPU keeps its ready state in a file there; nvattest logs there.",
                f"ReadWritePaths={testbed_dir}",
                "LimitCORE=0",
                *home,
            ]
        ),
        "model-loader.service": "\n".join(
            [
                "[Service]",
                "# The testbed's Key Vault, MAA, IMDS and TCTI.",
                f"EnvironmentFile={TESTBED_ENV}",
                "# Seconds, not the production 30 s, before a restart.",
                "RestartSec=2",
            ]
        ),
        "vllm.service": "\n".join(
            [
                "[Service]",
                *home,
                *(
                    [
                        "# The checkout (its venv) is bound in under the host's /tmp: a private",
                        "# /tmp would hide the supervisor's executable.",
                        "PrivateTmp=no",
                    ]
                    if repo.parts[1:2] == ("tmp",)
                    else []
                ),
            ]
        ),
    }


def confinfer_toml(image: Image, source: Path, engine_port: int) -> str:
    return (
        "\n".join(
            [
                f'model_source = "{source}"',
                f'serving_image = "{image.name}"',
                f"serving_port = {engine_port}",
                'serving_model_name = "tiny"',
                "serving_gpus = false",
                f"serving_args = {json.dumps(list(ENGINE_ARGS))}",
                "serving_ready_timeout_s = 360",
            ]
        )
        + "\n"
    )


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
    binds = [
        *project_binds(repo),
        Bind(testbed.dir, read_only=False),
        Bind(packages.sealed.parent),
        Bind(data_root, Path("/var/lib/docker"), read_only=False),
    ]
    machine = machine_factory("serving", binds=binds)
    machine.systemctl("start", "docker.service", timeout=120)
    report(f"vllm image {load_image(machine, vllm_image, data_root)}")

    engine_port, https_port = free_port(), free_port()
    api_key = secrets.token_urlsafe(32)
    for unit in (*UNITS, TARGET, "attestd.service.d/50-socket-group.conf"):
        machine.write_file(f"/etc/systemd/system/{unit}", (repo / "systemd" / unit).read_text())
    for name in ("attestd", "model-loader", "vllm-supervisor"):
        machine.run(["mkdir", "-p", "/opt/confinfer/bin"])
        machine.run(["ln", "-sf", str(repo / ".venv" / "bin" / name), f"/opt/confinfer/bin/{name}"])
    caddy = repo / "images" / "caddy"
    machine.write_file("/opt/confinfer/bin/caddy-run", (caddy / "caddy-run").read_text(), 0o755)
    machine.write_file("/opt/confinfer/caddy/Caddyfile", (caddy / "Caddyfile").read_text())
    machine.write_file("/etc/confinfer/api-key", api_key + "\n", 0o600)
    machine.write_file(
        "/etc/confinfer/caddy.env",
        environment_file(
            {
                "CONFINFER_DOMAIN": "localhost",
                "CONFINFER_CADDY_TLS": "internal",
                "CONFINFER_CADDY_BIND": "127.0.0.1",
                "CONFINFER_HTTPS_PORT": str(https_port),
                "CONFINFER_HTTP_PORT": str(free_port()),
                "CONFINFER_SERVING_PORT": str(engine_port),
            }
        ),
    )
    machine.write_file(TESTBED_ENV, environment_file(read_env_file(testbed.dir / "testbed.env")))
    machine.write_file(
        "/etc/confinfer/confinfer.toml", confinfer_toml(vllm_image, packages.sealed, engine_port)
    )
    home_bound = any(b.source.parts[1:2] in (("root",), ("home",)) for b in binds)
    for unit, text in drop_ins(repo, testbed.dir, home_bound).items():
        machine.write_file(f"/etc/systemd/system/{unit}.d/60-test.conf", text + "\n")
    machine.daemon_reload()
    yield Appliance(machine, testbed, packages, https_port, engine_port, api_key)
    machine.systemctl("stop", TARGET, check=False, timeout=120)
    testbed.cli("fault", "--clear", check=False)
    testbed.cli("gpu", "cc-on", check=False)


def use_package(app: Appliance, source: Path, image: Image) -> None:
    app.machine.write_file(
        "/etc/confinfer/confinfer.toml", confinfer_toml(image, source, app.engine_port)
    )


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
        app.machine.systemctl("stop", TARGET, timeout=120)
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
        app.machine.systemctl("stop", TARGET, timeout=120)
        app.machine.systemctl("reset-failed", check=False)
