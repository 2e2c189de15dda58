"""The sealed package from Azure Blob Storage: list a prefix, download the package's files into a
private staging directory, with the VM's managed identity.

``model_source = "https://<account>.blob.core.windows.net/<container>/<prefix>"`` names the
package. The host, the account, the container and the prefix come from that configured URL
only. An emulator on an IP address or ``localhost`` is addressed path-style, as Azure's SDK does
(``https://127.0.0.1:10000/<account>/<container>/<prefix>``).

What the listing says is hostile (DESIGN.md §8). A blob name may only select one of the
package's own file names (``model.sealed``, or the tutorial layout's two files) directly under
the prefix; a name outside the prefix, with a ``..``, a ``/`` (nesting), a control character or a
backslash is refused (``blob-name-unsafe``) before anything is downloaded. Other flat names
are left alone. Each file is created in the staging directory by name, exclusively, without
following links, and must end up exactly as large as the listing said.

Credentials: the VM's managed identity through confinfer.imds (the one IMDS client, with its
``imds_url``, ``managed_identity_client_id`` and retry policy), audience
``https://storage.azure.com``. TLS is verified against ``ca_bundle`` (else the system store).
:func:`download` takes a ``credential`` only for tests (an emulator's account key).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from confinfer.config import Config
from confinfer.errors import (
    AttestationError,
    ConfigError,
    ConfinferError,
    IntegrityError,
    Reason,
    ServiceError,
    UsageError,
    printable,
)
from loader import format as fmt
from loader import tutorial

LOG = logging.getLogger(__name__)

STORAGE_AUDIENCE = "https://storage.azure.com"
SEALED_FILES = (fmt.PACKAGE_FILE,)
TUTORIAL_FILES = (tutorial.ARCHIVE_NAME, tutorial.WRAPPED_DEK_NAME)
MAX_LISTED = 10_000  # blobs under one prefix that are looked at before giving up
MAX_NAME_BYTES = 255
_CONTAINER = re.compile(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}")
_ACCOUNT = re.compile(r"[a-z0-9]{3,24}")
_DOWNLOAD_CHUNK = 4 << 20


def is_blob_url(source: str) -> bool:
    """Whether ``model_source`` names a URL rather than a local directory."""
    return "://" in source


def _invalid(source: str, why: str) -> ConfigError:
    return ConfigError(
        f"model_source {printable(source, 200)!r}: {why}",
        reason=Reason.MODEL_SOURCE_INVALID,
        hint="expected https://<account>.blob.core.windows.net/<container>/<prefix> or a "
        "package directory",
    )


@dataclass(frozen=True)
class BlobSource:
    """Where the package lies: the account's endpoint, the container, the prefix (empty, or
    ending in ``/``)."""

    account_url: str
    container: str
    prefix: str

    @classmethod
    def parse(cls, source: str) -> BlobSource:
        parts = urlsplit(source)
        if parts.scheme != "https":
            raise _invalid(source, "a Blob URL must be https")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise _invalid(source, "no query, fragment or user info (no SAS tokens)")
        host = parts.hostname
        if not host:
            raise _invalid(source, "no host")
        try:
            port = parts.port
        except ValueError:
            raise _invalid(source, "bad port") from None
        segments = [unquote(s) for s in parts.path.split("/")[1:]]
        netloc = host if port is None else f"{host}:{port}"
        if ":" in host:
            netloc = f"[{host}]" if port is None else f"[{host}]:{port}"
        if _path_style(host):
            if len(segments) < 2 or not _ACCOUNT.fullmatch(segments[0]):
                raise _invalid(source, "an emulator URL is https://HOST:PORT/<account>/<container>")
            account_url = f"https://{netloc}/{segments[0]}"
            segments = segments[1:]
        else:
            account_url = f"https://{netloc}"
        if not segments or not _CONTAINER.fullmatch(segments[0]):
            raise _invalid(source, "no valid container name (3-63 of a-z, 0-9, -)")
        prefix = "/".join(segments[1:]).strip("/")
        for part in prefix.split("/") if prefix else ():
            if part in ("", ".", "..") or not part.isprintable() or "\\" in part:
                raise _invalid(source, "the prefix must be plain path components")
        return cls(account_url, segments[0], prefix + "/" if prefix else "")

    def __str__(self) -> str:
        return f"{self.account_url}/{self.container}/{self.prefix}"


def _path_style(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# --- the listing ------------------------------------------------------------------------------


def _unsafe(name: str, why: str) -> IntegrityError:
    return IntegrityError(
        f"the container lists a blob {printable(name, 160)!r} that cannot be a package file: "
        f"{why}; nothing was downloaded",
        reason=Reason.BLOB_NAME_UNSAFE,
        hint="remove that blob, or point model_source at a prefix that holds only the package",
    )


def file_name(blob_name: str, prefix: str) -> str | None:
    """The staging file name a listed blob selects: one plain component under ``prefix``.
    None for the prefix's own folder marker; ``blob-name-unsafe`` for anything else that is
    not one plain name."""
    if not blob_name.startswith(prefix):
        raise _unsafe(blob_name, "it is not under the prefix asked for")
    rel = blob_name[len(prefix) :]
    if rel == "":
        return None
    if rel.startswith("/"):
        raise _unsafe(blob_name, "an absolute path")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in rel) or not rel.isprintable():
        raise _unsafe(blob_name, "a control character")
    if "\\" in rel:
        raise _unsafe(blob_name, "a backslash")
    if ".." in rel.split("/"):
        raise _unsafe(blob_name, "a '..' component")
    if "/" in rel:
        raise _unsafe(blob_name, "nested below the prefix (a package is flat)")
    if rel == ".":
        raise _unsafe(blob_name, "'.'")
    if len(rel.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise _unsafe(blob_name, "name too long")
    return rel


def choose_files(listing: list[tuple[str, int]], prefix: str) -> dict[str, tuple[str, int]]:
    """From ``(blob name, size)`` pairs, the package's files: ``{file name: (blob, size)}``.

    Every name is checked first (one hostile name refuses the whole listing). The sealed format
    wins when both layouts are there. ``blob-not-found`` when neither is complete.
    """
    found: dict[str, tuple[str, int]] = {}
    for blob_name, size in listing:
        name = file_name(blob_name, prefix)
        if name is None:
            continue
        if size < 0:
            raise _unsafe(blob_name, "a negative size")
        found[name] = (blob_name, size)
    for layout in (SEALED_FILES, TUTORIAL_FILES):
        if all(n in found for n in layout):
            others = sorted(set(found) - set(layout))
            if others:
                LOG.info("ignoring %d other blob(s) under the prefix: %s", len(others), others[:5])
            return {n: found[n] for n in layout}
    raise UsageError(
        f"no sealed package under {printable(prefix or '/', 200)!r}: expected "
        f"{fmt.PACKAGE_FILE}, or {tutorial.ARCHIVE_NAME} with {tutorial.WRAPPED_DEK_NAME}",
        reason=Reason.BLOB_NOT_FOUND,
        hint="upload the package's files directly under the prefix model_source names",
    )


# --- the staging directory --------------------------------------------------------------------


def staging_root(environ: Mapping[str, str]) -> Path:
    """Where packages are staged: systemd's ``$STATE_DIRECTORY`` or ``$CACHE_DIRECTORY`` (the
    first path of each), else the system's temporary directory."""
    for var in ("STATE_DIRECTORY", "CACHE_DIRECTORY"):
        value = environ.get(var, "").split(":")[0]
        if value:
            return Path(value)
    return Path(tempfile.gettempdir())


@contextlib.contextmanager
def staging_dir(environ: Mapping[str, str]) -> Iterator[Path]:
    """A fresh private directory (0700) for one download; removed afterwards."""
    root = staging_root(environ)
    try:
        path = Path(tempfile.mkdtemp(prefix="package-", dir=root))
    except OSError as exc:
        raise ConfinferError(
            f"cannot create a staging directory in {root}: {exc.strerror}",
            reason=Reason.DEST_WRITE,
        ) from None
    try:
        os.chmod(path, 0o700)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- the service ------------------------------------------------------------------------------


class ImdsCredential:
    """An azure-core token credential backed by the VM's managed identity (confinfer.imds)."""

    def __init__(self, cfg: Config) -> None:
        from confinfer.http import Http

        self._cfg = cfg
        self._http = Http(cfg)

    def get_token(self, *scopes: str, **_: Any) -> Any:
        from azure.core.credentials import AccessToken

        from confinfer import imds

        audience = scopes[0].removesuffix("/.default") if scopes else STORAGE_AUDIENCE
        if audience.rstrip("/") != STORAGE_AUDIENCE:
            raise ConfinferError(
                f"a token for {printable(audience, 100)} was asked for; only storage is",
                reason=Reason.BLOB_FORBIDDEN,
            )
        found = imds.managed_identity_token(self._http, self._cfg, STORAGE_AUDIENCE)
        return AccessToken(found.token, int(found.expires_on))

    def close(self) -> None:
        self._http.close()


def _service_error(source: BlobSource, exc: Exception) -> ConfinferError:
    """The one error map of Blob answers."""
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ResourceNotFoundError,
    )

    status = getattr(exc, "status_code", None)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    what = f"Blob storage {source.account_url}/{source.container}"
    if isinstance(exc, ClientAuthenticationError) or status in (401, 403):
        return AttestationError(
            f"{what} refused the managed identity: {printable(first, 300)}",
            reason=Reason.BLOB_FORBIDDEN,
            hint="grant the VM's identity 'Storage Blob Data Reader' on the container",
        )
    if isinstance(exc, ResourceNotFoundError) or status == 404:
        return UsageError(
            f"{what}: not found: {printable(first, 300)}",
            reason=Reason.BLOB_NOT_FOUND,
            hint="check the account and container in model_source",
        )
    kind = "answered" if isinstance(exc, HttpResponseError) else "is unreachable"
    return ServiceError(
        f"{what} {kind}: {printable(first, 300)}",
        reason=Reason.BLOB_UNAVAILABLE,
        hint="check the network path and ca_bundle; retried by restarting the unit",
    )


def _container_client(cfg: Config, source: BlobSource, credential: Any) -> Any:
    from azure.storage.blob import ContainerClient

    return ContainerClient(
        source.account_url,
        source.container,
        credential=credential,
        connection_verify=str(cfg.ca_bundle) if cfg.ca_bundle else True,
        connection_timeout=cfg.http_timeout_s,
        read_timeout=cfg.http_timeout_s,
        retry_total=cfg.max_retries,
    )


def download(
    cfg: Config,
    source: BlobSource,
    into: Path,
    *,
    workers: int = 4,
    credential: Any = None,
) -> int:
    """Download the package under ``source`` into the (empty, private) directory ``into``;
    returns the bytes downloaded. ``credential`` replaces the managed identity (tests only)."""
    from azure.core.exceptions import AzureError

    own = credential is None
    cred: Any = ImdsCredential(cfg) if own else credential
    try:
        client = _container_client(cfg, source, cred)
        with client:
            try:
                listing: list[tuple[str, int]] = []
                for item in client.list_blobs(name_starts_with=source.prefix or None):
                    listing.append((str(item.name), int(item.size or 0)))
                    if len(listing) > MAX_LISTED:
                        raise UsageError(
                            f"more than {MAX_LISTED} blobs under {source}",
                            reason=Reason.BLOB_NOT_FOUND,
                            hint="give model_source a prefix that holds only the package",
                        )
                files = choose_files(listing, source.prefix)
                total = 0
                for name, (blob_name, size) in files.items():
                    total += _fetch(client, blob_name, into, name, size, workers)
            except AzureError as exc:
                raise _service_error(source, exc) from None
    finally:
        if own:
            cred.close()
    return total


def _fetch(client: Any, blob_name: str, into: Path, name: str, size: int, workers: int) -> int:
    dir_fd = os.open(into, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dir_fd,
        )
    finally:
        os.close(dir_fd)
    with os.fdopen(fd, "wb") as out:
        try:
            stream = client.download_blob(blob_name, max_concurrency=max(1, workers))
            got = int(stream.readinto(out))
        except OSError as exc:
            raise ConfinferError(
                f"cannot write the downloaded package into {into}: {exc.strerror}",
                reason=Reason.NO_SPACE if exc.errno == errno.ENOSPC else Reason.DEST_WRITE,
            ) from None
    if got != size:
        raise IntegrityError(
            f"{printable(blob_name, 160)!r} is {got} bytes, not the {size} its listing said "
            "(it changed during the download)",
            reason=Reason.TRUNCATED,
        )
    LOG.info("downloaded %s (%d bytes)", printable(blob_name, 160), got)
    return got
