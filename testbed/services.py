"""One process hosting the testbed's IMDS (plain HTTP), MAA and Key Vault (both TLS).

``python -m testbed.services --dir D [--wait-for-inputs S]`` loads the trust (``D/pki``), the
identities (``D/identities.json``) and the fault knobs (``D/faults.json``), binds three free
loopback ports, serves until SIGTERM/SIGINT, and writes ``D/run/services.json`` (pid, ports,
URLs) only once every listener accepts connections. MAA's issuer and the vault URL are the
loopback URLs of their own listeners, so the ports are bound before the applications are made.
With ``--wait-for-inputs`` it first waits for ``D/run/inputs.ready`` (``up`` starts it before
the keys exist, so that its imports overlap key generation).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import ssl
import sys
import time
from pathlib import Path

from aiohttp import web

from testbed import imds, keyvault, maa
from testbed.env import RunRecords, vm_id, write_json
from testbed.faults import Faults
from testbed.identities import Identities
from testbed.pki import Trust
from testbed.vtpm import recorded_ak_public

HOST = "127.0.0.1"
SERVICES = ("imds", "maa", "keyvault")
FAULTS_FILE = "faults.json"

log = logging.getLogger("testbed.services")


def _listen(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def tls_context(pki_dir: Path, stem: str = "tls") -> ssl.SSLContext:
    """A server context presenting ``pki/<stem>.pem`` (the leaf, then the issuing CA)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(pki_dir / f"{stem}.pem", pki_dir / f"{stem}.key")
    return ctx


async def serve(directory: Path, stop: asyncio.Event, host: str = HOST) -> None:
    """Serve the three applications until ``stop`` is set."""
    pki_dir = directory / "pki"
    trust = Trust.load(pki_dir)
    identities = Identities.load(directory)
    faults = Faults(directory / FAULTS_FILE)
    socks = {name: _listen(host) for name in SERVICES}
    ports = {name: int(s.getsockname()[1]) for name, s in socks.items()}
    urls = {
        "imds": f"http://{host}:{ports['imds']}",
        "maa": f"https://{host}:{ports['maa']}",
        "keyvault": f"https://{host}:{ports['keyvault']}",
    }
    instance = imds.Instance.for_identities(identities, vm_id(directory))
    apps = {
        "imds": imds.make_app(
            trust,
            faults,
            identities,
            instance=instance,
            ak_public=lambda: recorded_ak_public(directory / "vtpm"),
        ),
        "maa": maa.make_app(trust, faults, issuer=urls["maa"]),
        "keyvault": keyvault.make_app(
            trust, faults, identities, vault_url=urls["keyvault"], maa_ca_bundle=pki_dir / "ca.pem"
        ),
    }
    # MAA presents its own TLS certificate; Key Vault its TLS service certificate, the one
    # that also signs its release answers.
    contexts = {"maa": tls_context(pki_dir, "tls"), "keyvault": tls_context(pki_dir, "kv-tls")}
    runners: list[web.AppRunner] = []
    try:
        for name in SERVICES:
            runner = web.AppRunner(apps[name], access_log=None, handle_signals=False)
            await runner.setup()
            runners.append(runner)
            site = web.SockSite(runner, socks[name], ssl_context=contexts.get(name))
            await site.start()
        records = RunRecords(directory)
        write_json(records.services_file, {"pid": os.getpid(), "ports": ports, "urls": urls})
        log.info("serving: %s", " ".join(f"{n}={u}" for n, u in urls.items()))
        await stop.wait()
        info = records.services()
        if info is not None and info.get("pid") == os.getpid():
            records.services_file.unlink(missing_ok=True)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        for sock in socks.values():
            sock.close()


async def _main(directory: Path) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await serve(directory, stop)


def wait_for_inputs(directory: Path, timeout_s: float) -> None:
    """Wait until ``up`` has written the trust and identities (it starts this process first so
    that the imports overlap key generation)."""
    marker = RunRecords(directory).inputs_marker
    deadline = time.monotonic() + timeout_s
    while not marker.exists():
        if time.monotonic() >= deadline:
            raise ValueError(f"{marker} did not appear within {timeout_s:.0f} s")
        time.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.services",
        description="Serve the testbed's IMDS, MAA and Key Vault.",
    )
    parser.add_argument("--dir", type=Path, required=True, help="the testbed directory")
    parser.add_argument(
        "--wait-for-inputs",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for run/inputs.ready before loading the trust",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        if args.wait_for_inputs > 0:
            wait_for_inputs(args.dir.resolve(), args.wait_for_inputs)
        asyncio.run(_main(args.dir.resolve()))
    except (OSError, ValueError, KeyError) as exc:
        print(f"testbed.services: services-failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
