"""attestd's GPU fast checks: NVML through nvidia-ml-py (``pynvml``), from the configured library.

:class:`GpuChecker` runs one fast check (:meth:`GpuChecker.check`) and returns the state
machine's observation (:mod:`attestd.state`):

- :class:`~attestd.state.GpuFastFailed` with the exact reason: ``gpu-cc-off`` (the CC feature is
  off), ``gpu-not-production`` (the CC environment is not PRODUCTION), ``gpu-devtools`` (DevTools
  mode on), ``gpu-count-mismatch`` (NVML's device count differs from ``gpu_expected_count``; the
  count comes from configuration, never from the guest) or ``gpu-lost`` (a GPU, or NVML itself,
  does not answer);
- :class:`~attestd.state.GpuReset` when the GPUs pass but are not the ones last seen: the UUID set
  changed, the first passing check after any failure (a GPU back from loss, CC toggled: whatever
  happened, its evidence must pass again), or the ready state that attestd set was cleared behind
  its back (a reset scrubs it);
- :class:`~attestd.state.GpuFastOk` otherwise.

The checks run in that order (CC state first, then the count, then each GPU), so the first
failure names the reason. A check never raises for what NVML answers: fail closed is the state
machine's job, so an NVML error in a check is ``gpu-lost`` with the NVML call and error in the
line. Only a library that cannot be loaded at all raises, as :class:`NvmlError` (a
:class:`~confinfer.errors.ConfinferError`, reason ``config-invalid``).

:class:`Nvml` is the thin layer over pynvml: every NVML error becomes one :class:`NvmlError`
naming the call, the NVML code and its string, never a traceback. It also sets and clears the CC
GPUs ready state (``nvmlSystemSetConfComputeGpusReadyState``), which attestd sets only after a
healthy full pass and clears on revocation and at stop (:meth:`GpuChecker.set_ready`,
:meth:`GpuChecker.clear_ready`).

**Loading the configured library.** pynvml has no parameter for the library path: its
``nvmlInit*`` calls ``_LoadNvmlLibrary()``, which loads ``libnvidia-ml.so.1`` from the loader's
search path only if the module global ``pynvml.nvmlLib`` is still ``None``, and every wrapper
resolves its symbol through ``_nvmlGetFunctionPointer`` (which reads ``nvmlLib``, under
``pynvml.libLoadLock``, and caches the pointer in ``_nvmlGetFunctionPointer_cache``). So
:func:`bind_library` takes ``libLoadLock``, loads the configured path with ``ctypes.CDLL`` and
assigns it to ``pynvml.nvmlLib`` (clearing the pointer cache) before the first ``nvmlInit``;
``_LoadNvmlLibrary`` then sees a loaded library and leaves it alone. These are module internals
(checked against nvidia-ml-py 13.615.71), so the binding is checked at import: a pynvml without
them fails loudly rather than silently loading another library. One process binds one library at
a time: rebinding to another path is refused while NVML is initialised.

The testbed's fake NVML re-reads the state file named by ``$CONFINFER_TESTBED_GPU_STATE`` on
every call, so that variable must be set in the process that loads the library (``source
testbed.env`` does it).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pynvml  # type: ignore[import-untyped]

from attestd.state import GpuFastFailed, GpuFastOk, GpuReset
from confinfer.attestd_api import MAX_UUID_CHARS, Gpu, GpuSummary
from confinfer.config import Config
from confinfer.errors import ConfinferError, Reason, printable

T = TypeVar("T")

FastObservation = GpuFastOk | GpuFastFailed | GpuReset

# nvml.h facts, as pynvml names them.
NVML_SUCCESS = 0
INIT_FLAG_NO_GPUS = pynvml.NVML_INIT_FLAG_NO_GPUS  # count 0 is an answer, not an init error
ERROR_NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
ERROR_NO_PERMISSION = pynvml.NVML_ERROR_NO_PERMISSION
ERROR_FUNCTION_NOT_FOUND = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
ERROR_ARGUMENT_VERSION_MISMATCH = pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH
ERROR_GPU_IS_LOST = pynvml.NVML_ERROR_GPU_IS_LOST
ENVIRONMENT_PROD = pynvml.NVML_CC_SYSTEM_ENVIRONMENT_PROD
FEATURE_ENABLED = pynvml.NVML_CC_SYSTEM_FEATURE_ENABLED
DEVTOOLS_OFF = pynvml.NVML_CC_SYSTEM_DEVTOOLS_MODE_OFF
READY_TRUE = pynvml.NVML_CC_ACCEPTING_CLIENT_REQUESTS_TRUE
READY_FALSE = pynvml.NVML_CC_ACCEPTING_CLIENT_REQUESTS_FALSE

ENVIRONMENTS = {0: "UNAVAILABLE", 1: "SIM", 2: "PRODUCTION"}
MULTI_GPU_MODES = {0: "none", 1: "protected-pcie", 2: "nvle"}

_PYNVML_INTERNALS = ("nvmlLib", "libLoadLock", "_nvmlGetFunctionPointer_cache", "_nvmlLib_refcount")
if not all(hasattr(pynvml, name) for name in _PYNVML_INTERNALS):  # pragma: no cover
    raise ImportError(
        "this nvidia-ml-py lacks the module globals attestd binds the configured NVML library "
        f"through ({', '.join(_PYNVML_INTERNALS)}); see attestd/gpu.py"
    )


class NvmlError(ConfinferError):
    """NVML failed: ``details`` has the ``call`` and, for an NVML return code, ``nvml_code``."""

    reason = Reason.ERROR

    @property
    def code(self) -> int | None:
        code = self.details.get("nvml_code")
        return code if isinstance(code, int) else None


def _nvml_error(call: str, exc: Exception) -> NvmlError:
    code = getattr(exc, "value", None)
    text = printable(str(exc), 200)
    if not isinstance(code, int):
        return NvmlError(f"NVML {call}: {text}", details={"call": call})
    reason = Reason.GPU_LOST if code == ERROR_GPU_IS_LOST else Reason.ERROR
    hint = None
    if code == ERROR_NO_PERMISSION:
        hint = "setting the GPU ready state needs root (attestd runs as root)"
    return NvmlError(
        f"NVML {call}: {text} (NVML error {code})",
        reason=reason,
        details={"call": call, "nvml_code": code},
        hint=hint,
    )


# --- binding pynvml to the configured library ------------------------------------------------

_bound_path: str | None = None


def bind_library(path: str) -> None:
    """Make pynvml use the NVML library at ``path`` (a file path, or a bare soname searched the
    dynamic loader's way). See the module docstring for why this is how."""
    global _bound_path
    with pynvml.libLoadLock:
        if pynvml.nvmlLib is not None and _bound_path == path:
            return
        if pynvml.nvmlLib is not None and pynvml._nvmlLib_refcount > 0:
            raise NvmlError(
                f"cannot load the NVML library {path!r}: NVML is already initialised from "
                f"{_bound_path or 'pynvml default'!r} in this process",
                reason=Reason.CONFIG_INVALID,
                details={"call": "load", "library": path},
            )
        try:
            library = ctypes.CDLL(path)
        except OSError as exc:
            raise NvmlError(
                f"cannot load the NVML library {path!r}: {printable(exc, 300)}",
                reason=Reason.CONFIG_INVALID,
                details={"call": "load", "library": path},
                hint="set nvml_library (CONFINFER_NVML_LIBRARY) to the driver's libnvidia-ml.so.1",
            ) from None
        pynvml.nvmlLib = library
        pynvml._nvmlGetFunctionPointer_cache.clear()
        _bound_path = path


# --- the NVML calls attestd makes -------------------------------------------------------------


@dataclass(frozen=True)
class CcSettings:
    """The system's confidential-computing settings as NVML reports them (raw nvml.h values)."""

    environment: int
    cc_feature: int
    devtools: int
    multi_gpu: int | None = None  # None: from nvmlSystemGetConfComputeState (no such field)

    @property
    def environment_name(self) -> str:
        return ENVIRONMENTS.get(self.environment, f"unknown ({self.environment})")


class Nvml:
    """NVML through pynvml (or, for tests, any object with pynvml's function names as
    ``binding``). Every NVML error is an :class:`NvmlError`. Thread-safe: one call at a time."""

    def __init__(self, library: str, *, binding: Any = None) -> None:
        self.library = library
        self._binding = binding
        self._nvml: Any = binding if binding is not None else pynvml
        self._open = False
        self._lock = threading.RLock()

    @property
    def is_open(self) -> bool:
        return self._open

    def _call(self, call: str, fn: Callable[[], T]) -> T:
        with self._lock:
            try:
                return fn()
            except pynvml.NVMLError as exc:
                raise _nvml_error(call, exc) from None

    def open(self) -> None:
        """Load the library (the first time) and initialise NVML, with zero GPUs allowed."""
        with self._lock:
            if self._open:
                return
            if self._binding is None:
                bind_library(self.library)
            self._call("nvmlInitWithFlags", lambda: self._nvml.nvmlInitWithFlags(INIT_FLAG_NO_GPUS))
            self._open = True

    def close(self) -> None:
        """Shut NVML down (the library stays loaded, as pynvml keeps it). Errors are ignored:
        closing is what one does after an error."""
        with self._lock:
            if not self._open:
                return
            self._open = False
            try:
                self._nvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass

    def __enter__(self) -> Nvml:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def count(self) -> int:
        return int(self._call("nvmlDeviceGetCount", self._nvml.nvmlDeviceGetCount))

    def uuid(self, index: int) -> str:
        handle = self._call(
            "nvmlDeviceGetHandleByIndex", lambda: self._nvml.nvmlDeviceGetHandleByIndex(index)
        )
        raw = self._call("nvmlDeviceGetUUID", lambda: self._nvml.nvmlDeviceGetUUID(handle))
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        return printable(text, MAX_UUID_CHARS)

    def cc_settings(self) -> CcSettings:
        """``nvmlSystemGetConfComputeSettings`` (v1, with the multi-GPU mode), falling back to
        ``nvmlSystemGetConfComputeState`` on a driver without it."""
        settings = pynvml.c_nvmlSystemConfComputeSettings_v1_t()
        try:
            rc = self._call(
                "nvmlSystemGetConfComputeSettings",
                lambda: self._nvml.nvmlSystemGetConfComputeSettings(ctypes.byref(settings)),
            )
        except NvmlError as exc:  # the symbol is missing: pynvml raises FUNCTION_NOT_FOUND
            if exc.code != ERROR_FUNCTION_NOT_FOUND:
                raise
            rc = ERROR_FUNCTION_NOT_FOUND
        if rc == NVML_SUCCESS:
            return CcSettings(
                settings.environment,
                settings.ccFeature,
                settings.devToolsMode,
                settings.multiGpuMode,
            )
        if rc not in (
            ERROR_FUNCTION_NOT_FOUND,
            ERROR_NOT_SUPPORTED,
            ERROR_ARGUMENT_VERSION_MISMATCH,
        ):
            raise _nvml_error("nvmlSystemGetConfComputeSettings", pynvml.NVMLError(rc))
        state = self._call(
            "nvmlSystemGetConfComputeState", self._nvml.nvmlSystemGetConfComputeState
        )
        return CcSettings(state.environment, state.ccFeature, state.devToolsMode)

    def ready(self) -> bool:
        value = self._call(
            "nvmlSystemGetConfComputeGpusReadyState",
            self._nvml.nvmlSystemGetConfComputeGpusReadyState,
        )
        return bool(int(value) == READY_TRUE)

    def set_ready(self, ready: bool) -> None:
        """Set (True) or clear (False) the system-wide CC GPUs ready state; needs root."""
        value = READY_TRUE if ready else READY_FALSE
        self._call(
            "nvmlSystemSetConfComputeGpusReadyState",
            lambda: self._nvml.nvmlSystemSetConfComputeGpusReadyState(value),
        )


# --- the fast check ---------------------------------------------------------------------------


class _Failed(Exception):
    def __init__(self, reason: Reason, line: str) -> None:
        super().__init__(line)
        self.reason = reason
        self.line = line


class GpuChecker:
    """The fast checks against ``expected`` GPUs; remembers what it last saw, to see resets."""

    def __init__(self, nvml: Nvml, expected: int) -> None:
        if not 0 <= expected <= 64:
            raise ValueError(f"expected GPU count must be 0..64, not {expected}")
        self.nvml = nvml
        self.expected = expected
        self._lock = threading.Lock()
        self._uuids: tuple[str, ...] | None = None  # the set of the last passing check
        self._failed = False  # a check failed since the last pass
        self._ready_set = False  # attestd set the ready state and has not cleared it
        self._summary = GpuSummary(count=0, expected=expected, devices=())

    @classmethod
    def from_config(cls, cfg: Config) -> GpuChecker:
        return cls(Nvml(cfg.nvml_library), cfg.gpu_expected_count)

    def open(self) -> None:
        """Load the library and initialise NVML. Raises :class:`NvmlError` (start-up fails
        clearly on a missing library; a check would only say ``gpu-lost``)."""
        self.nvml.open()

    def close(self) -> None:
        self.nvml.close()

    def summary(self) -> GpuSummary:
        """The GPUs the last check read (for ``/v1/health``)."""
        return self._summary

    def check(self) -> FastObservation:
        """One fast check. Never raises for an NVML answer (see the module docstring)."""
        with self._lock:
            uuids: list[str] = []
            cc_ok = False
            ready = False
            try:
                self._open_for_check()
                cc_ok = self._check_cc()
                self._check_count()
                uuids = self._read_uuids()
                ready = self._read_ready()
            except _Failed as failed:
                self._failed = True
                if not uuids and failed.reason is not Reason.GPU_LOST:
                    uuids = self._visible_uuids()  # so health still lists the GPUs it refused
                self._keep(self._summarise(uuids, cc_ok, ready))
                return GpuFastFailed(failed.reason, failed.line)
            self._keep(self._summarise(uuids, cc_ok, ready))
            return self._compare(tuple(uuids), ready)

    def _keep(self, summary: GpuSummary) -> None:
        """Replace the summary only when it changed: callers may cache on its identity."""
        if summary != self._summary:
            self._summary = summary

    def set_ready(self) -> None:
        """Set the GPU ready state (after a healthy full pass). Raises :class:`NvmlError`."""
        with self._lock:
            self.nvml.open()
            self.nvml.set_ready(True)
            self._ready_set = True

    def clear_ready(self) -> None:
        """Clear the GPU ready state (on revocation, at stop). Raises :class:`NvmlError`."""
        with self._lock:
            self.nvml.open()
            self.nvml.set_ready(False)
            self._ready_set = False

    # -- the steps, in order; each raises _Failed with the reason that explains it

    def _lost(self, exc: NvmlError, what: str) -> _Failed:
        if exc.code is not None and exc.code != ERROR_GPU_IS_LOST:
            self.nvml.close()  # NVML's own state may be stale: initialise afresh next time
        return _Failed(Reason.GPU_LOST, f"{what}: {exc.message}")

    def _open_for_check(self) -> None:
        try:
            self.nvml.open()
        except NvmlError as exc:
            raise _Failed(Reason.GPU_LOST, f"NVML unavailable: {exc.message}") from None

    def _check_cc(self) -> bool:
        try:
            cc = self.nvml.cc_settings()
        except NvmlError as exc:
            raise self._lost(exc, "cannot read the confidential-computing state") from None
        if cc.cc_feature != FEATURE_ENABLED:
            mode = MULTI_GPU_MODES.get(cc.multi_gpu, str(cc.multi_gpu)) if cc.multi_gpu else None
            extra = f"; multi-GPU mode {mode} is not accepted instead" if mode else ""
            raise _Failed(
                Reason.GPU_CC_OFF,
                f"confidential computing is off (NVML ccFeature={cc.cc_feature}){extra}",
            )
        if cc.environment != ENVIRONMENT_PROD:
            raise _Failed(
                Reason.GPU_NOT_PRODUCTION,
                f"confidential-computing environment is {cc.environment_name}, not PRODUCTION",
            )
        if cc.devtools != DEVTOOLS_OFF:
            raise _Failed(
                Reason.GPU_DEVTOOLS,
                f"confidential-computing DevTools mode is on (NVML devToolsMode={cc.devtools})",
            )
        return True

    def _check_count(self) -> None:
        try:
            count = self.nvml.count()
        except NvmlError as exc:
            raise self._lost(exc, "cannot count the GPUs") from None
        if count != self.expected:
            raise _Failed(
                Reason.GPU_COUNT_MISMATCH,
                f"NVML sees {count} GPU{'s' if count != 1 else ''}; the configuration expects "
                f"{self.expected} (gpu_expected_count)",
            )

    def _read_uuids(self) -> list[str]:
        uuids: list[str] = []
        for index in range(self.expected):
            try:
                uuids.append(self.nvml.uuid(index))
            except NvmlError as exc:
                raise self._lost(exc, f"GPU {index} lost") from None
        if len(set(uuids)) != len(uuids):
            raise _Failed(Reason.GPU_LOST, f"GPUs report duplicate UUIDs: {', '.join(uuids)}")
        return uuids

    def _visible_uuids(self) -> list[str]:
        """The GPUs NVML lists, for the summary only, after a check failed (never raises)."""
        try:
            return [self.nvml.uuid(i) for i in range(min(self.nvml.count(), 64))]
        except NvmlError:
            return []

    def _read_ready(self) -> bool:
        try:
            return self.nvml.ready()
        except NvmlError as exc:
            raise self._lost(exc, "cannot read the GPU ready state") from None

    def _compare(self, uuids: tuple[str, ...], ready: bool) -> FastObservation:
        previous, failed = self._uuids, self._failed
        self._uuids, self._failed = uuids, False
        why: list[str] = []
        if previous is not None and set(previous) != set(uuids):
            gone = ", ".join(sorted(set(previous) - set(uuids))) or "-"
            new = ", ".join(sorted(set(uuids) - set(previous))) or "-"
            why.append(f"the GPU set changed (gone: {gone}; new: {new})")
        elif failed and previous is not None:
            why.append("the GPUs pass again after a failed fast check")
        if self._ready_set and not ready:
            self._ready_set = False
            why.append("the GPU ready state was cleared outside attestd (a reset scrubs it)")
        return GpuReset("; ".join(why)) if why else GpuFastOk()

    def _summarise(self, uuids: list[str], cc_ok: bool, ready: bool) -> GpuSummary:
        devices = tuple(Gpu(uuid=u, cc=cc_ok, ready=ready) for u in uuids)
        return GpuSummary(count=len(devices), expected=self.expected, devices=devices)
