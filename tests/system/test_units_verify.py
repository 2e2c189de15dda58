"""The appliance's units (systemd/) in a booted machine: verified, rated, and their ordering and
binding lines exercised with stand-in programs.

The units are installed unmodified into /etc/systemd/system of a machine booted from the
``rootfs`` fixture's tree (its overlay is this test's own, so nothing is written to the cache),
with Caddy's Caddyfile and caddy-run where caddy.service expects them. The programs the units
name (``/opt/confinfer/bin/{attestd,model-loader,vllm-supervisor}``) are stand-ins written into
that overlay, so ``systemd-analyze verify`` finds every ``ExecStart=`` binary and the chain runs
under each unit's own hardening. The stand-ins keep the real programs' contracts in miniature:

- attestd: ``READY=1``, serves ``/v1/health`` on /run/attestd/attestd.sock from the state the
  test writes to /run/stub/attestd.json;
- model-loader: waits for ``healthy``, mounts a tmpfs (source ``confinfer-model``) at
  /run/confinfer/model and writes model.json, ``READY=1``; then follows attestd: ``revoked``
  wipes and exits 77 (attestd's reason's code), attestd out of reach past a 5 s grace wipes and
  exits 69; /run/stub/loader-fail makes it exit with the code it holds before ``READY=1``;
- vllm-supervisor: reads model.json, says in ``STATUS=`` whether it sees the model through its
  own (private) mount namespace, serves ``/v1/models`` on 127.0.0.1:<port>, ``READY=1``;
- Caddy is the real one, through the real caddy-run, with the API key as a credential.

Only ``RestartSec=`` of model-loader is shortened (a drop-in) so the chain comes back in seconds.
The exposure scores are printed and bounded by :data:`MAX_EXPOSURE`.
"""

from __future__ import annotations

import http.client
import json
import re
import secrets
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.system.conftest import MachineFactory
from tests.system.machine import Bind, Machine

pytestmark = [pytest.mark.system, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
UNITS = ("attestd.service", "model-loader.service", "vllm.service", "caddy.service")
TARGET = "confinfer.target"
DROP_INS = ("attestd.service.d/50-socket-group.conf",)
# Measured with systemd 252 (bookworm); docs/operator-guide.md §7 explains each.
MAX_EXPOSURE = {
    "attestd.service": 2.3,
    "model-loader.service": 4.4,  # no mount namespace: its tmpfs must be the host's
    "vllm.service": 1.5,
    "caddy.service": 1.4,
}
MODEL = "/run/confinfer/model"
STATE_FILE = "/run/stub/attestd.json"
HEALTHY = {"state": "healthy", "reason": "attestd-healthy", "line": "stub: attested"}
REVOKED = {"state": "revoked", "reason": "gpu-cc-off", "line": "stub: GPU 0 CC mode is off"}
START_TIMEOUT_S = 60.0

NOTIFY = r"""
import os, socket
def notify(text):
    path = os.environ.get("NOTIFY_SOCKET")
    if path:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect("\0" + path[1:] if path.startswith("@") else path)
            sock.sendall(text.encode())
"""

ATTESTD_STUB = (
    "#!/usr/bin/python3\n"
    + NOTIFY
    + r"""
import http.server, json, signal, socketserver, sys, threading, time
SOCK = "/run/attestd/attestd.sock"
def ping():
    while True:
        notify("WATCHDOG=1")
        time.sleep(5)
threading.Thread(target=ping, daemon=True).start()
def state():
    try:
        with open("/run/stub/attestd.json") as f:
            return json.load(f)
    except OSError:
        return {"state": "healthy", "reason": "attestd-healthy", "line": "stub: attested"}
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        s = state()
        if self.path.split("?")[0] == "/v1/health":
            code, body = (200 if s["state"] == "healthy" else 503), s
            notify(f"STATUS={s['state']} ({s['reason']}): {s['line']}")
        else:
            code, body = 404, {"error": "no such path", "reason": "usage"}
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def address_string(self):
        return "unix"
    def log_message(self, *args):
        pass
class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
if os.path.exists(SOCK):
    os.unlink(SOCK)
server = Server(SOCK, Handler)
os.chmod(SOCK, 0o660)
def stop(*_):
    os.unlink(SOCK)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
s = state()
notify(f"READY=1\nSTATUS={s['state']} ({s['reason']}): {s['line']}")
server.serve_forever()
"""
)

LOADER_STUB = (
    "#!/usr/bin/python3\n"
    + NOTIFY
    + r"""
import json, signal, subprocess, sys, time
MODEL, HANDOFF, GRACE_S = "/run/confinfer/model", "/run/confinfer/model.json", 5.0
def health():
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect("/run/attestd/attestd.sock")
            sock.sendall(b"GET /v1/health HTTP/1.0\r\nHost: attestd\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return json.loads(data.split(b"\r\n\r\n", 1)[1])
    except (OSError, ValueError, IndexError):
        return None
def wipe():
    subprocess.run(["umount", MODEL], check=False, capture_output=True)
    if os.path.exists(HANDOFF):
        os.unlink(HANDOFF)
def leave(code, line):
    wipe()
    print(f"<3>model-loader: {line}", file=sys.stderr, flush=True)
    notify(f"STATUS=failed: {line}")
    sys.exit(code)
signal.signal(signal.SIGTERM, lambda *_: (wipe(), sys.exit(0)))
stale = os.path.ismount(MODEL)
print(f"stale tmpfs at start: {'yes' if stale else 'no'}", file=sys.stderr, flush=True)
if stale:
    wipe()
try:
    with open("/run/stub/loader-fail") as f:
        leave(int(f.read()), "stub: told to fail before READY")
except FileNotFoundError:
    pass
notify("STATUS=waiting for attestd")
while (h := health()) is None or h["state"] != "healthy":
    time.sleep(0.2)
os.makedirs(MODEL, exist_ok=True)
mount = ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "confinfer-model", MODEL]
subprocess.run(mount, check=True)
with open(MODEL + "/weights", "w") as f:
    f.write("plaintext weights")
with open(HANDOFF, "w") as f:
    json.dump({"model_path": MODEL}, f)
notify("READY=1\nSTATUS=model ready (stub)")
lost = None
while True:
    time.sleep(0.2)
    h = health()
    if h is None:
        lost = lost or time.monotonic()
        if time.monotonic() - lost > GRACE_S:
            leave(69, "attestd-unavailable: grace expired; the model was wiped")
    elif h["state"] == "revoked":
        leave(77, f"{h['reason']}: attestd revoked attestation; the model was wiped")
    else:
        lost = None
"""
)

VLLM_STUB = (
    "#!/usr/bin/python3\n"
    + NOTIFY
    + r"""
import http.server, json, signal, sys
if sys.argv[1:] == ["--cleanup"]:  # ExecStopPost=: the real one removes a leftover container
    sys.exit(0)
with open("/run/confinfer/model.json") as f:
    model = json.load(f)["model_path"]
with open(model + "/weights") as f:
    seen = f.read()
with open("/etc/confinfer/stub-port") as f:
    port = int(f.read())
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        data = json.dumps({"object": "list", "data": [{"id": "stub"}], "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
notify(f"READY=1\nSTATUS=serving stub; the model reads {seen!r}; mounted: {os.path.ismount(model)}")
server.serve_forever()
"""
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def install(machine: Machine, engine_port: int, https_port: int, api_key: str) -> None:
    for unit in (*UNITS, TARGET, *DROP_INS):
        machine.write_file(f"/etc/systemd/system/{unit}", (REPO / "systemd" / unit).read_text())
    stubs = {"attestd": ATTESTD_STUB, "model-loader": LOADER_STUB, "vllm-supervisor": VLLM_STUB}
    for name, text in stubs.items():
        machine.write_file(f"/opt/confinfer/bin/{name}", text, 0o755)
    caddy = REPO / "images" / "caddy"
    machine.write_file("/opt/confinfer/bin/caddy-run", (caddy / "caddy-run").read_text(), 0o755)
    machine.write_file("/opt/confinfer/caddy/Caddyfile", (caddy / "Caddyfile").read_text())
    machine.write_file("/etc/confinfer/api-key", api_key + "\n", 0o600)
    machine.write_file("/etc/confinfer/stub-port", str(engine_port))
    machine.write_file(
        "/etc/confinfer/caddy.env",
        "\n".join(
            [
                "CONFINFER_DOMAIN=localhost",
                "CONFINFER_CADDY_TLS=internal",
                "CONFINFER_CADDY_BIND=127.0.0.1",
                f"CONFINFER_HTTPS_PORT={https_port}",
                f"CONFINFER_HTTP_PORT={free_port()}",
                f"CONFINFER_SERVING_PORT={engine_port}",
            ]
        )
        + "\n",
    )
    machine.install_drop_in(
        "model-loader.service",
        "[Service]\n# Seconds, not the production 30 s, before a restart.\nRestartSec=1\n",
    )


@pytest.fixture(scope="module")
def machine(machine_factory: MachineFactory, tmp_path_factory: pytest.TempPathFactory) -> Machine:
    # dockerd (vllm.service Requires= it) needs a plain data root, not the overlay.
    docker_root = tmp_path_factory.mktemp("docker")
    return machine_factory("units", binds=[Bind(docker_root, Path("/var/lib/docker"), False)])


@pytest.fixture(scope="module")
def ports(machine: Machine) -> dict[str, Any]:
    found: dict[str, Any] = {
        "engine": free_port(),
        "https": free_port(),
        "key": secrets.token_urlsafe(32),
    }
    install(machine, found["engine"], found["https"], found["key"])
    return found


def status(machine: Machine) -> str:
    text = machine.systemctl("status", "--no-pager", "-l", "-n", "15", *UNITS, check=False).stdout
    return text + "\n--- journal ---\n" + machine.journal(lines=80)


def state(machine: Machine, unit: str) -> tuple[str, str]:
    props = machine.unit_properties(unit, "ActiveState", "MainPID")
    return props["ActiveState"], props["MainPID"]


def mounted(machine: Machine) -> bool:
    """Whether the tmpfs is mounted in the machine's own (PID 1's) mount namespace."""
    proc = machine.run(["findmnt", "-n", "-o", "SOURCE", MODEL], check=False)
    return proc.stdout.strip() == "confinfer-model"


def wait_restarted(machine: Machine, unit: str, old_pid: str) -> None:
    def back() -> bool:
        active, pid = state(machine, unit)
        return active == "active" and pid not in (old_pid, "0")

    machine.wait_for(back, 30, what=f"{unit} to run again")


def set_attestd(machine: Machine, value: dict[str, str]) -> None:
    machine.write_file(STATE_FILE, json.dumps(value))


@pytest.fixture
def serving(machine: Machine, ports: dict[str, Any]) -> Iterator[Machine]:
    """The whole target running, attestd healthy; everything stopped afterwards."""
    machine.run(["rm", "-f", "/run/stub/loader-fail"])
    set_attestd(machine, HEALTHY)
    machine.systemctl("reset-failed", check=False)
    machine.systemctl("start", TARGET, timeout=START_TIMEOUT_S)
    try:
        for unit in UNITS:
            machine.wait_for_property(unit, "ActiveState", "active", START_TIMEOUT_S)
    except Exception as exc:
        raise AssertionError(f"{exc}\n{status(machine)}") from None
    yield machine
    machine.systemctl("stop", TARGET, *UNITS, timeout=START_TIMEOUT_S)


def https(ports: dict[str, Any], machine: Machine, path: str, key: str | None) -> tuple[int, Any]:
    ca = machine.path("/var/lib/caddy/pki/authorities/local/root.crt")
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("localhost", ports["https"], context=context, timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def wait_answer(
    ports: dict[str, Any], machine: Machine, path: str, key: str | None, want: tuple[int, str]
) -> Any:
    """Poll Caddy until ``path`` answers ``want`` = (status, reason or "")."""
    seen: list[Any] = []

    def check() -> bool:
        try:
            code, body = https(ports, machine, path, key)
        except (OSError, ssl.SSLError, ValueError) as exc:
            seen.append(repr(exc))
            return False
        seen.append((code, body))
        return (code, body.get("reason", "") if isinstance(body, dict) else "") == want

    try:
        machine.wait_for(check, 30, what=f"{path} to answer {want}", interval=0.3)
    except Exception as exc:
        raise AssertionError(f"{exc}: {seen[-3:]}\n{status(machine)}") from None
    return seen[-1][1]


# --- static checks ----------------------------------------------------------------------------


def test_units_verify_inside_the_rootfs(machine: Machine, ports: dict[str, Any]) -> None:
    proc = machine.run(["systemd-analyze", "verify", TARGET, *UNITS], check=False)
    assert proc.returncode == 0, proc.stderr
    for unit in (TARGET, *UNITS):
        assert unit not in proc.stderr, proc.stderr  # not a single warning about ours


def test_exposure_scores(machine: Machine, ports: dict[str, Any]) -> None:
    scores = {}
    for unit in UNITS:
        proc = machine.run(["systemd-analyze", "security", "--no-pager", unit], check=False)
        match = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", proc.stdout)
        assert match, proc.stdout + proc.stderr
        scores[unit] = float(match.group(1))
        print(f"systemd-analyze security {unit}: {match.group(1)} {match.group(2)}")
    over = {u: s for u, s in scores.items() if s > MAX_EXPOSURE[u]}
    assert not over, f"exposure rose above {MAX_EXPOSURE}: {over}"


def test_the_target_gathers_the_four_without_holding_up_the_boot(
    machine: Machine, ports: dict[str, Any]
) -> None:
    machine.systemctl("enable", TARGET, *UNITS)
    try:
        props = machine.unit_properties(TARGET, "Wants", "After", "WantedBy")
        assert set(UNITS) <= set(props["Wants"].split())
        assert set(UNITS) <= set(props["After"].split())
        assert "multi-user.target" in props["WantedBy"].split()
        after = machine.unit_property("multi-user.target", "After").split()
        assert TARGET not in after  # the boot does not wait for the model
        for unit in UNITS:
            assert TARGET in machine.unit_property(unit, "PartOf").split(), unit
            assert TARGET in machine.unit_property(unit, "WantedBy").split(), unit
    finally:
        machine.systemctl("disable", TARGET, *UNITS)


def test_the_loader_has_no_mount_namespace_of_its_own(
    machine: Machine, ports: dict[str, Any]
) -> None:
    """Every option that would give model-loader a private mount namespace is off (the tmpfs it
    mounts must be the host's); vllm and caddy have one (their hardening)."""
    keys = (
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "PrivateMounts",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectProc",
        "ProcSubset",
        "ReadWritePaths",
        "ReadOnlyPaths",
        "InaccessiblePaths",
        "BindPaths",
        "TemporaryFileSystem",
        "MountFlags",
    )
    props = machine.unit_properties("model-loader.service", *keys)
    off = {"no", "", "default", "all", "0"}
    assert {k: v for k, v in props.items() if v not in off} == {}, props
    assert machine.unit_property("vllm.service", "ProtectSystem") == "strict"


# --- the chain, with stand-ins ----------------------------------------------------------------


def test_the_chain_serves(serving: Machine, ports: dict[str, Any]) -> None:
    machine = serving
    assert mounted(machine), "the loader's tmpfs is not in the host's mount namespace"
    text = machine.unit_property("vllm.service", "StatusText")
    # vllm (with its own mount namespace) sees the tmpfs the loader mounted
    assert text == "serving stub; the model reads 'plaintext weights'; mounted: True", text
    assert machine.unit_property("model-loader.service", "StatusText") == "model ready (stub)"
    status_text = machine.unit_property("attestd.service", "StatusText")
    assert status_text.startswith("healthy (attestd-healthy)"), status_text
    body = wait_answer(ports, machine, "/v1/models", ports["key"], (200, ""))
    assert body["data"] == [{"id": "stub"}]
    wait_answer(ports, machine, "/v1/models", None, (401, "api-key-required"))
    # Caddy (user caddy) reaches attestd's socket through the group drop-in
    assert wait_answer(ports, machine, "/attestation/health", None, (200, "attestd-healthy"))
    modes = machine.run(["stat", "-c", "%a %U:%G", "/run/attestd", "/run/attestd/attestd.sock"])
    assert modes.stdout.split("\n")[:2] == ["750 root:caddy", "660 root:caddy"]


def test_an_attestd_restart_keeps_serving(serving: Machine, ports: dict[str, Any]) -> None:
    machine = serving
    before = {u: state(machine, u) for u in ("model-loader.service", "vllm.service")}
    for how in (["restart", "attestd.service"], ["kill", "-s", "KILL", "attestd.service"]):
        old = state(machine, "attestd.service")[1]
        machine.systemctl(*how)
        wait_restarted(machine, "attestd.service", old)
        time.sleep(1)
        after = {u: state(machine, u) for u in before}
        assert after == before, f"{how}: {after} != {before}\n{status(machine)}"
    assert mounted(machine)
    wait_answer(ports, machine, "/v1/models", ports["key"], (200, ""))


def test_a_revocation_stops_vllm_and_the_chain_comes_back(
    serving: Machine, ports: dict[str, Any]
) -> None:
    machine = serving
    vllm_pid = state(machine, "vllm.service")[1]
    set_attestd(machine, REVOKED)
    machine.wait_for_property("vllm.service", "ActiveState", "inactive", 30)
    assert not mounted(machine)
    assert machine.run(["test", "-e", "/run/confinfer/model.json"], check=False).returncode != 0
    body = wait_answer(ports, machine, "/v1/models", ports["key"], (503, "gpu-cc-off"))
    assert body == REVOKED
    journal = machine.journal("model-loader.service")
    assert "status=77" in journal, journal
    # the loader restarts (RestartSec), waits for healthy, and brings vllm back
    time.sleep(3)
    assert state(machine, "vllm.service")[0] == "inactive"
    set_attestd(machine, HEALTHY)
    machine.wait_for_property("vllm.service", "ActiveState", "active", 30)
    assert state(machine, "vllm.service")[1] != vllm_pid
    assert mounted(machine)
    wait_answer(ports, machine, "/v1/models", ports["key"], (200, ""))


def test_attestd_gone_past_the_grace_stops_serving(serving: Machine, ports: dict[str, Any]) -> None:
    machine = serving
    machine.systemctl("stop", "attestd.service")
    # Wants=, so the loader is not stopped with attestd, and inside its grace vllm still serves
    wait_answer(ports, machine, "/attestation/health", None, (503, "attestd-unavailable"))
    wait_answer(ports, machine, "/v1/models", ports["key"], (200, ""))
    assert state(machine, "model-loader.service")[0] == "active"
    # past the grace the loader wipes and exits, and vllm goes with it
    machine.wait_for_property("vllm.service", "ActiveState", "inactive", 30)
    assert "status=69" in machine.journal("model-loader.service")
    # the loader's restart wants attestd again: the chain comes back by itself
    machine.wait_for_property("attestd.service", "ActiveState", "active", 30)
    machine.wait_for_property("vllm.service", "ActiveState", "active", 30)
    assert mounted(machine)
    wait_answer(ports, machine, "/v1/models", ports["key"], (200, ""))


def test_a_killed_loader_leaves_no_plaintext(serving: Machine, ports: dict[str, Any]) -> None:
    machine = serving
    machine.install_drop_in("model-loader.service", "[Service]\nRestartSec=4\n", "60-slow.conf")
    try:
        pid = state(machine, "model-loader.service")[1]
        machine.systemctl("kill", "-s", "KILL", "model-loader.service")
        machine.wait_for(
            lambda: machine.unit_property("model-loader.service", "SubState") == "auto-restart",
            10,
            what="the loader waiting to restart",
        )
        # ExecStopPost= unmounted it before the restart, and vllm went with the loader
        assert not mounted(machine)
        assert state(machine, "vllm.service")[0] in ("inactive", "deactivating")
        machine.wait_for_property("vllm.service", "ActiveState", "active", 30)
        assert state(machine, "model-loader.service")[1] != pid
        assert "stale tmpfs at start: no" in machine.journal("model-loader.service")
    finally:
        machine.run(["rm", "-f", "/etc/systemd/system/model-loader.service.d/60-slow.conf"])
        machine.daemon_reload()


@pytest.mark.parametrize(("code", "restarts"), [(65, False), (78, False), (77, True)])
def test_a_loader_that_cannot_load_never_starts_vllm(
    machine: Machine, ports: dict[str, Any], code: int, restarts: bool
) -> None:
    # The units too: `systemctl stop` waits only for the jobs it was asked for, and a start
    # queued while PartOf='s stop jobs still run would cancel them (the loader kept running).
    machine.systemctl("stop", TARGET, *UNITS, timeout=START_TIMEOUT_S)
    machine.systemctl("reset-failed", check=False)
    machine.write_file("/run/stub/loader-fail", str(code))
    set_attestd(machine, HEALTHY)
    started = machine.journal("vllm.service").count("Started vllm.service")
    try:
        machine.systemctl("start", "--no-block", TARGET)
        machine.wait_for(
            lambda: (
                int(machine.unit_property("model-loader.service", "NRestarts")) >= 1
                or machine.unit_property("model-loader.service", "ActiveState") == "failed"
            ),
            30,
            what="the loader to fail",
        )
        time.sleep(3)  # long enough for RestartSec=1 to have restarted it
        props = machine.unit_properties("model-loader.service", "ActiveState", "NRestarts")
        if restarts:  # a refusal (and a revocation, of the same kind) is retried
            assert int(props["NRestarts"]) >= 1, props
        else:
            assert props == {"ActiveState": "failed", "NRestarts": "0"}, props
        assert machine.journal("vllm.service").count("Started vllm.service") == started
        assert state(machine, "vllm.service")[0] != "active"
        assert not mounted(machine)
        wait_answer(ports, machine, "/v1/models", ports["key"], (503, "attestd-healthy"))
    finally:
        machine.run(["rm", "-f", "/run/stub/loader-fail"])
        machine.systemctl("stop", TARGET, *UNITS, timeout=START_TIMEOUT_S)
        machine.systemctl("reset-failed", check=False)
