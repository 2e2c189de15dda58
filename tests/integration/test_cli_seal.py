"""``confinfer seal``, ``inspect`` and ``unseal`` as real processes: round trip, one-line
failures, SIGTERM mid-unseal, a full tmpfs, the progress line on a terminal, and Key Vault
wrapping against the testbed's vault."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time
from pathlib import Path

import pytest

from tests import sealedref
from tests.cli import (
    assert_refused,
    confinfer_command,
    interrupt_midway,
    run_confinfer,
    small_tmpfs,
)
from tests.integration.conftest import RunningTestbed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MiB = 1 << 20


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("keys")
    private, public = sealedref.write_pem(directory, 0)
    other, _ = sealedref.write_pem(directory, 1)
    return {"private": private, "public": public, "other": other}


def make_model(root: Path, big: int = 3 * MiB + 7) -> Path:
    files = {
        "config.json": b'{"architectures": ["LlamaForCausalLM"]}',
        "model-00001.safetensors": os.urandom(big),
        "tokenizer/tokenizer.json": os.urandom(5000),
        "tokenizer/empty": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "empty-dir").mkdir()
    return root


def test_seal_inspect_unseal_round_trip(tmp_path: Path, keys: dict[str, Path]) -> None:
    model = make_model(tmp_path / "model")
    sealed = run_confinfer(
        "seal",
        model,
        "--out",
        tmp_path / "pkg",
        "--kek-public-key",
        keys["public"],
        "--chunk-size",
        "1MiB",
    )
    assert sealed.returncode == 0, sealed.stderr
    assert "sealed 4 files" in sealed.stderr and "\r" not in sealed.stderr  # no bar on a pipe

    inspected = run_confinfer("inspect", tmp_path / "pkg")
    assert inspected.returncode == 0, inspected.stderr
    info = json.loads(inspected.stdout)
    assert info["header"]["chunk_size"] == MiB
    assert info["header"]["chunk_count"] == 1 + 4 + 1  # config, 3 MiB + 7, tokenizer.json
    assert info["header"]["key_id"] == sealedref.fingerprint(0)
    assert {f["path"] for f in info["header"]["manifest"]["files"]} == {
        "config.json",
        "model-00001.safetensors",
        "tokenizer/tokenizer.json",
        "tokenizer/empty",
    }
    assert info["structure"]["file_bytes"] == (tmp_path / "pkg/model.sealed").stat().st_size

    unsealed = run_confinfer(
        "unseal",
        tmp_path / "pkg",
        "--dest",
        tmp_path / "out",
        "--kek-private-key",
        keys["private"],
        "--max-bytes",
        "4M",
    )
    assert unsealed.returncode == 0, unsealed.stderr
    assert sealedref.tree(tmp_path / "out") == sealedref.tree(model)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o700


def test_failures_are_one_line_and_leave_nothing(tmp_path: Path, keys: dict[str, Path]) -> None:
    model = make_model(tmp_path / "model", big=100_000)
    assert (
        run_confinfer(
            "seal",
            model,
            "--out",
            tmp_path / "pkg",
            "--kek-public-key",
            keys["public"],
            "--chunk-size",
            "16K",
        ).returncode
        == 0
    )
    dest = tmp_path / "dest"

    def unseal(pkg: Path, *extra: str | Path) -> subprocess.CompletedProcess[str]:
        return run_confinfer("unseal", pkg, "--dest", dest, *extra)

    assert_refused(unseal(tmp_path / "pkg", "--kek-private-key", keys["other"]), "key-mismatch")
    assert not dest.exists()
    assert_refused(
        unseal(tmp_path / "pkg", "--kek-private-key", keys["private"], "--max-bytes", "1000"),
        "size-limit",
    )
    assert not dest.exists()

    data = bytearray((tmp_path / "pkg/model.sealed").read_bytes())
    data[-100] ^= 1
    sealedref.install(bytes(data), tmp_path / "tampered")
    assert_refused(
        unseal(tmp_path / "tampered", "--kek-private-key", keys["private"]), "chunk-integrity"
    )
    assert not dest.exists()
    sealedref.install(bytes(data[:-1]), tmp_path / "cut")
    assert_refused(run_confinfer("inspect", tmp_path / "cut"), "truncated")

    dest.mkdir()
    (dest / "x").write_text("keep")
    assert_refused(unseal(tmp_path / "pkg", "--kek-private-key", keys["private"]), "dest-not-empty")
    assert (dest / "x").read_text() == "keep"
    assert_refused(unseal(tmp_path / "pkg"), "no-key")
    assert_refused(
        unseal(tmp_path / "model", "--kek-private-key", keys["private"]), "package-unreadable"
    )


def test_seal_refuses_links_and_leaves_no_package(tmp_path: Path, keys: dict[str, Path]) -> None:
    model = make_model(tmp_path / "model", big=10)
    (model / "tokenizer/alias.json").symlink_to(model / "tokenizer/tokenizer.json")
    result = run_confinfer(
        "seal", model, "--out", tmp_path / "pkg", "--kek-public-key", keys["public"]
    )
    assert_refused(result, "unsupported-file")
    assert "symbolic link" in result.stderr
    assert not (tmp_path / "pkg").exists()
    bad = run_confinfer(
        "seal",
        model,
        "--out",
        tmp_path / "pkg",
        "--kek-public-key",
        keys["public"],
        "--chunk-size",
        "lots",
    )
    assert bad.returncode == 64 and "not a size" in bad.stderr


def test_sigterm_mid_unseal_wipes(tmp_path: Path, keys: dict[str, Path]) -> None:
    # 2 MiB in 16-byte chunks: 131072 chunks keep the unseal busy for a while. Built by the
    # reference writer, which is quicker at this than the threaded one.
    spec = sealedref.Spec(files={"weights.bin": os.urandom(2 * MiB)}, chunk_size=16)
    sealedref.install(sealedref.build(spec), tmp_path / "pkg")
    dest = tmp_path / "dest"
    target = dest / "weights.bin"
    returncode, stderr = interrupt_midway(
        ["unseal", tmp_path / "pkg", "--dest", dest, "--kek-private-key", keys["private"]],
        started=lambda: target.stat().st_size > 0,
    )
    assert returncode == 130, stderr
    assert stderr.startswith("confinfer: interrupted: "), stderr
    assert not dest.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_full_tmpfs_fails_cleanly(tmp_path: Path, keys: dict[str, Path]) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "a.bin").write_bytes(os.urandom(700_000))
    (model / "b.bin").write_bytes(os.urandom(700_000))
    assert (
        run_confinfer(
            "seal",
            model,
            "--out",
            tmp_path / "pkg",
            "--kek-public-key",
            keys["public"],
            "--chunk-size",
            "64K",
        ).returncode
        == 0
    )
    with small_tmpfs(tmp_path / "mnt", "1m") as mnt:
        result = run_confinfer(
            "unseal",
            tmp_path / "pkg",
            "--dest",
            mnt / "model",
            "--kek-private-key",
            keys["private"],
        )
        assert_refused(result, "no-space")
        assert list(mnt.iterdir()) == []
        # Unsealing into the mount point itself (an existing empty directory) empties it.
        result = run_confinfer(
            "unseal", tmp_path / "pkg", "--dest", mnt, "--kek-private-key", keys["private"]
        )
        assert_refused(result, "no-space")
        assert list(mnt.iterdir()) == []


def test_progress_line_on_a_terminal(tmp_path: Path, keys: dict[str, Path]) -> None:
    model = make_model(tmp_path / "model", big=2 * MiB)
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            confinfer_command(
                "seal", model, "--out", tmp_path / "pkg", "--kek-public-key", keys["public"]
            ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=terminal,
        )
        os.close(terminal)
        terminal = -1
        output = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(controller, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=60) == 0, output
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    text = output.decode()
    assert "\rseal" in text and "100.0%" in text and "/s" in text, text


# -- Key Vault (the testbed's emulator, real SDK) -----------------------------------------------


def test_seal_with_key_vault_and_unseal_through_it(tmp_path: Path, testbed: RunningTestbed) -> None:
    kid = testbed.env["CONFINFER_KEY_ID"]
    env = testbed.environ()
    model = make_model(tmp_path / "model", big=300_000)
    sealed = run_confinfer("seal", model, "--out", tmp_path / "pkg", "--key-id", kid, env=env)
    assert sealed.returncode == 0, sealed.stderr
    header = json.loads(run_confinfer("inspect", tmp_path / "pkg").stdout)["header"]
    # Key Vault answers with the versioned key id; the package pins it.
    assert header["key_id"].startswith(kid.rstrip("/") + "/") or header["key_id"] == kid

    unsealed = run_confinfer(
        "unseal", tmp_path / "pkg", "--dest", tmp_path / "out", "--key-id", kid, env=env
    )
    assert unsealed.returncode == 0, unsealed.stderr
    assert sealedref.tree(tmp_path / "out") == sealedref.tree(model)

    other = kid.rsplit("/keys/", 1)[0] + "/keys/another-key"
    assert_refused(
        run_confinfer(
            "unseal", tmp_path / "pkg", "--dest", tmp_path / "o2", "--key-id", other, env=env
        ),
        "key-mismatch",
    )
    assert not (tmp_path / "o2").exists()


def test_key_vault_refusals_are_one_line(tmp_path: Path, testbed: RunningTestbed) -> None:
    kid = testbed.env["CONFINFER_KEY_ID"]
    model = make_model(tmp_path / "model", big=10)
    noroles = testbed.environ(
        CONFINFER_MANAGED_IDENTITY_CLIENT_ID=testbed.env["CONFINFER_TESTBED_NOROLE_CLIENT_ID"]
    )
    assert_refused(
        run_confinfer("seal", model, "--out", tmp_path / "pkg", "--key-id", kid, env=noroles),
        "keyvault-forbidden",
    )
    assert not (tmp_path / "pkg").exists()
    missing = kid.rsplit("/keys/", 1)[0] + "/keys/no-such-key"
    assert_refused(
        run_confinfer(
            "seal", model, "--out", tmp_path / "pkg", "--key-id", missing, env=testbed.environ()
        ),
        "key-not-found",
    )
    assert_refused(
        run_confinfer(
            "seal",
            model,
            "--out",
            tmp_path / "pkg",
            "--key-id",
            "http://not-a-vault/x",
            env=testbed.environ(),
        ),
        "key-id-invalid",  # a flag's value: a usage error (64), not the configuration's
    )
    assert not (tmp_path / "pkg").exists()


def test_the_tutorials_habits_get_a_pointer_not_a_puzzle(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    model = make_model(tmp_path / "model", big=1000)
    renamed = run_confinfer(
        "seal", model, "--output-dir", tmp_path / "o", "--kek-public-key", keys["public"]
    )
    assert renamed.returncode == 64, renamed.stderr
    assert "--output-dir is the tutorial's flag; confinfer seal takes --out PKG_DIR" in (
        renamed.stderr
    )
    assert not (tmp_path / "o").exists()
    private = run_confinfer(
        "seal", model, "--out", tmp_path / "p", "--kek-public-key", keys["private"]
    )
    assert private.returncode == 64, private.stderr
    first, hint = private.stderr.strip().splitlines()
    assert first.endswith("not a PEM public key or certificate (it holds a private key)")
    assert hint.startswith("hint: give the public half: openssl pkey -in KEY.pem -pubout")
    assert not (tmp_path / "p").exists()
