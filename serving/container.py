"""The serving container's specification: what the engine runs as, sees and may do.

One pure function of the configuration and the hand-off, :func:`container_spec`, so that every
hardening option is decided (and unit-tested) in one place; :mod:`serving.engine` only hands the
result to the docker SDK. The engine:

- runs as ``serving_uid:serving_gid``, with no capabilities, ``no-new-privileges``, a read-only
  root file system and an init process (tini) that forwards signals and reaps children;
- sees the model read-only at ``/model`` (a bind of the resolved hand-off path that fails
  rather than creating a missing source) and a ``noexec`` tmpfs at ``/cache`` for every cache,
  home and temporary directory; Hugging Face is offline and usage reporting is off;
- shares the host's network namespace but listens on 127.0.0.1 only (``--host 127.0.0.1``); the
  supervisor refuses ``serving_args`` that would move it;
- gets the GPUs (``serving_gpus``) through a device request, a bounded process count, a capped
  json-file log and no restart policy: systemd restarts ``vllm.service``, not docker.

The command follows vLLM's ``vllm serve`` CLI. vLLM's image has ``ENTRYPOINT ["vllm",
"serve"]``, so the command is only its arguments; an image without an entry point gets
``vllm serve`` in front. A test image swaps the engine by its entry point; its flags (the CPU
engine's ``--dtype float32`` and so on) come from ``serving_args``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from confinfer.config import Config
from confinfer.errors import ConfigError, Reason, printable
from serving.handoff import Handoff

CONTAINER_NAME = "confinfer-vllm"
ROLE_LABEL = "confinfer.role"
ROLE = "serving"
MODEL_MOUNT = "/model"
CACHE_MOUNT = "/cache"
LISTEN_HOST = "127.0.0.1"
DEFAULT_LAUNCHER = ("vllm", "serve")

SHM_SIZE = "1g"  # vLLM's worker messaging and NCCL use /dev/shm; docker's 64 MiB is too little
CACHE_TMPFS_SIZE = "4g"  # compile caches (inductor, triton); pages count only when written
PIDS_LIMIT = 8192  # tasks, threads included: torch and tokenizers start many per core
LOG_MAX_SIZE = "50m"
LOG_MAX_FILES = "2"
STOP_TIMEOUT_S = 30  # vLLM exits on SIGTERM in about a second; then docker sends SIGKILL

# Flags the supervisor owns: serving_args may not set them, or the engine could leave loopback,
# serve another path or listen where Caddy does not proxy.
_OWNED_FLAGS = ("--host", "--port", "--uds", "--served-model-name", "--model")


@dataclass(frozen=True)
class ContainerSpec:
    """Everything :mod:`serving.engine` passes to ``containers.create``."""

    image: str
    name: str
    command: tuple[str, ...]
    user: str
    model_path: Path
    environment: Mapping[str, str]
    labels: Mapping[str, str]
    gpus: bool
    network_mode: str = "host"
    read_only: bool = True
    cap_drop: tuple[str, ...] = ("ALL",)
    security_opt: tuple[str, ...] = ("no-new-privileges",)
    init: bool = True
    shm_size: str = SHM_SIZE
    pids_limit: int = PIDS_LIMIT
    tmpfs: Mapping[str, str] = field(
        default_factory=lambda: {
            CACHE_MOUNT: f"rw,noexec,nosuid,nodev,size={CACHE_TMPFS_SIZE},mode=1777"
        }
    )
    restart_policy: Mapping[str, str] = field(default_factory=lambda: {"Name": "no"})
    log_options: Mapping[str, str] = field(
        default_factory=lambda: {"max-size": LOG_MAX_SIZE, "max-file": LOG_MAX_FILES}
    )


def cache_environment() -> dict[str, str]:
    """Home, temporary and cache directories on the ``/cache`` tmpfs; offline, no telemetry."""
    return {
        "HOME": CACHE_MOUNT,
        "TMPDIR": CACHE_MOUNT,
        "XDG_CACHE_HOME": f"{CACHE_MOUNT}/xdg",
        "HF_HOME": f"{CACHE_MOUNT}/huggingface",
        "VLLM_CACHE_ROOT": f"{CACHE_MOUNT}/vllm",
        "VLLM_CONFIG_ROOT": f"{CACHE_MOUNT}/vllm-config",
        "VLLM_RPC_BASE_PATH": CACHE_MOUNT,
        "TORCHINDUCTOR_CACHE_DIR": f"{CACHE_MOUNT}/inductor",
        "TRITON_CACHE_DIR": f"{CACHE_MOUNT}/triton",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }


def check_serving_args(args: Sequence[str]) -> None:
    """Refuse ``serving_args`` that set a flag the supervisor owns (``config-invalid``)."""
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in _OWNED_FLAGS:
            raise ConfigError(
                f"serving_args may not set {printable(flag, 40)}: the supervisor serves /model "
                f"as serving_model_name on {LISTEN_HOST}:serving_port",
                reason=Reason.CONFIG_INVALID,
                hint="set serving_model_name or serving_port instead",
            )


def engine_command(cfg: Config, *, image_has_entrypoint: bool) -> tuple[str, ...]:
    """The engine's arguments: ``vllm serve``'s, after the image's entry point if it has one."""
    check_serving_args(cfg.serving_args)
    args = (
        MODEL_MOUNT,
        "--served-model-name",
        cfg.serving_model_name,
        "--host",
        LISTEN_HOST,
        "--port",
        str(cfg.serving_port),
        *cfg.serving_args,
    )
    return args if image_has_entrypoint else (*DEFAULT_LAUNCHER, *args)


def container_spec(cfg: Config, handoff: Handoff, *, image_has_entrypoint: bool) -> ContainerSpec:
    """The serving container for ``handoff``'s model under ``cfg``."""
    return ContainerSpec(
        image=cfg.serving_image,
        name=CONTAINER_NAME,
        command=engine_command(cfg, image_has_entrypoint=image_has_entrypoint),
        user=f"{cfg.serving_uid}:{cfg.serving_gid}",
        model_path=handoff.model_path,
        environment=cache_environment(),
        labels={ROLE_LABEL: ROLE, "confinfer.model-name": cfg.serving_model_name},
        gpus=cfg.serving_gpus,
    )
