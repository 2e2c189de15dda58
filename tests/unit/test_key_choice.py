"""The key-trust rule: a package's key id may select among configured keys, never add one."""

from __future__ import annotations

import pytest

from confinfer.config import Config
from confinfer.errors import ConfinferError, Reason
from confinfer.keyvault import KeyId, choose_key

pytestmark = pytest.mark.unit

CFG_KID = "https://myvault.vault.azure.net/keys/cfg-kek/bbbb"
OTHER = "https://othervault.vault.azure.net/keys/other-kek"


def refused(cfg: Config, hint: str | None) -> Reason:
    with pytest.raises(ConfinferError) as err:
        choose_key(cfg, hint)
    return err.value.reason


def test_the_configured_key_without_a_hint() -> None:
    cfg = Config(key_id=CFG_KID)
    assert str(choose_key(cfg, None)) == CFG_KID
    # An offline-sealed package names a fingerprint, not a key Key Vault could release.
    assert str(choose_key(cfg, "sha256:" + "0" * 64)) == CFG_KID
    assert refused(Config(), None) == Reason.NO_KEY_ID
    assert refused(Config(), CFG_KID) == Reason.NO_KEY_ID


@pytest.mark.parametrize(
    "hint",
    [
        "https://evil.example/keys/cfg-kek/bbbb",  # another host
        "https://myvault.vault.azure.net.evil.example/keys/cfg-kek/bbbb",
        "https://myvault.vault.azure.net:8443/keys/cfg-kek/bbbb",  # another port
        "https://myvault.vault.azure.net/keys/other-kek/bbbb",  # another key
        "https://myvault.vault.azure.net/keys/cfg-kek/cccc",  # another version of a pinned key
        "http://myvault.vault.azure.net/keys/cfg-kek/bbbb",  # not https
        "not a url",
        "",
        "https://user@myvault.vault.azure.net/keys/cfg-kek/bbbb",
    ],
)
def test_anything_else_is_a_key_mismatch(hint: str) -> None:
    cfg = Config(key_id=CFG_KID)
    if hint == "":
        assert str(choose_key(cfg, hint)) == CFG_KID
        return
    assert refused(cfg, hint) == Reason.KEY_MISMATCH


def test_a_versionless_configured_key_lets_the_package_pick_the_version() -> None:
    cfg = Config(key_id="https://MyVault.vault.azure.net/keys/cfg-kek")
    chosen = choose_key(cfg, "https://myvault.vault.azure.net/keys/cfg-kek/dddd")
    assert chosen == KeyId("https://myvault.vault.azure.net", "cfg-kek", "dddd")


def test_allowed_keys_widen_the_choice() -> None:
    cfg = Config(key_id=CFG_KID, keyvault_allowed_keys=(OTHER,))
    assert str(choose_key(cfg, OTHER + "/v2")) == OTHER + "/v2"
    assert str(choose_key(cfg, CFG_KID)) == CFG_KID


def test_the_audience_comes_from_the_host_name_only() -> None:
    assert KeyId.parse(CFG_KID).audience == "https://vault.azure.net"
    assert KeyId.parse("https://h.managedhsm.azure.net/keys/k").audience == (
        "https://managedhsm.azure.net"
    )
    assert KeyId.parse("https://127.0.0.1:8443/keys/k").audience == "https://vault.azure.net"


def test_one_set_of_release_algorithms() -> None:
    from confinfer import config, keyvault

    assert set(keyvault.SKR_ALGORITHMS) == set(config.SKR_ALGORITHMS)
