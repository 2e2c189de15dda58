"""The serving container's life through the docker SDK: the one module that talks to dockerd.

:class:`Engine` is what the supervisor needs from a container engine; :class:`DockerEngine` is
that over ``docker.DockerClient(base_url=docker_host)``. Nothing is pulled: the image must be
present (the VM image bakes it, pinned by digest), so the container is created and started,
never ``run`` (which pulls a missing image). A container left by an earlier run (our fixed name
and role label) is removed first; a stranger's container under our name is not touched.

Docker failures become one :class:`~confinfer.errors.ConfinferError` each: the socket
unreachable (``docker-unavailable``), the image absent (``serving-image-missing``), the
container refused (``engine-start-failed``). What dockerd or the engine says is escaped to one
line before it is shown.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import docker  # type: ignore[import-untyped]
import docker.errors  # type: ignore[import-untyped]
import docker.types  # type: ignore[import-untyped]
import requests

from confinfer.errors import ConfinferError, Reason, printable
from serving.container import CONTAINER_NAME, MODEL_MOUNT, ROLE, ROLE_LABEL, ContainerSpec

LOG = logging.getLogger(__name__)

API_TIMEOUT_S = 60  # one docker API call (create, start, inspect); stop adds its own timeout
WAIT_POLL_S = 300  # a wait request is renewed this often, so a vanished daemon is noticed
LOG_LINE_LIMIT = 16 * 1024  # an engine line longer than this is forwarded in pieces


class Engine(Protocol):
    """A container engine as the supervisor uses it (a fake one in unit tests)."""

    def image_has_entrypoint(self, image: str) -> bool:
        """Whether the local ``image`` has an entry point (raises when it is absent)."""
        ...

    def remove_leftovers(self) -> int:
        """Remove serving containers of an earlier run; return how many."""
        ...

    def start(self, spec: ContainerSpec) -> str:
        """Create and start the container; return its id."""
        ...

    def wait(self) -> int:
        """Block until the container is not running; return its exit code."""
        ...

    def logs_tail(self, lines: int) -> str:
        """The last ``lines`` lines of the engine's output (best effort, may be empty)."""
        ...

    def forward_logs(self, sink: logging.Logger) -> threading.Thread | None:
        """Copy the engine's output to ``sink`` as it comes, in a daemon thread."""
        ...

    def stop(self, timeout_s: float) -> None:
        """Stop (SIGTERM, then SIGKILL after ``timeout_s``) and remove the container."""
        ...

    def kill(self) -> bool:
        """Kill (SIGKILL) and remove the container at once; whether there was one."""
        ...

    def close(self) -> None: ...


@contextlib.contextmanager
def docker_errors(what: str, *, default: Reason = Reason.ENGINE_START_FAILED) -> Iterator[None]:
    """Turn the docker SDK's failures while doing ``what`` into one ConfinferError."""
    try:
        yield
    except docker.errors.ImageNotFound as exc:
        raise ConfinferError(
            f"{what}: image not found: {printable(exc.explanation or exc, 300)}",
            reason=Reason.SERVING_IMAGE_MISSING,
            hint="load the serving image (docker load) or fix serving_image; nothing is pulled",
        ) from None
    except docker.errors.APIError as exc:
        raise ConfinferError(
            f"{what}: dockerd refused: {printable(exc.explanation or exc, 500)}",
            reason=default,
        ) from None
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise ConfinferError(
            f"{what}: cannot reach the container engine: {printable(exc, 300)}",
            reason=Reason.DOCKER_UNAVAILABLE,
            hint="is docker.service running, and is docker_host its socket?",
        ) from None


def create_kwargs(spec: ContainerSpec) -> dict[str, Any]:
    """``containers.create`` arguments for ``spec`` (the SDK's spelling of it)."""
    kwargs: dict[str, Any] = {
        "name": spec.name,
        "command": list(spec.command),
        "user": spec.user,
        "network_mode": spec.network_mode,
        "read_only": spec.read_only,
        "cap_drop": list(spec.cap_drop),
        "security_opt": list(spec.security_opt),
        "init": spec.init,
        "shm_size": spec.shm_size,
        "pids_limit": spec.pids_limit,
        "tmpfs": dict(spec.tmpfs),
        "mounts": [
            # A bind Mount (not a volumes= entry): a missing source fails instead of being
            # created empty, and it is read-only with private propagation.
            docker.types.Mount(
                target=MODEL_MOUNT,
                source=str(spec.model_path),
                type="bind",
                read_only=True,
                propagation="rprivate",
            )
        ],
        "environment": dict(spec.environment),
        "labels": dict(spec.labels),
        "restart_policy": dict(spec.restart_policy),
        "log_config": docker.types.LogConfig(type="json-file", config=dict(spec.log_options)),
        "stop_signal": "SIGTERM",
    }
    if spec.gpus:
        kwargs["device_requests"] = [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
    return kwargs


def _check_listening(base_url: str) -> None:
    """Refuse a ``unix://`` socket nobody listens on, before the SDK tries it: its connection
    code leaks the socket of a failed connect."""
    if not base_url.startswith("unix://"):
        return
    path = base_url.removeprefix("unix://")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(API_TIMEOUT_S)
            sock.connect(path)
    except (OSError, ValueError) as exc:
        raise ConfinferError(
            f"cannot reach the container engine at {printable(base_url, 200)}: "
            f"{printable(getattr(exc, 'strerror', None) or exc, 200)}",
            reason=Reason.DOCKER_UNAVAILABLE,
            hint="is docker.service running, and is docker_host its socket?",
        ) from None


class DockerEngine:
    """:class:`Engine` over dockerd's API socket ``base_url``."""

    def __init__(self, base_url: str) -> None:
        self._base_url = base_url
        _check_listening(base_url)
        with docker_errors("connecting to the container engine", default=Reason.DOCKER_UNAVAILABLE):
            self._client: Any = docker.DockerClient(base_url=base_url, timeout=API_TIMEOUT_S)
            try:
                self._client.ping()
            except BaseException:
                self._client.close()
                raise
        self._container: Any = None
        self._waiter: Any = None  # a second client: the blocking wait has its own connection
        self._lock = threading.Lock()

    @property
    def container_id(self) -> str | None:
        return None if self._container is None else str(self._container.id)

    def image_has_entrypoint(self, image: str) -> bool:
        with docker_errors(f"inspecting image {printable(image, 200)}"):
            attrs = self._client.images.get(image).attrs
        return bool((attrs.get("Config") or {}).get("Entrypoint"))

    def remove_leftovers(self) -> int:
        removed = 0
        with docker_errors("removing an earlier serving container"):
            found = {
                c.id: c
                for c in self._client.containers.list(
                    all=True, filters={"label": f"{ROLE_LABEL}={ROLE}"}
                )
            }
            with contextlib.suppress(docker.errors.NotFound):
                named = self._client.containers.get(CONTAINER_NAME)
                if named.labels.get(ROLE_LABEL) != ROLE:
                    raise ConfinferError(
                        f"a container named {CONTAINER_NAME} exists that is not a serving "
                        f"container of ours ({printable(named.short_id, 20)})",
                        reason=Reason.ENGINE_START_FAILED,
                        hint=f"remove it (docker rm -f {CONTAINER_NAME}) if nothing needs it",
                    )
                found[named.id] = named
            for container in found.values():
                LOG.info("removing the earlier serving container %s", container.short_id)
                with contextlib.suppress(docker.errors.NotFound):
                    container.remove(force=True)
                removed += 1
        return removed

    def start(self, spec: ContainerSpec) -> str:
        with docker_errors(f"creating the serving container from {printable(spec.image, 200)}"):
            container = self._client.containers.create(spec.image, **create_kwargs(spec))
        with self._lock:
            self._container = container
        with docker_errors("starting the serving container"):
            container.start()
        return str(container.id)

    def wait(self) -> int:
        container_id = self.container_id
        if container_id is None:
            raise ConfinferError("no serving container", reason=Reason.ENGINE_START_FAILED)
        with docker_errors("waiting on the serving container", default=Reason.DOCKER_UNAVAILABLE):
            if self._waiter is None:
                self._waiter = docker.APIClient(base_url=self._base_url, timeout=API_TIMEOUT_S)
            while True:
                try:
                    result = self._waiter.wait(container_id, timeout=WAIT_POLL_S)
                except requests.exceptions.ReadTimeout:
                    continue  # still running; ask again
                return int(result.get("StatusCode", -1))

    def logs_tail(self, lines: int) -> str:
        if self._container is None:
            return ""
        try:
            raw = self._container.logs(stdout=True, stderr=True, tail=lines)
        except (docker.errors.DockerException, requests.exceptions.RequestException):
            return ""
        return bytes(raw).decode("utf-8", "replace").strip()

    def forward_logs(self, sink: logging.Logger) -> threading.Thread | None:
        """Copy the engine's output, one escaped journal line per line, in a daemon thread."""
        container_id = self.container_id
        if container_id is None:
            return None

        def run() -> None:
            try:
                client = docker.APIClient(base_url=self._base_url, timeout=None)
                stream = client.logs(container_id, stream=True, follow=True)
                pending = b""
                for chunk in stream:
                    pending += chunk
                    while b"\n" in pending or len(pending) > LOG_LINE_LIMIT:
                        line, sep, rest = pending.partition(b"\n")
                        if not sep:
                            line, rest = pending[:LOG_LINE_LIMIT], pending[LOG_LINE_LIMIT:]
                        pending = rest
                        sink.info("engine: %s", line.decode("utf-8", "replace").rstrip("\r"))
                if pending:
                    sink.info("engine: %s", pending.decode("utf-8", "replace"))
                client.close()
            except (docker.errors.DockerException, requests.exceptions.RequestException):
                return  # the container is gone; its last lines are in the exit report

        thread = threading.Thread(target=run, name="engine-logs", daemon=True)
        thread.start()
        return thread

    def stop(self, timeout_s: float) -> None:
        with self._lock:
            container, self._container = self._container, None
        if container is None:
            return
        with docker_errors("stopping the serving container", default=Reason.DOCKER_UNAVAILABLE):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                container.stop(timeout=int(max(1, timeout_s)))
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)

    def kill(self) -> bool:
        with self._lock:
            container, self._container = self._container, None
        if container is None:
            return False
        with docker_errors("killing the serving container", default=Reason.DOCKER_UNAVAILABLE):
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)  # SIGKILL and remove, one API call
        return True

    def close(self) -> None:
        for client in (self._waiter, self._client):
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
