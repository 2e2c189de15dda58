"""model-loader's Blob source against Azurite, Microsoft's Blob Storage emulator, over TLS from
the testbed's CA, with OAuth: the loader authenticates with the VM's managed identity (the
testbed's IMDS issues the storage token), exactly as on Azure.

Only the test itself uses the emulator's well-known account key, to upload. A hostile blob name
(``..``) cannot be sent through the SDK (the HTTP client folds the dot segments before signing),
so it is uploaded by hand with a container SAS and a percent-encoded path.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import json
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from confinfer.errors import Reason
from tests.attestd_proc import Attestd, running, wait_for
from tests.integration.conftest import RunningTestbed
from tests.integration.test_model_loader_testbed import (
    Packages,
    assert_failed,
    assert_wiped,
    loader,
    mounted,
    seal,
    tiny_model,
    workdir,
)
from tests.tutorial_pkg import files_of

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
AZURITE = ROOT / ".cache" / "node" / "node_modules" / ".bin" / "azurite-blob"
ACCOUNT = "devstoreaccount1"
# Azurite's published development account key (not a secret: every Azurite has it).
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
CONTAINER = "models"


@dataclass(frozen=True)
class Azurite:
    port: int
    ca: Path

    @property
    def account_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/{ACCOUNT}"

    def url(self, prefix: str) -> str:
        return f"{self.account_url}/{CONTAINER}/{prefix}"

    def container(self) -> Any:
        from azure.core.credentials import AzureNamedKeyCredential
        from azure.storage.blob import ContainerClient

        return ContainerClient(
            self.account_url,
            CONTAINER,
            credential=AzureNamedKeyCredential(ACCOUNT, ACCOUNT_KEY),
            connection_verify=str(self.ca),
        )

    def put_raw(self, encoded_name: str, body: bytes) -> None:
        """Upload under a name the SDK cannot send (already percent-encoded)."""
        from azure.storage.blob import ContainerSasPermissions, generate_container_sas

        sas = generate_container_sas(
            ACCOUNT,
            CONTAINER,
            account_key=ACCOUNT_KEY,
            permission=ContainerSasPermissions(write=True, create=True),
            expiry=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=10),
        )
        context = ssl.create_default_context(cafile=str(self.ca))
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=context, timeout=30)
        try:
            conn.request(
                "PUT",
                f"/{ACCOUNT}/{CONTAINER}/{encoded_name}?{sas}",
                body=body,
                headers={"x-ms-blob-type": "BlockBlob", "x-ms-version": "2021-08-06"},
            )
            answer = conn.getresponse()
            assert answer.status == 201, answer.read()
        finally:
            conn.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def azurite(testbed: RunningTestbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    if not AZURITE.exists():
        pytest.skip(f"{AZURITE} is missing: run scripts/setup-env")
    data = tmp_path_factory.mktemp("azurite")
    pki = testbed.dir / "pki"
    port = _free_port()
    log = (data / "log").open("wb")
    proc = subprocess.Popen(
        [
            str(AZURITE),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(port),
            "--location",
            str(data / "store"),
            "--skipApiVersionCheck",
            "--disableTelemetry",
            "--cert",
            str(pki / "tls.pem"),
            "--key",
            str(pki / "tls.key"),
            "--oauth",
            "basic",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def listening() -> bool | None:
            assert proc.poll() is None, (data / "log").read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return True
            return None

        wait_for("Azurite", listening, 60)
        emulator = Azurite(port, pki / "ca.pem")
        with emulator.container() as container:
            container.create_container()
        yield emulator
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


@pytest.fixture(scope="module")
def packages(testbed: RunningTestbed, tmp_path_factory: pytest.TempPathFactory) -> Packages:
    base = tmp_path_factory.mktemp("packages")
    model = tiny_model(base / "Tiny")
    return Packages(model, seal(testbed, model, base / "sealed"), base / "unused")


@pytest.fixture(scope="module")
def attestd(testbed: RunningTestbed) -> Iterator[Attestd]:
    with running(testbed.env) as daemon:
        yield daemon


def upload(azurite: Azurite, package: Path, prefix: str) -> None:
    with azurite.container() as container:
        for path in sorted(package.iterdir()):
            container.upload_blob(f"{prefix}{path.name}", path.read_bytes(), overwrite=True)


def test_serves_a_package_from_blob_storage_with_the_managed_identity(
    testbed: RunningTestbed, attestd: Attestd, azurite: Azurite, packages: Packages
) -> None:
    upload(azurite, packages.sealed, "tiny/v1/")
    with azurite.container() as container:
        container.upload_blob("tiny/v1/NOTES.txt", b"not part of the package", overwrite=True)
    source = azurite.url("tiny/v1")
    with workdir() as work:
        state = work / "state"
        state.mkdir(mode=0o700)
        with loader(testbed, attestd, work, source, STATE_DIRECTORY=str(state)) as run:
            run.wait_ready()
            assert any(s.startswith("downloading the package from ") for s in run.statuses())
            assert files_of(packages.model) == files_of(run.target)
            assert json.loads(run.handoff.read_text("utf-8"))["source"] == source
            assert list(state.iterdir()) == []  # the staged ciphertext is gone once unsealed
            assert not (run.target / "NOTES.txt").exists()
            run.proc.send_signal(signal.SIGTERM)
            assert run.wait_exit() == 0, run.log()
            assert_wiped(run)


def test_a_hostile_listing_is_refused_before_any_download(
    testbed: RunningTestbed, attestd: Attestd, azurite: Azurite, packages: Packages
) -> None:
    upload(azurite, packages.sealed, "evil/")
    azurite.put_raw("evil/%2E%2E/x", b"escape")
    with azurite.container() as container:
        assert "evil/../x" in [b.name for b in container.list_blobs(name_starts_with="evil/")]
    with workdir() as work:
        state = work / "state"
        state.mkdir(mode=0o700)
        with loader(testbed, attestd, work, azurite.url("evil"), STATE_DIRECTORY=str(state)) as run:
            assert_failed(run, Reason.BLOB_NAME_UNSAFE)
            assert "'evil/../x'" in run.log()
            assert mounted(run.target) == []
            assert list(state.iterdir()) == []
        assert not (work / "x").exists() and not (work / "run" / "x").exists()


def test_an_empty_prefix_is_not_a_package(
    testbed: RunningTestbed, attestd: Attestd, azurite: Azurite
) -> None:
    with workdir() as work, loader(testbed, attestd, work, azurite.url("nothing-here")) as run:
        assert_failed(run, Reason.BLOB_NOT_FOUND)
        assert mounted(run.target) == []
