"""The testbed's control plane: ``python -m testbed COMMAND --dir D``.

  up            trust, identities, vTPM (swtpm), the services process (IMDS, MAA, Key Vault), the
                fake GPU, the KEK "model-kek"; writes D/testbed.env
  down          stops every process ``up`` started (SIGTERM, then SIGKILL after a bound)
  status        JSON: recorded processes (alive or not), ports, URLs; exit 0 all up, 1 down,
                2 partly up
  gpu ACTION    cc-on | cc-off | devtools-on | devtools-off | lose | restore | show;
                ``gpu set KEY=VALUE...`` for any state-file key (driver=, tamper=, gpus=, ...)
  fault SERVICE [--status N] [--retry-after S] [--latency S] [--down] [--foreign-signer]
                [--inject WHAT] [--count N]; fault --clear [SERVICE]
  pcr-extend    extends a vTPM PCR (default 7)
  ak-cert --days-left N
                replaces the vTPM's AK certificate by one that expires in N days
  kek --name N  creates an exportable RSA-HSM key under the canonical CVM release policy and
                prints its kid
  onboard [--boot-id-file F] check|apply STAGE | reboot --state-file S | nvidia-smi ARGS |
          set KEY=VALUE... | log
                the hardware side of `confinfer onboard` with onboard_hardware = "testbed":
                simulated stages, strictly, every invocation logged (testbed/onboard.py)

An expected failure prints one line, ``testbed: <reason>: <message>``, and exits non-zero; a
failed ``up`` first stops whatever it had started.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import dataclasses
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from testbed import gpu as fakegpu
from testbed.env import ENV_FILE, RUN_DIR, ProcessRecord, RunRecords, vm_id, write_env_file
from testbed.faults import SERVICES, Fault, Faults

SERVICES_START_TIMEOUT_S = 20.0
STOP_GRACE_S = 5.0
KILL_WAIT_S = 2.0
DEFAULT_KEK = "model-kek"
KEYVAULT_API_VERSION = "7.4"
VAULT_RESOURCE = "https://vault.azure.net"


class TestbedError(Exception):
    """An expected failure of a control-plane command; ``reason`` is a stable slug."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


# ---- processes ------------------------------------------------------------------------------


def stop_processes(records: list[ProcessRecord], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every live recorded process, wait up to ``grace_s``, then SIGKILL the rest."""

    def signal_all(live: list[ProcessRecord], signum: int) -> None:
        for record in live:
            try:
                os.kill(record.pid, signum)
            except ProcessLookupError:
                pass

    def wait(live: list[ProcessRecord], bound_s: float) -> list[ProcessRecord]:
        deadline = time.monotonic() + bound_s
        while live and time.monotonic() < deadline:
            _reap(live)
            live = [r for r in live if r.alive()]
            if live:
                time.sleep(0.02)
        return live

    live = [r for r in records if r.alive()]
    signal_all(live, signal.SIGTERM)
    live = wait(live, grace_s)
    signal_all(live, signal.SIGKILL)
    live = wait(live, KILL_WAIT_S)
    if live:
        names = ", ".join(f"{r.name}[{r.pid}]" for r in live)
        raise TestbedError(f"still running after SIGKILL: {names}", reason="stop-failed")


def _reap(records: list[ProcessRecord]) -> None:
    """Collect recorded processes that are our own exited children (a failed ``up``)."""
    for record in records:
        try:
            os.waitpid(record.pid, os.WNOHANG)
        except ChildProcessError:
            pass


def stray_swtpm(directory: Path) -> list[ProcessRecord]:
    """swtpm processes serving this testbed's vTPM state that no record names (a vTPM start
    that failed half-way)."""
    state_dir = str(directory / "vtpm")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not os.path.basename(argv[0]).startswith(b"swtpm"):
            continue
        if any(state_dir.encode() in arg for arg in argv[1:]):
            found.append(ProcessRecord.of("vtpm-stray", int(entry.name)))
    return found


def _vtpm_pids(pids: tuple[int, ...]) -> list[tuple[str, int]]:
    """Names for ``Vtpm.pids`` (swtpm, then the report-refresh proxy)."""
    names = ("vtpm-swtpm", "vtpm-tpmproxy")
    if len(pids) == len(names):
        return list(zip(names, pids, strict=True))
    return [(f"vtpm-{i}", pid) for i, pid in enumerate(pids)]


def _stop_vtpm(directory: Path) -> None:
    """Ask the vTPM to shut down cleanly (swtpm saves its state); best effort before signals."""
    state_dir = directory / "vtpm"
    if not state_dir.is_dir():
        return
    try:
        from testbed.vtpm import Vtpm

        Vtpm.attach(state_dir).stop()
    except Exception:  # noqa: S110 - the recorded pids are stopped next regardless
        pass


def down(directory: Path) -> None:
    records = RunRecords(directory)
    procs = records.processes()
    if any(p.alive() for p in procs if p.name.startswith("vtpm")):
        _stop_vtpm(directory)
    known = {p.pid for p in procs}
    stop_processes(procs + [p for p in stray_swtpm(directory) if p.pid not in known])
    records.remove(procs)
    records.services_file.unlink(missing_ok=True)


# ---- up -----------------------------------------------------------------------------------


def _wait_for_services(
    records: RunRecords, proc: subprocess.Popen[bytes], log_path: Path
) -> dict[str, Any]:
    deadline = time.monotonic() + SERVICES_START_TIMEOUT_S
    while time.monotonic() < deadline:
        info = records.services()
        if info is not None and info.get("pid") == proc.pid:
            return info
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            raise TestbedError(
                f"services exited {proc.returncode}: {tail[0]}", reason="services-failed"
            )
        time.sleep(0.02)
    raise TestbedError(
        f"services not ready after {SERVICES_START_TIMEOUT_S:.0f} s (log: {log_path})",
        reason="services-timeout",
    )


def _start_services(directory: Path, records: RunRecords) -> subprocess.Popen[bytes]:
    logs = directory / "logs"
    logs.mkdir(exist_ok=True)
    with open(logs / "services.log", "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "testbed.services",
                "--dir",
                str(directory),
                "--wait-for-inputs",
                str(SERVICES_START_TIMEOUT_S),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            cwd=directory,
        )
    records.add(ProcessRecord.of("services", proc.pid))
    return proc


def _existing(records: RunRecords) -> None:
    live = [r for r in records.processes() if r.alive()] + stray_swtpm(records.directory)
    if live:
        raise TestbedError(
            f"a testbed is already running in {records.directory} "
            f"({', '.join(f'{r.name}[{r.pid}]' for r in live)}); run `down` first",
            reason="already-running",
        )


def _clear_previous_run(directory: Path) -> None:
    """Each ``up`` is a fresh machine: new trust, identities, vTPM and vault. The fake GPU keeps
    its identity (PKI) and its built library, as hardware would, and the VM its id
    (``DIR/vm-id``); the GPU's state is rewritten."""
    for name in ("vtpm", "keyvault", "pki", "bin", RUN_DIR):
        shutil.rmtree(directory / name, ignore_errors=True)
    for name in (ENV_FILE, "identities.json", "faults.json"):
        (directory / name).unlink(missing_ok=True)


def up(directory: Path, *, gpus: int = 1) -> float:
    """Bring the testbed up in ``directory``; returns the seconds it took."""
    from testbed.identities import Identities
    from testbed.pki import Trust

    started = time.monotonic()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    records = RunRecords(directory)
    _existing(records)
    _clear_previous_run(directory)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        # The GPU (PKI, state, gcc) needs nothing else: it builds while the rest comes up. The
        # services process starts first and imports while the keys are made; it loads them
        # once the inputs marker appears.
        gpu_job = pool.submit(_provision_gpu, directory / "gpu", gpus)
        services = _start_services(directory, records)
        trust = Trust.create()
        trust.save(directory / "pki")
        identities = Identities.create().save(directory)
        machine_id = vm_id(directory)
        records.inputs_marker.touch()
        from testbed.vtpm import Vtpm

        vtpm = Vtpm.start(directory / "vtpm", trust, vm_id=machine_id)
        records.add(*(ProcessRecord.of(name, pid) for name, pid in _vtpm_pids(vtpm.pids)))
        info = _wait_for_services(records, services, directory / "logs" / "services.log")
        gpu = gpu_job.result()
        urls: dict[str, str] = info["urls"]
        kid = create_kek(directory, urls, DEFAULT_KEK)
        skr_tool = write_tool(
            directory, SKR_TOOL_NAME, "azureattestskr", "Microsoft's AzureAttestSKR"
        )
        nvattest_tool = write_tool(directory, NVATTEST_TOOL_NAME, "nvattest", "NVIDIA's nvattest")
        from testbed import lgv as standin_lgv

        lgv_venv = standin_lgv.write_venv(directory)
        env = {
            "AZURE_POD_IDENTITY_AUTHORITY_HOST": urls["imds"],
            "CONFINFER_IMDS_URL": urls["imds"],
            "CONFINFER_MAA_URL": urls["maa"],
            "CONFINFER_KEYVAULT_URL": urls["keyvault"],
            "CONFINFER_KEYVAULT_VERIFY_CHALLENGE_RESOURCE": "0",
            "CONFINFER_CA_BUNDLE": str(directory / "pki" / "ca.pem"),
            "CONFINFER_KEY_ID": kid,
            "CONFINFER_TPM_TCTI": str(vtpm.tcti),
            "CONFINFER_NVML_LIBRARY": str(gpu.library),
            fakegpu.STATE_ENV: str(gpu.state_file),
            "CONFINFER_TESTBED_GPU_ROOT": str(gpu.root_cert),
            "CONFINFER_TESTBED_GPU_REFERENCE": str(gpu.reference),
            "CONFINFER_TESTBED_GPU_RIMS": str(gpu.directory / fakegpu.RIM_DIR),
            "CONFINFER_TESTBED_DIR": str(directory),
            "CONFINFER_TESTBED_CLIENT_ID": identities.default.client_id,
            "CONFINFER_TESTBED_NOROLE_CLIENT_ID": identities.named("noroles").client_id,
            "CONFINFER_TESTBED_SKR_TOOL": str(skr_tool),
            "CONFINFER_TESTBED_NVATTEST": str(nvattest_tool),
            # attestd runs the stand-in nvattest and expects the testbed's GPU count.
            "CONFINFER_NVATTEST_PATH": str(nvattest_tool),
            "CONFINFER_GPU_EXPECTED_COUNT": str(gpus),
            standin_lgv.ENV_NAME: str(lgv_venv),
        }
        write_env_file(directory / ENV_FILE, env)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        try:
            down(directory)
        except TestbedError as exc:
            print(f"testbed: {exc.reason}: {exc}", file=sys.stderr)
        raise
    pool.shutdown(wait=True)
    return time.monotonic() - started


SKR_TOOL_NAME = "AzureAttestSKR"
_TOOL_WRAPPER = """#!{python} -I
# Written by `python -m testbed up`: the testbed's stand-in for {what}
# (testbed/{module}.py), bound to the testbed in {directory!r}.
import sys
sys.path.insert(0, {package_root!r})
from testbed.{module} import main
sys.exit(main(sys.argv, testbed_dir={directory!r}))
"""
NVATTEST_TOOL_NAME = "nvattest"


def write_tool(directory: Path, name: str, module: str, what: str) -> Path:
    """``DIR/bin/NAME``: an executable that runs the stand-in ``testbed.MODULE`` with this
    Python, bound to this testbed directory (``-I``: the caller's PYTHON* variables do not
    change it)."""
    package_root = str(Path(__file__).resolve().parent.parent)
    path = directory / "bin" / name
    path.parent.mkdir(mode=0o700, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(
        _TOOL_WRAPPER.format(
            python=sys.executable,
            directory=str(directory),
            package_root=package_root,
            module=module,
            what=what,
        ),
        encoding="utf-8",
    )
    tmp.chmod(0o755)
    os.replace(tmp, path)
    return path


# testbed.nvattest.INJECTIONS, named here so that the parser does not import the tool.
NVATTEST_INJECTIONS = ("nonce-mismatch", "bad-signature", "ocsp-revoked", "ocsp-nonce-mismatch")


def _provision_gpu(directory: Path, gpus: int) -> fakegpu.FakeGpu:
    state = fakegpu.GpuState(
        gpus=gpus, uuids=tuple(f"GPU-{uuid.uuid4()}" for _ in range(fakegpu.MAX_GPUS))
    )
    return fakegpu.provision(directory, state)


# ---- Key Vault: the KEK ----------------------------------------------------------------------


def release_policy(maa_url: str) -> dict[str, Any]:
    """The canonical CVM release policy: an Azure-compliant SEV-SNP CVM attested by ``maa_url``."""
    return {
        "version": "1.0.0",
        "anyOf": [
            {
                "authority": maa_url,
                "allOf": [
                    {"claim": "x-ms-isolation-tee.x-ms-attestation-type", "equals": "sevsnpvm"},
                    {
                        "claim": "x-ms-isolation-tee.x-ms-compliance-status",
                        "equals": "azure-compliant-cvm",
                    },
                ],
            }
        ],
    }


def _http_json(
    url: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: dict[str, Any] | None = None,
    context: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    if not url.startswith(("http://", "https://")):
        raise TestbedError(f"not an http(s) URL: {url}", reason="usage")
    data = json.dumps(body).encode() if body is not None else None
    # the scheme is checked above: only http(s) reaches urlopen
    req = urllib.request.Request(  # noqa: S310
        url, data=data, method=method, headers=dict(headers or {})
    )
    if data is not None:
        req.add_header("Content-Type", "application/json")
    # Loopback services: never through a proxy named in the environment.
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    try:
        with opener.open(req, timeout=15) as resp:
            result: dict[str, Any] = json.loads(resp.read())
            return result
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        raise TestbedError(
            f"{method} {url.split('?')[0]}: HTTP {exc.code}: {detail}", reason="http-error"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        raise TestbedError(f"{method} {url.split('?')[0]}: {exc}", reason="http-error") from None


def create_kek(directory: Path, urls: dict[str, str], name: str) -> str:
    """Create an exportable RSA-HSM key with the canonical release policy; returns its kid."""
    token_url = f"{urls['imds']}/metadata/identity/oauth2/token?" + urllib.parse.urlencode(
        {"api-version": "2018-02-01", "resource": VAULT_RESOURCE}
    )
    token = _http_json(token_url, headers={"Metadata": "true"})["access_token"]
    policy = json.dumps(release_policy(urls["maa"]), separators=(",", ":")).encode()
    body = {
        "kty": "RSA-HSM",
        "key_size": 2048,
        "key_ops": ["encrypt", "decrypt", "wrapKey", "unwrapKey"],
        "attributes": {"enabled": True, "exportable": True},
        "release_policy": {
            "contentType": "application/json; charset=utf-8",
            "data": base64.urlsafe_b64encode(policy).rstrip(b"=").decode(),
            "immutable": False,
        },
    }
    context = ssl.create_default_context(cafile=str(directory / "pki" / "ca.pem"))
    url = (
        f"{urls['keyvault']}/keys/{urllib.parse.quote(name)}/create?"
        f"api-version={KEYVAULT_API_VERSION}"
    )
    bundle = _http_json(
        url, method="POST", headers={"Authorization": f"Bearer {token}"}, body=body, context=context
    )
    kid = bundle.get("key", {}).get("kid")
    if not isinstance(kid, str):
        raise TestbedError("Key Vault answered without a key id", reason="http-error")
    return kid


def _urls(directory: Path) -> dict[str, str]:
    info = RunRecords(directory).services()
    if info is None:
        raise TestbedError(f"no testbed services are running in {directory}", reason="not-running")
    urls: dict[str, str] = info["urls"]
    return urls


# ---- commands -------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    elapsed = up(args.dir, gpus=args.gpus)
    print(f"testbed up in {elapsed:.2f} s: {args.dir / ENV_FILE}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    down(args.dir)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    records = RunRecords(args.dir)
    procs = records.processes()
    info = records.services() or {}
    alive = {p.name: p.alive() for p in procs}
    report: dict[str, Any] = {
        "dir": str(args.dir),
        "processes": {p.name: {"pid": p.pid, "alive": alive[p.name]} for p in procs},
        "ports": info.get("ports", {}),
        "urls": info.get("urls", {}),
    }
    try:
        gpu = fakegpu.read_state(args.dir / "gpu" / "state")
        report["gpu"] = {
            "cc": gpu.cc,
            "devtools": gpu.devtools,
            "env": gpu.env,
            "gpus": gpu.gpus,
            "lost": gpu.lost,
            "ready": gpu.ready,
        }
    except fakegpu.GpuError:
        report["gpu"] = None
    print(json.dumps(report, indent=1, sort_keys=True))
    if procs and all(alive.values()):
        return 0
    return 2 if any(alive.values()) else 1


def cmd_gpu(args: argparse.Namespace) -> int:
    state_file = args.dir / "gpu" / "state"
    if args.action != "set" and args.assignments:
        raise TestbedError(f"`gpu {args.action}` takes no KEY=VALUE", reason="usage")
    if args.action == "show":
        state = fakegpu.read_state(state_file)
    elif args.action == "set":
        if not args.assignments:
            raise TestbedError("`gpu set` needs KEY=VALUE arguments", reason="usage")
        state = fakegpu.set_keys(state_file, args.assignments)
    else:
        state = fakegpu.apply_action(state_file, args.action)
    print(json.dumps(dataclasses.asdict(state), sort_keys=True))
    return 0


def cmd_fault(args: argparse.Namespace) -> int:
    faults = Faults(args.dir / "faults.json")
    if args.clear:
        faults.clear(args.service)
        return 0
    if args.service is None:
        raise TestbedError("name a service, or pass --clear", reason="usage")
    if args.foreign_signer and args.service != "kv-release":
        raise TestbedError("--foreign-signer is a kv-release fault", reason="usage")
    if args.inject is not None and args.service != "nvattest":
        raise TestbedError("--inject is an nvattest fault", reason="usage")
    if args.service == "nvattest" and (args.status is not None or args.down):
        raise TestbedError(
            "the nvattest knob takes --inject or --latency (nvattest-rim and nvattest-ocsp "
            "take --status and --down)",
            reason="usage",
        )
    if (
        args.status is None
        and not args.down
        and args.latency <= 0
        and not args.foreign_signer
        and args.inject is None
    ):
        raise TestbedError(
            "a fault needs --status, --down, --latency, --foreign-signer or --inject",
            reason="usage",
        )
    if args.status is not None and not 100 <= args.status <= 599:
        raise TestbedError("--status must be an HTTP status, 100..599", reason="usage")
    if args.count == 0 or args.count < -1:
        raise TestbedError("--count must be positive, or -1 for until cleared", reason="usage")
    faults.arm(
        args.service,
        Fault(
            status=args.status,
            retry_after=args.retry_after,
            latency_s=args.latency,
            down=args.down,
            count=args.count,
            foreign_signer=args.foreign_signer,
            inject=args.inject,
        ),
    )
    return 0


def cmd_pcr_extend(args: argparse.Namespace) -> int:
    from testbed.vtpm import Vtpm

    if not 0 <= args.index <= 23:
        raise TestbedError("--index must be 0..23", reason="usage")
    Vtpm.attach(args.dir / "vtpm").extend_pcr(args.index, args.data.encode())
    print(json.dumps({"index": args.index, "extended": True}))
    return 0


def cmd_ak_cert(args: argparse.Namespace) -> int:
    """Replace the vTPM's AK certificate by one for the same AK, from the same vTPM CA, that
    expires in ``--days-left`` days (negative: already expired), so that a client's renewal
    path (Microsoft's library renews within 90 days of expiry) can be exercised."""
    import datetime as dt

    from cryptography.hazmat.primitives import serialization

    from testbed.pki import Trust
    from testbed.vtpm import AK_CERT_INDEX, Vtpm, issue_ak_certificate

    if not -3650 <= args.days_left <= 3650:
        raise TestbedError("--days-left must be within -3650..3650", reason="usage")
    trust = Trust.load(args.dir / "pki")
    vtpm = Vtpm.attach(args.dir / "vtpm")
    not_after = (dt.datetime.now(dt.UTC) + dt.timedelta(days=args.days_left)).replace(microsecond=0)
    cert = issue_ak_certificate(trust, vtpm.ak_public(), vtpm.vm_id, not_after=not_after)
    vtpm.replace_ak_certificate(cert.public_bytes(serialization.Encoding.DER))
    print(
        json.dumps(
            {
                "index": f"0x{AK_CERT_INDEX:08X}",
                "days_left": args.days_left,
                "not_before": cert.not_valid_before_utc.isoformat(),
                "not_after": cert.not_valid_after_utc.isoformat(),
                "serial": f"{cert.serial_number:X}",
            }
        )
    )
    return 0


def cmd_kek(args: argparse.Namespace) -> int:
    print(create_kek(args.dir, _urls(args.dir), args.name))
    return 0


def cmd_onboard(args: argparse.Namespace) -> int:
    from testbed import onboard

    try:
        return onboard.main(args.dir, list(args.words), args.boot_id_file)
    except onboard.StandInError as exc:
        print(f"testbed: {exc.reason}: {exc}", file=sys.stderr)
        return exc.exit_code


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m testbed", description="Local stand-ins for Azure's side of the wire."
    )
    top.add_argument("--debug", action="store_true", help="tracebacks for unexpected errors")
    sub = top.add_subparsers(dest="command", required=True)

    def command(
        name: str, func: Callable[[argparse.Namespace], int], help_text: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--dir", type=Path, required=True, help="the testbed directory")
        p.set_defaults(func=func)
        return p

    p = command("up", cmd_up, "start the testbed and write DIR/testbed.env")
    p.add_argument(
        "--gpus",
        type=int,
        default=1,
        choices=range(fakegpu.MAX_GPUS + 1),
        metavar="N",
        help="number of fake GPUs (default 1)",
    )
    command("down", cmd_down, "stop every process the testbed started")
    command("status", cmd_status, "processes and ports as JSON")
    p = command("gpu", cmd_gpu, "change the fake GPU's state")
    p.add_argument("action", choices=[*fakegpu.ACTIONS, "show", "set"])
    p.add_argument(
        "assignments",
        nargs="*",
        metavar="KEY=VALUE",
        help="with `set`: state-file keys (see testbed/nvml/fake_nvml.c)",
    )
    p = command("fault", cmd_fault, "arm or clear a service fault")
    p.add_argument("service", nargs="?", choices=SERVICES)
    p.add_argument("--status", type=int, help="answer this HTTP status")
    p.add_argument("--retry-after", type=int, help="Retry-After seconds sent with --status")
    p.add_argument("--latency", type=float, default=0.0, help="seconds added before answering")
    p.add_argument("--down", action="store_true", help="drop connections without an answer")
    p.add_argument(
        "--count", type=int, default=-1, help="requests affected (default -1: until cleared)"
    )
    p.add_argument(
        "--foreign-signer",
        action="store_true",
        help="kv-release: sign with a valid certificate for another host",
    )
    p.add_argument(
        "--inject",
        choices=NVATTEST_INJECTIONS,
        help="nvattest: corrupt the evidence or the OCSP answers this way",
    )
    p.add_argument("--clear", action="store_true", help="clear the service's (or all) faults")
    p = command("pcr-extend", cmd_pcr_extend, "extend a vTPM PCR")
    p.add_argument("--index", type=int, default=7, help="PCR index (default 7)")
    p.add_argument("--data", default="testbed pcr-extend", help="text whose digest is extended")
    p = command("ak-cert", cmd_ak_cert, "replace the AK certificate by one near its expiry")
    p.add_argument(
        "--days-left",
        type=int,
        required=True,
        metavar="N",
        help="days until the new certificate expires (negative: expired)",
    )
    p = command("kek", cmd_kek, "create a release-policy KEK and print its kid")
    p.add_argument("--name", required=True, help="key name")
    p = command("onboard", cmd_onboard, "onboarding's hardware stand-ins (testbed/onboard.py)")
    p.add_argument(
        "--boot-id-file",
        type=Path,
        default=Path("/proc/sys/kernel/random/boot_id"),
        help="where this boot's id is read",
    )
    p.add_argument("words", nargs=argparse.REMAINDER, help="check|apply STAGE, reboot, ...")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.dir = args.dir.resolve()
    try:
        result: int = args.func(args)
        return result
    except Exception as exc:
        # The testbed's own errors (TestbedError, GpuError, VtpmError) carry a reason slug.
        reason = getattr(exc, "reason", None)
        if isinstance(reason, str):
            print(f"testbed: {reason}: {exc}", file=sys.stderr)
            return 1
        if args.debug:
            raise
        print(f"testbed: {args.command}-failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
