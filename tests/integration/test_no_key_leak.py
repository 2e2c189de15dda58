"""No key material in any output, even at debug level with tracebacks on.

The test knows what the product must never print: the Key Vault stand-in holds the KEK (its
private key is in the vault's state), and with it the test unwraps the package's DEK. It then
runs seal and unseal --skr with --debug, successful and failing, and searches everything they
wrote for those keys in every encoding a log line might use.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from testbed.keystore import KeyStore
from tests.cli import run_confinfer
from tests.integration.conftest import RunningTestbed

pytestmark = pytest.mark.integration


def encodings(secret: bytes) -> set[str]:
    """Substrings by which ``secret`` (or a 16-byte window of it) would show in text."""
    found = set()
    for start in range(0, max(1, len(secret) - 16), 8):
        window = secret[start : start + 16]
        found |= {window.hex(), window.hex().upper()}
    # base64 of any aligned slice: try each of the three alignments.
    for shift in range(3):
        part = secret[shift : shift + 30]
        b64 = base64.b64encode(part).decode()[4:-4]
        found |= {b64, b64.replace("+", "-").replace("/", "_")}
    return {s for s in found if len(s) >= 16}


def test_debug_output_never_carries_the_dek_or_the_kek(
    testbed: RunningTestbed, tmp_path: Path
) -> None:
    kid = testbed.env["CONFINFER_KEY_ID"]
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(os.urandom(300_000))
    (model / "config.json").write_text("{}", encoding="utf-8")
    env = testbed.environ(SYSTEMD_LOG_LEVEL="debug")
    outputs = []

    sealed = run_confinfer(
        "--debug", "seal", model, "--out", tmp_path / "pkg", "--key-id", kid, env=env
    )
    assert sealed.returncode == 0, sealed.stderr
    outputs.append(sealed.stdout + sealed.stderr)

    done = run_confinfer(
        "--debug", "unseal", tmp_path / "pkg", "--dest", tmp_path / "out", "--skr", env=env
    )
    assert done.returncode == 0, done.stderr
    outputs.append(done.stdout + done.stderr)

    # A failure after the key was released: the model is over the size cap.
    failed = run_confinfer(
        "--debug",
        "unseal",
        tmp_path / "pkg",
        "--dest",
        tmp_path / "small",
        "--skr",
        "--max-bytes",
        "1000",
        env=env,
    )
    assert failed.returncode != 0
    outputs.append(failed.stdout + failed.stderr)

    # What must not appear: the KEK (as the vault holds it) and the DEK it wraps.
    name, version = kid.rstrip("/").split("/")[-2:]
    stored = KeyStore(testbed.dir / "keyvault").get(name, version)
    assert stored is not None
    kek = stored.private_key
    header = json.loads(run_confinfer("inspect", tmp_path / "pkg").stdout)["header"]
    dek = kek.decrypt(
        base64.b64decode(header["wrapped_dek"]),
        padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None),
    )
    pkcs8 = kek.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    private_d = kek.private_numbers().d.to_bytes(kek.key_size // 8, "big")
    needles = encodings(dek) | encodings(pkcs8[-300:]) | encodings(private_d)
    text = "\n".join(outputs)
    # The search would find a key printed in any of the usual ways (a check that can fail).
    for shown in (dek.hex(), base64.b64encode(dek).decode(), base64.b64encode(pkcs8).decode()):
        assert any(n in shown for n in needles)
    # Debug logging was really on: the run explains its steps.
    assert "attested with" in done.stderr and len(done.stderr.splitlines()) > 3
    leaked = sorted(n for n in needles if n in text)
    assert not leaked, f"key material in the output: {leaked[:3]}"
