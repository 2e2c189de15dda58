"""Data-key unwrapping through Secure Key Release: ``confinfer unseal --skr``.

Two :class:`~loader.keywrap.DekUnwrapper` backends:

- :class:`SkrUnwrapper`, the native one: opens the vTPM, attests to MAA, has Key Vault release
  the KEK to the vTPM's PCR-bound key, verifies Key Vault's signature, unwraps the KEK inside
  the vTPM and then the DEK with it (confinfer.skr). The KEK is dropped after the unwrap.
- :class:`CompatUnwrapper`: runs an installed AzureAttestSKR (``--skr-tool PATH``) the way
  the original tutorial does (confinfer.skr_compat).

Which KEK: ``--key-id`` when given; else the key id in the sealed package's header; else
``key_id`` from the configuration (``CONFINFER_KEY_ID``). The tutorial layout records no key id,
so it needs ``--key-id`` or the configured one. A package sealed offline (its key id is the
KEK's ``sha256:`` fingerprint) is unsealed only when the released KEK has that fingerprint.

Imports of the SKR machinery happen on use, so ``confinfer --help`` stays lean.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from confinfer.config import Config
from confinfer.errors import KeyUnwrapError, Reason, UsageError

if TYPE_CHECKING:
    from confinfer.skr import Timings
    from loader.keywrap import DekUnwrapper

LOG = logging.getLogger("confinfer.loader.skr")

FINGERPRINT_PREFIX = "sha256:"


def _is_fingerprint(key_id: str | None) -> bool:
    return bool(key_id) and str(key_id).startswith(FINGERPRINT_PREFIX)


def choose_key_id(explicit: str | None, from_caller: str | None, cfg: Config) -> str:
    """The KEK to release: ``--key-id``, else the package's, else the configured one."""
    chosen = explicit or (None if _is_fingerprint(from_caller) else from_caller) or cfg.key_id
    if not chosen:
        raise UsageError(
            "no Key Vault key to release",
            reason=Reason.NO_KEY_ID,
            hint="give --key-id KID or set key_id (CONFINFER_KEY_ID); packages in the "
            "tutorial layout and packages sealed offline do not name their Key Vault key",
        )
    if explicit and from_caller and not _is_fingerprint(from_caller):
        from loader.keywrap import key_ids_match

        if not key_ids_match(explicit, from_caller):
            LOG.warning("releasing %s although the package names %s", explicit, from_caller)
    return chosen


def _dek_checked(dek: bytearray) -> bytearray:
    from loader.keywrap import DEK_LEN, zero

    if len(dek) != DEK_LEN:
        size = len(dek)
        zero(dek)
        raise KeyUnwrapError(
            f"the unwrapped key is {size} bytes; AES-256 needs {DEK_LEN}", reason=Reason.DEK_LENGTH
        )
    return dek


class SkrUnwrapper:
    """DekUnwrapper: attest, release the KEK into the vTPM, unwrap the DEK, drop the KEK."""

    def __init__(
        self, cfg: Config, key_id: str | None = None, *, timings: Timings | None = None
    ) -> None:
        self._cfg = cfg
        self._key_id = key_id
        self.timings = timings

    def unwrap(self, wrapped: bytes, key_id: str | None) -> bytearray:
        from confinfer import skr
        from confinfer.tpm import Vtpm
        from loader.keywrap import fingerprint

        kid = choose_key_id(self._key_id, key_id, self._cfg)
        timings = self.timings if self.timings is not None else skr.Timings()
        with Vtpm(self._cfg.tpm_tcti) as vtpm:
            kek = skr.release_kek(self._cfg, kid, vtpm, timings=timings)
        with kek:
            if _is_fingerprint(key_id) and fingerprint(kek.public_key()) != key_id:
                raise KeyUnwrapError(
                    f"the package was sealed for the KEK {key_id}; Key Vault released {kek.kid}",
                    reason=Reason.KEY_MISMATCH,
                )
            with timings.step("dek-unwrap"):
                dek = skr.unwrap_dek(kek, wrapped)
        return _dek_checked(dek)


class CompatUnwrapper:
    """DekUnwrapper through an installed AzureAttestSKR (``-u`` mode)."""

    def __init__(self, tool_path: Path | None, cfg: Config, key_id: str | None = None) -> None:
        from confinfer import skr_compat

        self._tool = skr_compat.resolve_tool(tool_path)
        self._cfg = cfg
        self._key_id = key_id

    def unwrap(self, wrapped: bytes, key_id: str | None) -> bytearray:
        from confinfer import skr_compat

        if _is_fingerprint(key_id) and not self._key_id:
            raise UsageError(
                f"the package was sealed offline for {key_id}; AzureAttestSKR needs the "
                "Key Vault key",
                reason=Reason.NO_KEY_ID,
                hint="give --key-id KID",
            )
        kid = choose_key_id(self._key_id, key_id, self._cfg)
        return _dek_checked(skr_compat.unwrap_dek(self._tool, self._cfg, kid, wrapped))


# --- the command line: ``confinfer unseal --skr`` ---------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the Secure Key Release options to ``confinfer unseal``."""
    group = parser.add_argument_group("Secure Key Release (on an attested VM)")
    group.add_argument(
        "--skr", action="store_true",
        help="attest with MAA and have Key Vault release the KEK into the vTPM; the key is "
        "--key-id, else the package's, else key_id from the configuration",
    )
    group.add_argument("--maa-url", metavar="URL",
                       help="attestation provider (default: maa_url from the configuration)")
    group.add_argument(
        "--skr-tool", type=Path, metavar="PATH",
        help="release through this AzureAttestSKR binary instead (as the tutorial does); "
        "default: skr_tool from the configuration when set",
    )


@dataclass(frozen=True)
class SkrRequest:
    """What ``unseal --skr`` asked for."""

    key_id: str | None
    maa_url: str | None
    skr_tool: Path | None


def unwrapper_for(request: SkrRequest, kek_private_key: Path | None, cfg: Config) -> DekUnwrapper:
    """The backend ``unseal --skr`` asked for: AzureAttestSKR when a tool is set, else native."""
    if kek_private_key is not None:
        raise UsageError(
            "--skr and --kek-private-key are two different key sources; give one",
            reason=Reason.USAGE,
        )
    from confinfer import config

    cfg = config.override(cfg, maa_url=request.maa_url, skr_tool=request.skr_tool)
    if cfg.skr_tool is not None:
        return CompatUnwrapper(cfg.skr_tool, cfg, request.key_id)
    return SkrUnwrapper(cfg, request.key_id)
