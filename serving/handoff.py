"""The hand-off from ``model-loader``: which model directory the engine serves.

Once the model is unsealed, model-loader writes ``<model_dir>/../model.json``::

    {"model_path": "/run/confinfer/model/<dir holding config.json>", "bytes": N, "files": N,
     "release_s": T, "unseal_s": T, "source": "..."}

and only then sends ``READY=1``, so ``vllm.service`` (``BindsTo=`` + ``After=`` model-loader)
finds it complete. The file is read as untrusted input: it may only *select* a directory inside
the configured ``model_dir`` (DESIGN.md §8). ``model_path`` must be absolute, resolve (links
followed) to ``model_dir`` or below it, and be a directory whose ``config.json`` is a regular file
that also resolves inside; the resolved path is what the container mounts, so a link swapped in
later cannot point the mount elsewhere. The other fields are informational and type-checked.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confinfer.errors import ConfinferError, Reason, printable

HANDOFF_NAME = "model.json"
MAX_HANDOFF_BYTES = 64 * 1024  # a few short fields; anything larger is not ours


@dataclass(frozen=True)
class Handoff:
    """What model-loader handed over; ``model_path`` is resolved and checked."""

    model_path: Path
    bytes: int | None = None
    files: int | None = None
    unseal_s: float | None = None
    source: str | None = None


def handoff_path(model_dir: Path) -> Path:
    """Where model-loader writes the hand-off for ``model_dir``."""
    return model_dir.parent / HANDOFF_NAME


def _invalid(path: Path, why: str) -> ConfinferError:
    return ConfinferError(
        f"{path}: {why}",
        reason=Reason.HANDOFF_INVALID,
        hint="model-loader writes this file; restart model-loader to unseal the model again",
    )


def _read(path: Path) -> bytes:
    """The file's bytes: a regular file, not a link, at most :data:`MAX_HANDOFF_BYTES`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfinferError(
            f"{path}: no model hand-off (model-loader has not finished unsealing)",
            reason=Reason.HANDOFF_MISSING,
            hint="vllm.service starts after model-loader.service is ready; see its journal",
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _invalid(path, "is a symbolic link") from None
        raise ConfinferError(
            f"{path}: cannot open: {exc.strerror}", reason=Reason.HANDOFF_MISSING
        ) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _invalid(path, "is not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_HANDOFF_BYTES and (chunk := os.read(fd, MAX_HANDOFF_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
    finally:
        os.close(fd)
    if len(data) > MAX_HANDOFF_BYTES:
        raise _invalid(path, f"larger than {MAX_HANDOFF_BYTES} bytes")
    return data


def _count(path: Path, doc: dict[str, Any], key: str) -> int | None:
    value = doc.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _invalid(path, f"{key} is not a count: {printable(repr(value), 80)}")
    return value


def _model_path(path: Path, raw: object, model_dir: Path) -> Path:
    if not isinstance(raw, str) or not raw:
        raise _invalid(path, "model_path is missing or not a string")
    shown = printable(raw, 300)
    if "\0" in raw or not raw.startswith("/"):
        raise _invalid(path, f"model_path is not an absolute path: {shown}")
    try:
        root = model_dir.resolve(strict=True)
        resolved = Path(raw).resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a link loop (Python < 3.13)
        raise _invalid(path, f"model_path does not resolve: {shown}: {exc}") from None
    if not resolved.is_relative_to(root):
        raise _invalid(path, f"model_path {shown} is outside model_dir {model_dir}")
    if not resolved.is_dir():
        raise _invalid(path, f"model_path {shown} is not a directory")
    config_json = resolved / "config.json"
    try:
        info = config_json.lstat()
    except OSError:
        raise _invalid(path, f"model_path {shown} holds no config.json") from None
    if not stat.S_ISREG(info.st_mode):
        raise _invalid(path, f"{shown}/config.json is not a regular file")
    return resolved


def read_handoff(model_dir: Path, path: Path | None = None) -> Handoff:
    """Read and check the hand-off for ``model_dir`` (at :func:`handoff_path` by default)."""
    path = handoff_path(model_dir) if path is None else path
    data = _read(path)
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _invalid(path, f"not JSON: {printable(str(exc), 200)}") from None
    if not isinstance(doc, dict):
        raise _invalid(path, "not a JSON object")
    unseal_s = doc.get("unseal_s")
    if unseal_s is not None and (
        isinstance(unseal_s, bool)
        or not isinstance(unseal_s, int | float)
        or not math.isfinite(unseal_s)
        or unseal_s < 0
    ):
        raise _invalid(path, f"unseal_s is not a duration: {printable(repr(unseal_s), 80)}")
    source = doc.get("source")
    if source is not None and not isinstance(source, str):
        raise _invalid(path, "source is not a string")
    return Handoff(
        model_path=_model_path(path, doc.get("model_path"), model_dir),
        bytes=_count(path, doc, "bytes"),
        files=_count(path, doc, "files"),
        unseal_s=None if unseal_s is None else float(unseal_s),
        source=source,
    )
