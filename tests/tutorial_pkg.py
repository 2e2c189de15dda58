"""Build packages in the seed tutorial's layout, the way its ``encrypt_model.py`` does.

The tutorial tars the model directory with ``shutil.make_archive`` (Python's tarfile), encrypts
the tar as one AES-256-GCM message ``[12-byte nonce][ciphertext][16-byte tag]`` and wraps the DEK
RSA-OAEP-256 with the KEK. Here the encryption is ``AESGCM`` from ``cryptography`` (whose output
is ciphertext followed by the tag), so that the reader is checked against an independent writer.
Hostile archives are built with :mod:`tarfile` or by hand, then sealed properly, so that only the
tar content is hostile.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import strategies as st

ARCHIVE_NAME = "model_archive.tar.enc"
WRAPPED_DEK_NAME = "wrapped_model_dek.bin"

OAEP_SHA256 = padding.OAEP(
    mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
)


def encrypt_archive(tar: bytes, dek: bytes, nonce: bytes | None = None) -> bytes:
    nonce = os.urandom(12) if nonce is None else nonce
    return nonce + AESGCM(dek).encrypt(nonce, tar, None)


def write_package(
    pkg_dir: Path, tar: bytes, kek_public: rsa.RSAPublicKey, dek: bytes | None = None
) -> bytes:
    """Write the two tutorial files for ``tar``; return the DEK used."""
    dek = os.urandom(32) if dek is None else dek
    pkg_dir.mkdir(parents=True, exist_ok=True)
    (pkg_dir / ARCHIVE_NAME).write_bytes(encrypt_archive(tar, dek))
    (pkg_dir / WRAPPED_DEK_NAME).write_bytes(kek_public.encrypt(dek, OAEP_SHA256))
    return dek


def make_archive(model_dir: Path, work: Path) -> bytes:
    """The tutorial's step 1: ``shutil.make_archive`` of the model directory, as bytes."""
    base = work / "model_archive"
    path = shutil.make_archive(
        base_name=str(base), format="tar", root_dir=model_dir.parent, base_dir=model_dir.name
    )
    data = Path(path).read_bytes()
    Path(path).unlink()
    return data


def files_of(root: Path) -> dict[str, bytes]:
    """Every regular file below ``root`` by its POSIX path relative to ``root``, with its bytes:
    what an unseal wrote, to compare with the model it came from."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def build_tar(
    entries: Sequence[tuple[tarfile.TarInfo, bytes | None]],
    fmt: int = tarfile.PAX_FORMAT,
) -> bytes:
    """A tar of ``(TarInfo, payload)`` pairs, written by tarfile exactly as given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info, payload in entries:
            if payload is not None:
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
            else:
                tf.addfile(info)
    return buf.getvalue()


def file_info(name: str, mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.REGTYPE
    info.mode = mode
    return info


def dir_info(name: str, mode: int = 0o755) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    return info


def special_info(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info


# -- random model trees, for property tests -----------------------------------------------------

_segment = st.text(
    alphabet=st.characters(
        codec="utf-8", exclude_characters="/\\", exclude_categories=("Cs", "Cc")
    ),
    min_size=1,
    max_size=40,
).filter(lambda s: s not in (".", ".."))


@st.composite
def model_trees(draw: st.DrawFn) -> dict[str, bytes | None]:
    """Relative path -> file content, or None for a directory; parents are listed too."""
    paths = draw(st.lists(st.lists(_segment, min_size=1, max_size=4), min_size=1, max_size=12))
    out: dict[str, bytes | None] = {}
    for parts in paths:
        path = "/".join(parts)
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts))]
        # Usable when it is not taken and no prefix of it is a file.
        if path in out or any(out.get(p) is not None for p in prefixes):
            continue
        for p in prefixes:
            out[p] = None
        out[path] = None if draw(st.booleans()) else draw(st.binary(max_size=2000))
    return out


def tree_entries(files: dict[str, bytes | None]) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [
        (dir_info(name), None) if payload is None else (file_info(name), payload)
        for name, payload in sorted(files.items())
    ]
