"""The appliance end to end under real systemd, narrated: the last part of ``scripts/demo``.

  .venv/bin/python -m tests.system.demo

As root. It boots one nspawn machine from the system tests' cached root file system (built on
first use, about 2 minutes) with the Docker engine inside, the units of systemd/, Caddy, the vLLM
CPU test image (built on first use, about 3 minutes) and the testbed on the host, as
tests/system/test_boot_to_serving.py does, then:

1. seals the tiny model to the testbed's Key Vault KEK;
2. starts ``confinfer.target`` and shows each unit's STATUS= as it changes, then
   ``confinfer status`` and ``systemctl status``;
3. sends a chat completion through Caddy over TLS with the API key (and one without: 401);
4. turns the fake GPU's confidential computing off and shows serving stop: vllm.service
   inactive, the container gone, the tmpfs unmounted, Caddy's 503 with attestd's reason;
5. prints the time of each stage and of the revocation (bench/boot.py reads the journal).

It leaves nothing running: the machine is shut down and the testbed brought down, also on
failure or Ctrl-C.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import boot as boot_bench
from tests.integration.conftest import run_cli, start_testbed
from tests.system import rootfs as rootfs_builder
from tests.system import vllm_image as image_builder
from tests.system.appliance import (
    MODEL,
    TARGET,
    UNITS,
    Appliance,
    binds,
    boot_docker,
    install,
    make_packages,
)
from tests.system.conftest import _why_not
from tests.system.machine import Machine
from tests.system.vllm_engine import seed_data_root, write_tiny_model

REPO = Path(__file__).resolve().parents[2]
SERVE_TIMEOUT_S = 600.0


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def say(text: str) -> None:
    print(text, flush=True)


def follow_boot(app: Appliance, timeout: float) -> None:
    """Each unit's STATUS= line as it changes, until vllm.service is active."""
    seen: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for unit in UNITS:
            props = app.machine.unit_properties(unit, "ActiveState", "StatusText")
            line = f"{props['ActiveState']}: {props['StatusText'] or '-'}"
            if seen.get(unit) != line:
                seen[unit] = line
                say(f"  {unit:<22} {line}")
        if seen["vllm.service"].startswith("active:"):
            return
        if app.machine.unit_property("model-loader.service", "ActiveState") == "failed":
            raise SystemExit("demo: model-loader failed:\n" + app.status())
        time.sleep(0.5)
    raise SystemExit(f"demo: not serving after {timeout:g} s:\n" + app.status())


def status_lines(app: Appliance) -> None:
    out = app.machine.systemctl("status", "--no-pager", *UNITS, check=False).stdout
    for line in out.splitlines():
        text = line.strip()
        unit_line = any(text[1:].lstrip().startswith(f"{unit} ") for unit in UNITS)
        if unit_line or text.startswith(("Active:", "Status:")):
            say(f"  {text}")


def run(work: Path) -> None:
    step("the machine's root file system and the vLLM CPU image (built once, then cached)")
    tree = rootfs_builder.ensure().tree
    image = image_builder.ensure()
    say(f"  rootfs {tree}\n  image  {image.name} ({image.tree})")

    step("emulated Azure on the host: vTPM (swtpm), IMDS, MAA, Key Vault, fake GPU")
    testbed = start_testbed(work / "testbed")
    try:
        step("model owner: a tiny model with a tokenizer, sealed to the Key Vault KEK")
        model = write_tiny_model(image, work / "model")
        packages = make_packages(testbed, model, work / "packages", extras=False)
        say(f"  sealed package {packages.sealed}")

        data_root = work / "docker-data"
        data_root.mkdir()
        seed_data_root(image, data_root)
        host = binds(REPO, testbed, packages, data_root)
        machine = Machine.boot("demo", tree, tmp_path=work / "machine", binds=host)
        try:
            say(f"  machine {machine.name}: systemd booted in {machine.boot_s:.2f} s")
            loaded = boot_docker(machine, image, data_root)
            say(f"  Docker engine in the machine, vLLM image {loaded}")
            app = install(machine, REPO, testbed, packages, image, host)
            serve_and_revoke(app)
        finally:
            machine.systemctl("stop", TARGET, *UNITS, check=False, timeout=120)
            machine.shutdown()
            say(f"\n  machine {machine.name} shut down")
    finally:
        run_cli("down", "--dir", str(testbed.dir), check=False)
        say("  emulated Azure stopped")


def serve_and_revoke(app: Appliance) -> None:
    marks: dict[str, float] = {}
    step("the VM boots: systemctl start confinfer.target (attestd, model-loader, vllm, caddy)")
    marks["start"] = time.monotonic()
    app.machine.systemctl("start", "--no-block", TARGET)
    follow_boot(app, SERVE_TIMEOUT_S)
    status_lines(app)

    step("confinfer status (attestd's health over its Unix socket)")
    say(app.machine.run(["/opt/confinfer/bin/confinfer", "status"], check=False).stdout.rstrip())

    step("an API client: a chat completion through Caddy over TLS, with the API key")
    code, answer = app.chat(app.api_key)
    if code != 200:
        raise SystemExit(f"demo: the chat completion failed ({code}): {answer}")
    reply = answer["choices"][0]["message"]["content"]
    say(f"  200: {answer['usage']['completion_tokens']} tokens from {answer['model']}: {reply!r}")
    say(f"  without the key: {app.chat(None)[0]}")
    marks["first_token"] = app.first_token()
    stages = boot_bench.boot_stages(boot_bench.parse_journal(app.journal_json()), marks)

    step("the GPU's confidential computing goes off (the fake GPU's CC mode)")
    marks["cc_off"] = time.monotonic()
    app.testbed.cli("gpu", "cc-off")
    try:
        app.wait("vllm.service", "ActiveState", "inactive", 60)
        app.machine.wait_for(lambda: not app.container_exists(), 30, what="the container gone")
        status_lines(app)
        left = app.machine.run(["ls", "-A", MODEL], check=False).stdout.split()
        mounted = "yes" if app.mounted() else "no"
        say(f"  tmpfs mounted: {mounted}; {MODEL} holds {len(left)} entries")
        say(f"  container confinfer-vllm: {'present' if app.container_exists() else 'gone'}")
        code, body = app.https("/v1/chat/completions", {"model": "tiny"}, key=app.api_key)
        if isinstance(body, dict):
            body = f"{body.get('state')} ({body.get('reason')}): {body.get('line')}"
        say(f"  Caddy answers {code}: {body}")
        revoke = boot_bench.revocation(boot_bench.parse_journal(app.journal_json()), marks)
    finally:
        app.testbed.cli("gpu", "cc-on")

    step("timings (CLOCK_MONOTONIC, from the machine's journal)")
    say(boot_bench.table(stages, revoke, 1.0))


def main() -> int:
    why = _why_not()
    if why:
        print(f"demo: skipping the appliance under systemd: {why}", file=sys.stderr)
        return 0
    work = Path(tempfile.mkdtemp(prefix="confinfer-demo.", dir="/var/tmp"))
    work.chmod(0o755)
    try:
        run(work)
    except KeyboardInterrupt:
        print("demo: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
