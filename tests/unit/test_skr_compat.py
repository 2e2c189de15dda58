"""The AzureAttestSKR compatibility backend without running anything (argv, output parsing),
and how ``unseal --skr`` picks its backend and its key.

Running the tool (a fake that checks the real tool's CLI) is in tests/integration/test_skr.py.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from confinfer import skr_compat
from confinfer.config import Config
from confinfer.errors import ConfigError, KeyReleaseError, UsageError
from loader import skr as loader_skr

pytestmark = pytest.mark.unit

KID = "https://myvault.vault.azure.net/keys/model-kek/0123456789abcdef"
MAA = "https://sharedeus2.eus2.attest.azure.net"

CFG = Config(maa_url=MAA + "/")


def test_command_is_the_tutorials() -> None:
    argv = skr_compat.command(Path("/opt/AzureAttestSKR"), MAA + "/", KID, b"\x00" * 256)
    assert argv[:7] == ["/opt/AzureAttestSKR", "-a", MAA, "-k", KID, "-c", "imds"]
    assert argv[7] == "-s" and base64.b64decode(argv[8]) == b"\x00" * 256
    assert argv[9:] == ["-u"]
    assert skr_compat.shown(argv) == (
        f"/opt/AzureAttestSKR -a {MAA} -k {KID} -c imds -s '<base64 wrapped DEK, 256 bytes>' -u"
    )


def test_missing_or_unconfigured_tool(tmp_path: Path) -> None:
    for path in (None, tmp_path / "nope", tmp_path):
        with pytest.raises(ConfigError) as err:
            skr_compat.unwrap_dek(path, CFG, KID, b"x")  # type: ignore[arg-type]
        assert err.value.reason == "skr-tool-missing"
    not_exec = tmp_path / "AzureAttestSKR"
    not_exec.write_text("#!/bin/sh\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        skr_compat.unwrap_dek(not_exec, CFG, KID, b"x")
    assert err.value.reason == "skr-tool-missing"


@given(dek=st.binary(min_size=32, max_size=32).filter(lambda b: any(c >= 0x7F for c in b)))
def test_output_parsing_round_trips(dek: bytes) -> None:
    assert skr_compat.parse_output(dek) == dek
    assert skr_compat.parse_output(dek + b"\n") == dek
    assert skr_compat.parse_output(base64.b64encode(dek) + b"\r\n") == dek
    assert skr_compat.parse_output(b"  " + base64.b64encode(dek)) == dek


@pytest.mark.parametrize("out", [b"", b"\n", bytes(31), bytes(33), bytes(64),
                                 base64.b64encode(bytes(16)), b"not base64 at all, not at all!",
                                 b"The released key is of type RSA.\n",
                                 b"The released key is of type RSA.", b" " + bytes(32)])
def test_output_of_the_wrong_size_is_refused(out: bytes) -> None:
    with pytest.raises(KeyReleaseError) as err:
        skr_compat.parse_output(out)
    assert err.value.reason == "skr-tool-output"


# --- which backend and which key `unseal --skr` uses ---------------------------------------

PKG_KID = "https://myvault.vault.azure.net/keys/pkg-kek/aaaa"
CFG_KID = "https://myvault.vault.azure.net/keys/cfg-kek/bbbb"


def test_key_id_precedence() -> None:
    cfg = Config(key_id=CFG_KID)
    assert loader_skr.choose_key_id(KID, PKG_KID, cfg) == KID
    assert loader_skr.choose_key_id(None, PKG_KID, cfg) == PKG_KID
    assert loader_skr.choose_key_id(None, None, cfg) == CFG_KID
    # An offline-sealed package names a fingerprint, not a key Key Vault could release.
    assert loader_skr.choose_key_id(None, "sha256:" + "0" * 64, cfg) == CFG_KID
    with pytest.raises(UsageError) as err:
        loader_skr.choose_key_id(None, None, Config())
    assert err.value.reason == "no-key-id"


def request(**kw: Any) -> loader_skr.SkrRequest:
    return loader_skr.SkrRequest(**({"key_id": None, "maa_url": None, "skr_tool": None} | kw))


def test_backend_selection(tmp_path: Path) -> None:
    tool = tmp_path / "AzureAttestSKR"
    tool.write_text("#!/bin/sh\nexit 1\n", encoding="utf-8")
    tool.chmod(0o755)
    cfg = Config()
    native = loader_skr.unwrapper_for(request(maa_url="https://other.attest.azure.net"), None, cfg)
    assert isinstance(native, loader_skr.SkrUnwrapper)
    assert native._cfg.maa_url == "https://other.attest.azure.net"
    with pytest.raises(UsageError) as err:
        loader_skr.unwrapper_for(request(), tmp_path / "kek.pem", cfg)
    assert "--skr and --kek-private-key" in err.value.message
    compat = loader_skr.unwrapper_for(request(skr_tool=tool, key_id=KID), None, cfg)
    assert isinstance(compat, loader_skr.CompatUnwrapper)
    # A configured tool selects the compatibility backend too.
    configured = loader_skr.unwrapper_for(request(), None, Config(skr_tool=tool))
    assert isinstance(configured, loader_skr.CompatUnwrapper)


def test_tool_cannot_release_for_an_offline_sealed_package(tmp_path: Path) -> None:
    tool = tmp_path / "AzureAttestSKR"
    tool.write_text("#!/bin/sh\nexit 1\n", encoding="utf-8")
    tool.chmod(0o755)
    compat = loader_skr.CompatUnwrapper(tool, Config(key_id=CFG_KID))
    with pytest.raises(UsageError) as err:
        compat.unwrap(b"wrapped", "sha256:" + "0" * 64)
    assert err.value.reason == "no-key-id"
