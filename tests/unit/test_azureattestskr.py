"""The AzureAttestSKR backend without running anything: its argv and reading its output.

The real tool prints the unwrapped key raw, with its trailing zero bytes stripped (it handles
the key as a C string), then a newline. Running a tool (the testbed's stand-in, which behaves
that way) is in tests/integration/test_cli_azureattestskr.py.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from confinfer.config import Config
from confinfer.errors import ConfigError, KeyReleaseError
from loader import azureattestskr

pytestmark = pytest.mark.unit

KID = "https://myvault.vault.azure.net/keys/model-kek/0123456789abcdef"
MAA = "https://sharedeus2.eus2.attest.azure.net"

CFG = Config(maa_url=MAA + "/")


def as_the_tool_prints(dek: bytes) -> bytes:
    return dek.rstrip(b"\0") + b"\n"


def test_command_is_the_tutorials() -> None:
    argv = azureattestskr.command(Path("/opt/AzureAttestSKR"), MAA + "/", KID, b"\x00" * 256)
    assert argv[:7] == ["/opt/AzureAttestSKR", "-a", MAA, "-k", KID, "-c", "imds"]
    assert argv[7] == "-s" and base64.b64decode(argv[8]) == b"\x00" * 256
    assert argv[9:] == ["-u"]
    assert azureattestskr.shown(argv) == (
        f"/opt/AzureAttestSKR -a {MAA} -k {KID} -c imds -s '<base64 wrapped DEK, 256 bytes>' -u"
    )


def test_missing_or_unconfigured_tool(tmp_path: Path) -> None:
    for path in (None, tmp_path / "nope", tmp_path):
        with pytest.raises(ConfigError) as err:
            azureattestskr.unwrap_dek(path, CFG, KID, b"x")  # type: ignore[arg-type]
        assert err.value.reason == "skr-tool-missing"
    not_exec = tmp_path / "AzureAttestSKR"
    not_exec.write_text("#!/bin/sh\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        azureattestskr.unwrap_dek(not_exec, CFG, KID, b"x")
    assert err.value.reason == "skr-tool-missing"


dek_bytes = st.binary(min_size=32, max_size=32).filter(lambda b: any(c >= 0x7F for c in b))


@given(dek=dek_bytes)
def test_the_real_tools_output_round_trips(dek: bytes) -> None:
    assert azureattestskr.parse_output(as_the_tool_prints(dek)) == dek


@given(head=st.binary(max_size=31), zeros=st.integers(min_value=1, max_value=31))
def test_keys_ending_in_zero_bytes_come_back_whole(head: bytes, zeros: int) -> None:
    """About one DEK in 256 ends in 0x00; the tool drops those bytes, we put them back."""
    body = (head + b"\xff" * 32)[: 31 - zeros] + b"\xff"
    dek = body + bytes(zeros)
    assert len(dek) == 32
    assert azureattestskr.parse_output(as_the_tool_prints(dek)) == dek


@pytest.mark.parametrize("tail", [b"\n", b"\n\n", b"\0\n", b"\n\0"])
def test_a_key_ending_in_newline_or_zero_bytes(tail: bytes) -> None:
    dek = (b"\xff" * 30 + tail)[:32].ljust(32, b"\0")
    assert azureattestskr.parse_output(as_the_tool_prints(dek)) == dek


@given(dek=dek_bytes)
def test_base64_output_is_read_too(dek: bytes) -> None:
    assert azureattestskr.parse_output(base64.b64encode(dek) + b"\r\n") == dek
    assert azureattestskr.parse_output(b"  " + base64.b64encode(dek)) == dek


@pytest.mark.parametrize(
    "out",
    [
        b"",
        b"\n",
        bytes(33),
        bytes(64),
        base64.b64encode(bytes(16)),
        b"not base64 at all, not at all!",
        b"The released key is of type RSA.\n",
        b"The released key is of type RSA.",
        b" " + bytes(32),
        b"Main started\n" + b"\xff" * 32 + b"\n",
    ],
)
def test_other_output_is_refused(out: bytes) -> None:
    with pytest.raises(KeyReleaseError) as err:
        azureattestskr.parse_output(out)
    assert err.value.reason == "skr-tool-output"
