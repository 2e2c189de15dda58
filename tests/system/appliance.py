"""The appliance in one nspawn machine, as the boot-to-serving system test and the demo run it.

On the host: the testbed (MAA, Key Vault, IMDS stand-ins over TLS, swtpm as the vTPM, the fake
NVML GPU and the stand-in nvattest) and the sealed packages (the vLLM test image's tiny model,
sealed with the testbed's KEK). In the machine: the units of systemd/ as shipped, with the
checkout's venv at /opt/confinfer/bin, Caddy through caddy-run, the rootfs's own Docker engine
with the vLLM CPU test image, and the real engine.

The drop-ins relax only what the test layout needs, each line says why: the testbed's
environment, the venv's interpreter under /root (``ProtectHome=read-only``), the testbed under the
host's /tmp (attestd's ``PrivateTmp=no``), shorter ``RestartSec=`` and GPU check interval.
"""

from __future__ import annotations

import http.client
import json
import re
import secrets
import shutil
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.env import read_env_file
from tests.cli import run_confinfer
from tests.integration.conftest import RunningTestbed
from tests.system.machine import Bind, Machine, project_binds
from tests.system.vllm_engine import ENGINE_ARGS, free_port, load_image
from tests.system.vllm_image import Image

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


def make_packages(
    testbed: RunningTestbed, model: Path, base: Path, *, extras: bool = True
) -> Packages:
    """The model sealed with the testbed's KEK under ``base``; with ``extras`` also a tampered
    copy and a large one (the kill test's, ~390 MiB)."""
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    sealed = seal(testbed, model, base / "sealed")
    if not extras:
        return Packages(sealed, sealed, sealed)
    tampered = base / "tampered"
    shutil.copytree(sealed, tampered)
    victim = max((p for p in tampered.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    padded = base / "padded-model"
    shutil.copytree(model, padded)
    with (padded / "padding.bin").open("wb") as out:
        for _ in range(PADDING_BYTES >> 20):
            out.write(secrets.token_bytes(1 << 20))
    large = seal(testbed, padded, base / "large")
    shutil.rmtree(padded)
    return Packages(sealed, tampered, large)


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


def binds(repo: Path, testbed: RunningTestbed, packages: Packages, data_root: Path) -> list[Bind]:
    """What the appliance's machine needs of the host: the checkout and its venv, the testbed
    (read-write: the fake GPU's state), the packages, the Docker data root."""
    return [
        *project_binds(repo),
        Bind(testbed.dir, read_only=False),
        Bind(packages.sealed.parent),
        Bind(data_root, Path("/var/lib/docker"), read_only=False),
    ]


def boot_docker(machine: Machine, vllm_image: Image, data_root: Path) -> str:
    """dockerd started in ``machine`` with the vLLM test image loaded; says how it got there."""
    machine.systemctl("start", "docker.service", timeout=120)
    return load_image(machine, vllm_image, data_root)


def install(
    machine: Machine,
    repo: Path,
    testbed: RunningTestbed,
    packages: Packages,
    vllm_image: Image,
    binds: Sequence[Bind],
) -> Appliance:
    """The units of systemd/ as shipped, the checkout's programs at /opt/confinfer/bin, Caddy's
    files, the API key, the configuration and the test's drop-ins, in a booted ``machine``."""

    engine_port, https_port = free_port(), free_port()
    api_key = secrets.token_urlsafe(32)
    for unit in (*UNITS, TARGET, "attestd.service.d/50-socket-group.conf"):
        machine.write_file(f"/etc/systemd/system/{unit}", (repo / "systemd" / unit).read_text())
    for name in ("attestd", "model-loader", "vllm-supervisor", "confinfer"):
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
    return Appliance(machine, testbed, packages, https_port, engine_port, api_key)


def use_package(app: Appliance, source: Path, image: Image) -> None:
    app.machine.write_file(
        "/etc/confinfer/confinfer.toml", confinfer_toml(image, source, app.engine_port)
    )
