"""A package's key id is a hint, never an address (DESIGN.md §8, docs/threat-model.md).

A storage attacker who can rewrite a package's header names a key on a vault of their own. The
header is authenticated only by the DEK the key yields, so whatever it names must be checked
against the configuration before anything leaves the VM: the hostile vault, a listener on
loopback here, must not see a single connection, on any key path (Secure Key Release, Key
Vault unwrapKey, AzureAttestSKR), and the unseal must end as one ``key-mismatch`` line.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from confinfer.errors import Reason
from tests import sealedref
from tests.cli import assert_refused, run_confinfer
from tests.integration.conftest import RunningTestbed

pytestmark = pytest.mark.integration


class Listener:
    """A TCP listener on loopback that counts the connections it is offered."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def hostile() -> Iterator[Listener]:
    listener = Listener()
    yield listener
    listener.close()


def forged_package(tmp_path: Path, key_id: str) -> Path:
    spec = sealedref.Spec(files={"weights.bin": os.urandom(300)}, key_id=key_id)
    return sealedref.install(sealedref.build(spec), tmp_path / "pkg")


def hostile_kid(listener: Listener) -> str:
    return f"https://127.0.0.1:{listener.port}/keys/model-kek/0123456789abcdef"


@pytest.mark.parametrize(
    "key_path",
    [
        ["--skr"],  # Secure Key Release
        [],  # Key Vault unwrapKey with the configured key
    ],
    ids=["skr", "unwrapkey"],
)
def test_a_package_naming_a_foreign_vault_is_refused_before_any_request(
    testbed: RunningTestbed, hostile: Listener, tmp_path: Path, key_path: list[str]
) -> None:
    pkg = forged_package(tmp_path, hostile_kid(hostile))
    dest = tmp_path / "dest"
    done = run_confinfer("unseal", pkg, "--dest", dest, *key_path, env=testbed.environ())
    assert_refused(done, "key-mismatch")
    assert "not a configured key" in done.stderr
    assert hostile.connections == 0
    assert not dest.exists() or not any(dest.iterdir())


def test_the_same_vault_but_another_key_is_refused_too(
    testbed: RunningTestbed, tmp_path: Path
) -> None:
    configured = testbed.env["CONFINFER_KEY_ID"]
    vault = configured.split("/keys/")[0]
    pkg = forged_package(tmp_path, f"{vault}/keys/attacker-kek")
    done = run_confinfer("unseal", pkg, "--dest", tmp_path / "d", "--skr", env=testbed.environ())
    assert_refused(done, "key-mismatch")


def test_an_allowed_key_may_be_selected_by_the_package(
    testbed: RunningTestbed, hostile: Listener, tmp_path: Path
) -> None:
    """keyvault_allowed_keys widens the choice; the hint then selects (and here, the allowed
    host is the hostile listener itself, so a connection proves the request went there)."""
    pkg = forged_package(tmp_path, hostile_kid(hostile))
    done = run_confinfer(
        "unseal",
        pkg,
        "--dest",
        tmp_path / "d",
        env=testbed.environ(
            CONFINFER_KEYVAULT_ALLOWED_KEYS=hostile_kid(hostile),
            CONFINFER_MAX_RETRIES="0",
            CONFINFER_HTTP_TIMEOUT_S="2",
        ),
    )
    assert done.returncode == Reason.KEYVAULT_UNAVAILABLE.exit_code, done.stderr
    assert hostile.connections >= 1


def test_no_configured_key_means_no_request(
    testbed: RunningTestbed, hostile: Listener, tmp_path: Path
) -> None:
    pkg = forged_package(tmp_path, hostile_kid(hostile))
    done = run_confinfer(
        "unseal", pkg, "--dest", tmp_path / "d", "--skr", env=testbed.environ(CONFINFER_KEY_ID="")
    )
    assert_refused(done, "no-key-id")
    assert hostile.connections == 0


def test_the_azureattestskr_backend_gets_the_configured_key(
    testbed: RunningTestbed, hostile: Listener, tmp_path: Path
) -> None:
    tool = testbed.env.get("CONFINFER_TESTBED_SKR_TOOL")
    if tool is None:
        pytest.fail("the testbed exports no stand-in AzureAttestSKR")
    pkg = forged_package(tmp_path, hostile_kid(hostile))
    done = run_confinfer(
        "unseal", pkg, "--dest", tmp_path / "d", "--skr", "--skr-tool", tool, env=testbed.environ()
    )
    assert_refused(done, "key-mismatch")
    assert hostile.connections == 0
    log = testbed.dir / "run" / "azureattestskr.log"
    runs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    assert not any(hostile_kid(hostile) in json.dumps(run) for run in runs)


def test_a_forged_key_id_reaches_the_terminal_escaped(
    testbed: RunningTestbed, tmp_path: Path
) -> None:
    """The header's key id is attacker text: it must not forge journal lines or escapes."""
    forged = "https://127.0.0.1:1/keys/k\n<0>confinfer: all good\x1b[2J"
    pkg = forged_package(tmp_path, forged)
    done = run_confinfer(
        "unseal", pkg, "--dest", tmp_path / "d", "--skr", env=testbed.environ(JOURNAL_STREAM="8:1")
    )
    assert done.returncode == Reason.KEY_MISMATCH.exit_code, done.stderr
    lines = done.stderr.splitlines()
    assert all(line.startswith("<") for line in lines), lines
    assert not any(line.startswith("<0>") for line in lines)
    assert "\x1b" not in done.stderr
    assert "\\n<0>confinfer: all good\\x1b[2J" in done.stderr


def test_a_release_signed_for_another_host_is_refused(
    testbed: RunningTestbed, tmp_path: Path
) -> None:
    """The vault answers with a release signed by a certificate from the trusted chain, but
    one issued for evil.example: not the vault that was asked, so not believed."""
    pkg = tmp_path / "pkg"
    src = tmp_path / "model"
    src.mkdir()
    (src / "weights.bin").write_bytes(os.urandom(1000))
    sealed = run_confinfer(
        "seal",
        src,
        "--out",
        pkg,
        "--key-id",
        testbed.env["CONFINFER_KEY_ID"],
        env=testbed.environ(),
    )
    assert sealed.returncode == 0, sealed.stderr
    testbed.cli("fault", "kv-release", "--foreign-signer")
    try:
        done = run_confinfer(
            "unseal", pkg, "--dest", tmp_path / "d", "--skr", env=testbed.environ()
        )
    finally:
        testbed.cli("fault", "--clear")
    assert done.returncode == Reason.RELEASE_SIGNATURE_INVALID.exit_code, done.stderr
    assert "confinfer: release-signature-invalid: " in done.stderr
    assert "not valid for 127.0.0.1" in done.stderr
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())
