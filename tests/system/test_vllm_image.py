"""The vLLM test image serves for real: imported into the Docker engine of a systemd machine,
run hardened as the appliance runs it, it answers /health, a chat completion with the key,
and 401 without it."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.system.conftest import MachineFactory
from tests.system.machine import Bind, Machine
from tests.system.vllm_engine import (
    docker_run_argv,
    free_port,
    http,
    load_image,
    report,
    seed_data_root,
    wait_healthy,
)
from tests.system.vllm_engine import tiny_model as tiny_model  # the fixtures
from tests.system.vllm_engine import vllm_image as vllm_image
from tests.system.vllm_image import Image

pytestmark = [pytest.mark.system, pytest.mark.timeout(1800)]

HEALTH_TIMEOUT_S = 240
CONTAINER = "engine"
MODEL_IN_MACHINE = "/srv/model"


@dataclass(frozen=True)
class Engine:
    machine: Machine
    port: int
    api_key: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def running(self) -> bool:
        proc = self.machine.run(
            ["docker", "inspect", "--format={{.State.Running}}", CONTAINER], check=False
        )
        return proc.stdout.strip() == "true"


@pytest.fixture(scope="module")
def engine(
    machine_factory: MachineFactory,
    vllm_image: Image,
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Engine]:
    data_root = tmp_path_factory.mktemp("docker-data")
    started = time.monotonic()
    if seed_data_root(vllm_image, data_root):
        report(f"docker data root seeded from the cache in {time.monotonic() - started:.1f} s")
    machine = machine_factory(
        "vllm",
        binds=[
            Bind(data_root, Path("/var/lib/docker"), read_only=False),
            Bind(tiny_model, Path(MODEL_IN_MACHINE)),
        ],
    )
    machine.systemctl("start", "docker.service", timeout=120)
    report(f"vllm image {load_image(machine, vllm_image, data_root)}")
    port, api_key = free_port(), secrets.token_urlsafe(16)
    argv = docker_run_argv(
        vllm_image.name, name=CONTAINER, model_dir=MODEL_IN_MACHINE, port=port, api_key=api_key
    )
    machine.run(argv)
    engine = Engine(machine, port, api_key)
    try:
        waited = wait_healthy(port, HEALTH_TIMEOUT_S, alive=engine.running)
    except Exception:
        logs = machine.run(["docker", "logs", "--tail=80", CONTAINER], check=False)
        pytest.fail(f"the engine did not become healthy:\n{logs.stdout}{logs.stderr}")
    report(f"engine /health after {waited:.1f} s")
    yield engine
    started = time.monotonic()
    machine.run(["docker", "rm", "--force", CONTAINER], check=False, timeout=60)
    report(f"engine removed in {time.monotonic() - started:.2f} s")


def test_runs_hardened_as_the_appliance_uid(engine: Engine) -> None:
    fmt = (
        "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}} {{.HostConfig.CapDrop}} "
        "{{.HostConfig.SecurityOpt}} {{.HostConfig.Init}} {{.HostConfig.NetworkMode}}"
    )
    out = engine.machine.run(["docker", "inspect", f"--format={fmt}", CONTAINER]).stdout
    assert out.split() == [
        "10001:10001",
        "true",
        "[ALL]",
        "[no-new-privileges]",
        "true",
        "host",
    ]
    # the engine itself runs as that uid, not root
    top = engine.machine.run(["docker", "top", CONTAINER, "-o", "pid,uid,comm"]).stdout
    uids = {line.split()[1] for line in top.splitlines()[1:] if line.strip()}
    assert uids == {"10001"}, top


def test_chat_completion_with_the_key(engine: Engine) -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    headers = {"Authorization": f"Bearer {engine.api_key}"}
    started = time.monotonic()
    status, raw = http(f"{engine.url}/v1/chat/completions", body, headers=headers, timeout=60)
    took = time.monotonic() - started
    assert status == 200, raw[:2000]
    answer = json.loads(raw)
    assert answer["object"] == "chat.completion"
    assert answer["model"] == "tiny"
    assert isinstance(answer["choices"][0]["message"]["content"], str)
    assert 1 <= answer["usage"]["completion_tokens"] <= 8
    assert answer["usage"]["prompt_tokens"] > 0
    report(f"chat completion (8 tokens) in {took:.2f} s")


def test_the_api_key_is_required(engine: Engine) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    assert http(f"{engine.url}/v1/chat/completions", body)[0] == 401
    wrong = {"Authorization": "Bearer not-the-key"}
    assert http(f"{engine.url}/v1/chat/completions", body, headers=wrong)[0] == 401
    assert http(f"{engine.url}/v1/models")[0] == 401
    assert http(f"{engine.url}/health")[0] == 200  # stays open, for the supervisor
