"""``confinfer seal``, ``confinfer unseal`` and ``confinfer inspect``.

Registered through the ``confinfer.commands`` entry points. Heavy imports (the engines, the
Azure SDK) happen inside the command functions so that ``confinfer --help`` stays lean and an
offline unseal never loads the SDK.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from confinfer.errors import Reason, UsageError

if TYPE_CHECKING:
    from confinfer.config import Config
    from loader.keywrap import DekUnwrapper
    from loader.progress import Progress

LOG = logging.getLogger("confinfer.loader")


def parse_size(text: str) -> int:
    """``4194304``, ``4M``, ``4MiB``, ``64G``: binary multiples."""
    from confinfer.configvalues import parse_size as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# -- registration ------------------------------------------------------------------------------


def register_seal(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "seal",
        help="encrypt a model directory into a sealed package",
        description="Encrypt MODEL_DIR into PKG_DIR/model.sealed under a fresh data key, "
        "wrapped by the key-encryption key (KEK).",
    )
    p.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="PKG_DIR",
        help="package directory to create (must not exist, or be empty)",
    )
    key = p.add_mutually_exclusive_group(required=True)
    key.add_argument(
        "--key-id",
        metavar="KID",
        help="Key Vault key that wraps the data key (wrapKey, RSA-OAEP-256)",
    )
    key.add_argument(
        "--kek-public-key",
        type=Path,
        metavar="PEM",
        help="wrap offline with the KEK's public key (PEM key or certificate)",
    )
    p.add_argument(
        "--chunk-size",
        type=parse_size,
        default=None,
        metavar="N",
        help="plaintext bytes per chunk (default 4MiB, at most 8MiB)",
    )
    p.add_argument("--output-dir", action=_Renamed, nargs="?", help=argparse.SUPPRESS)
    p.set_defaults(func=seal_command)


class _Renamed(argparse.Action):
    """The tutorial's ``--output-dir``: refused at once, with the flag that replaces it (before
    argparse would only say that ``--out`` is missing)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        parser.error(
            f"{option_string} is the tutorial's flag; confinfer seal takes --out PKG_DIR (a new "
            "or empty directory: an existing package is never replaced)"
        )


def register_unseal(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "unseal",
        help="decrypt a sealed package (or the tutorial layout) into a directory",
        description="Authenticate and decrypt PKG_DIR into DIR. Nothing of the plaintext "
        "remains in DIR when it fails.",
    )
    p.add_argument("pkg_dir", type=Path, metavar="PKG_DIR")
    p.add_argument(
        "--dest",
        type=Path,
        required=True,
        metavar="DIR",
        help="where the model goes (must not exist, or be empty)",
    )
    p.add_argument(
        "--kek-private-key",
        type=Path,
        metavar="PEM",
        help="unwrap the data key offline with the KEK's private key",
    )
    p.add_argument(
        "--key-id",
        metavar="KID",
        help="the KEK the package must be sealed for; without --kek-private-key "
        "the data key is unwrapped by Key Vault (unwrapKey) with it",
    )
    p.add_argument(
        "--max-bytes",
        type=parse_size,
        default=None,
        metavar="N",
        help="refuse models larger than N bytes (default: max_bytes)",
    )
    group = p.add_argument_group("Secure Key Release (on an attested VM)")
    group.add_argument(
        "--skr",
        action="store_true",
        help="attest with MAA and have Key Vault release the KEK into the vTPM; the key is "
        "--key-id, else key_id from the configuration (a package may only name a configured "
        "key: key_id or keyvault_allowed_keys)",
    )
    group.add_argument(
        "--maa-url",
        metavar="URL",
        help="attestation provider (default: maa_url from the configuration)",
    )
    group.add_argument(
        "--skr-tool",
        type=Path,
        metavar="PATH",
        help="release through this AzureAttestSKR binary instead (as the tutorial does); "
        "default: skr_tool from the configuration when set",
    )
    p.set_defaults(func=unseal_command)


def register_inspect(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "inspect",
        help="print a package's header and manifest as JSON (no key needed)",
        description="Print the header and manifest of PKG_DIR as JSON and check its structure "
        "(sizes, chunk count, file length) without decrypting.",
    )
    p.add_argument("pkg_dir", type=Path, metavar="PKG_DIR")
    p.set_defaults(func=inspect_command)


# -- commands ----------------------------------------------------------------------------------


def _config(**flags: object) -> Config:
    """The configuration with the command's flags applied (None: not given)."""
    from confinfer import config

    return config.override(config.load(), **flags)


def seal_command(args: argparse.Namespace) -> int:
    from loader import format as fmt
    from loader.dest import Destination
    from loader.keywrap import DekWrapper, KeyVaultWrapper, PemWrapper
    from loader.progress import Progress, human_bytes
    from loader.seal import seal_model

    chunk_size = args.chunk_size or fmt.DEFAULT_CHUNK_SIZE
    wrapper: DekWrapper
    if args.kek_public_key is not None:
        wrapper = PemWrapper.from_file(args.kek_public_key)
    else:
        wrapper = KeyVaultWrapper(_config(key_id=args.key_id))
    with Progress("seal") as progress, Destination(args.out) as out:
        header = seal_model(args.model_dir, out, wrapper, chunk_size=chunk_size, progress=progress)
    LOG.info(
        "sealed %d files (%s) from %s into %s in %.1f s, key %s",
        len(header.files),
        human_bytes(header.total_size),
        args.model_dir,
        args.out / fmt.PACKAGE_FILE,
        progress.elapsed_s,
        header.key_id,
    )
    return 0


def make_unwrapper(args: argparse.Namespace, cfg: Config) -> DekUnwrapper:
    """Where the data key comes from: Secure Key Release, a PEM, or Key Vault's unwrapKey."""
    from loader import keywrap

    kek_private_key: Path | None = args.kek_private_key
    if args.skr:
        if kek_private_key is not None:
            raise UsageError("--skr and --kek-private-key are two different key sources; give one")
        if cfg.skr_tool is not None:
            return keywrap.CompatUnwrapper(cfg.skr_tool, cfg)
        return keywrap.SkrUnwrapper(cfg)
    if args.maa_url or args.skr_tool:
        raise UsageError("--maa-url and --skr-tool only apply with --skr")
    if kek_private_key is not None:
        return keywrap.PemUnwrapper.from_file(kek_private_key)
    if cfg.key_id:
        return keywrap.KeyVaultUnwrapper(cfg)
    raise UsageError(
        "no way to unwrap the data key",
        reason=Reason.NO_KEY,
        hint="give --kek-private-key PEM, or --key-id KID for Key Vault",
    )


def unseal_command(args: argparse.Namespace) -> int:
    from loader import format as fmt
    from loader.dest import Destination
    from loader.progress import Progress, human_bytes

    cfg = _config(key_id=args.key_id, maa_url=args.maa_url, skr_tool=args.skr_tool)
    max_bytes = args.max_bytes if args.max_bytes is not None else cfg.max_bytes
    pkg_dir: Path = args.pkg_dir
    if not pkg_dir.is_dir():
        raise UsageError(f"{pkg_dir} is not a directory", reason=Reason.PACKAGE_UNREADABLE)
    # Check the key source before touching the destination.
    unwrapper = make_unwrapper(args, cfg)
    sealed = os.path.lexists(pkg_dir / fmt.PACKAGE_FILE)
    with Progress("unseal") as progress:
        if sealed:
            from loader.unseal import unseal_package

            with Destination(args.dest, max_bytes=max_bytes) as dest:
                header = unseal_package(
                    pkg_dir, dest, unwrapper, expected_key_id=args.key_id, progress=progress
                )
            what = f"{len(header.files)} files ({human_bytes(header.total_size)})"
        else:
            written = _unseal_tutorial(pkg_dir, args.dest, max_bytes, unwrapper, progress)
            what = f"the tutorial archive ({human_bytes(written)})"
    LOG.info("unsealed %s from %s into %s in %.1f s", what, pkg_dir, args.dest, progress.elapsed_s)
    return 0


def _unseal_tutorial(
    pkg_dir: Path,
    dest_dir: Path,
    max_bytes: int | None,
    unwrapper: DekUnwrapper,
    progress: Progress,
) -> int:
    """The seed tutorial's layout; returns the bytes written."""
    from loader import tutorial
    from loader.dest import Destination
    from loader.keywrap import zero

    package = tutorial.detect(pkg_dir)
    if package is None:
        raise UsageError(
            f"{pkg_dir} holds no sealed package (model.sealed) and not the tutorial layout "
            f"({tutorial.ARCHIVE_NAME} with {tutorial.WRAPPED_DEK_NAME})",
            reason=Reason.PACKAGE_UNREADABLE,
        )
    wrapped = package.read_wrapped_dek()
    with Destination(dest_dir, max_bytes=max_bytes) as dest:
        # The tutorial layout names no key: the configured one is used.
        dek = unwrapper.unwrap(wrapped, None)
        try:
            progress.set_total(package.archive.stat().st_size)
            tutorial.unseal_tutorial(package.archive, dest, dek, progress.advance)
        finally:
            zero(dek)
    return dest.used


def inspect_command(args: argparse.Namespace) -> int:
    from loader import format as fmt

    pkg_dir: Path = args.pkg_dir
    if os.path.lexists(pkg_dir / fmt.PACKAGE_FILE) or not pkg_dir.is_dir():
        from loader.unseal import inspect_package

        info = inspect_package(pkg_dir)
    else:
        info = _inspect_tutorial(pkg_dir)
    json.dump(info, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


def _inspect_tutorial(pkg_dir: Path) -> dict[str, object]:
    from loader import tutorial

    package = tutorial.detect(pkg_dir)
    if package is None:
        raise UsageError(
            f"{pkg_dir} holds neither model.sealed nor the tutorial layout",
            reason=Reason.PACKAGE_UNREADABLE,
        )
    return {
        "layout": "tutorial",
        "archive": str(package.archive),
        "archive_bytes": package.archive.stat().st_size,
        "wrapped_dek_bytes": len(package.read_wrapped_dek()),
    }
