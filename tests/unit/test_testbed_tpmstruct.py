"""TPM 2.0 structure parsing (testbed.tpmstruct) against an independent encoder (tpm2-pytss)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed import tpmstruct
from testbed.pki import Trust
from tests.maa_evidence import GuestForge, tpm_name

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def base_forge() -> GuestForge:
    return GuestForge.create(Trust.create())


def test_tpm_name_matches_independent_encoder(base_forge: GuestForge) -> None:
    pub = base_forge.enc_public()
    parsed = tpmstruct.parse_public(bytes(pub.marshal()))
    assert parsed.name == tpm_name(pub)
    assert parsed.exponent == 65537
    assert parsed.key_bits == 2048


def test_policy_pcr_digest_matches_independent_computation(base_forge: GuestForge) -> None:
    pcrs = base_forge.pcrs
    assert tpmstruct.policy_pcr_digest(tpmstruct.Alg.SHA256, tuple(pcrs), list(pcrs.values())) == (
        base_forge.enc_public().publicArea.authPolicy.buffer
    )


def test_public_prefix_takes_the_leading_tpm2b_public(base_forge: GuestForge) -> None:
    pub = base_forge.ak_public()
    marshalled = bytes(pub.marshal())
    name = bytes(pub.get_name().marshal())
    # A whole TPM2_ReadPublic response: outPublic, name, qualifiedName.
    parsed, used = tpmstruct.parse_public_prefix(marshalled + name + name)
    assert used == len(marshalled)
    assert parsed == tpmstruct.parse_public(marshalled)
    assert parsed.name == tpm_name(pub)
    with pytest.raises(tpmstruct.TpmFormatError, match=f"{len(name) * 2} trailing bytes"):
        tpmstruct.parse_public(marshalled + name + name)
    with pytest.raises(tpmstruct.TpmFormatError, match="empty"):
        tpmstruct.parse_public_prefix(b"\x00\x00" + marshalled)
    with pytest.raises(tpmstruct.TpmFormatError, match="truncated"):
        tpmstruct.parse_public_prefix(marshalled[:-1])


def test_attest_rejects_trailing_bytes(base_forge: GuestForge) -> None:
    with pytest.raises(tpmstruct.TpmFormatError, match="1 trailing bytes"):
        tpmstruct.parse_attest(base_forge.quote() + b"\x00")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_parsers_fail_only_with_format_errors(data: bytes) -> None:
    for parse in (
        tpmstruct.parse_attest,
        tpmstruct.parse_public,
        tpmstruct.parse_signature,
        tpmstruct.parse_public_prefix,
    ):
        try:
            parse(data)
        except tpmstruct.TpmFormatError:
            pass


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=300), st.integers(min_value=0, max_value=255))
def test_corrupted_quote_parses_or_fails_cleanly(
    base_forge: GuestForge, offset: int, value: int
) -> None:
    quote = bytearray(base_forge.quote())
    quote[offset % len(quote)] = value
    try:
        tpmstruct.parse_attest(bytes(quote))
    except tpmstruct.TpmFormatError:
        pass


def test_quote_fields_read_back(base_forge: GuestForge) -> None:
    attest = tpmstruct.parse_attest(base_forge.quote())
    assert attest.type == tpmstruct.StAttest.QUOTE
    assert attest.qualified_signer == tpm_name(base_forge.ak_public())
    assert attest.clock == 987654
    assert attest.quote is not None
    (selection,) = attest.quote.selections
    assert (selection.hash_alg, selection.size_of_select, selection.pcrs) == (
        tpmstruct.Alg.SHA256,
        3,
        tuple(range(8)),
    )


def test_certify_names_the_key(base_forge: GuestForge) -> None:
    attest = tpmstruct.parse_attest(base_forge.certify_info())
    assert attest.certify is not None
    assert attest.certify.name == tpm_name(base_forge.enc_public())


def test_non_rsa_public_is_refused() -> None:
    ecc = bytes.fromhex("0023000b00000000") + bytes(12)
    with pytest.raises(tpmstruct.TpmFormatError, match="TPMT_PUBLIC type is ECC, not RSA"):
        tpmstruct.parse_tpmt_public(ecc)
