"""Run NVIDIA's legacy Python local GPU verifier (LGV) once and print what it found as JSON.

This script is executed by the LGV's own virtualenv (``<venv>/bin/python -I lgv_runner.py``),
so it imports nothing of confinfer or attestd: the standard library and the LGV's ``verifier``
package only. It decides nothing; :mod:`attestd.lgv` reads its one JSON document and applies the
relying-party checks.

The LGV's Python API, as the ``nv-local-gpu-verifier`` 2.7.3 wheel and Azure's onboarding build
(``az-cgpu-onboarding`` ``src/local_gpu_verifier``) both have it:

- ``verifier.cc_admin.collect_gpu_evidence_local(nonce_hex)`` -> a list of NVML handler objects
  (the 32-byte nonce is sent to each GPU's SPDM GET_MEASUREMENTS);
- ``verifier.cc_admin.attest(arguments: dict, nonce_hex, evidence_list)`` -> ``(bool,
  detached_eat)``, the detached EAT ``[["JWT", overall], {"GPU-0": jwt, ...}]`` of HS256 JWTs
  signed with the literal key ``"secret"`` (no trust boundary: their content is what counts).
  ``attest`` catches its own exceptions: a failed step shows as a false claim, and the exception
  only in its log records (``gpu-verifier-event``/``gpu-verifier-info`` loggers);
- ``verifier.nvml.NvmlHandler.init_nvml()``/``is_cc_enabled()``/``is_ppcie_mode_enabled()``/
  ``is_cc_dev_mode()``;
- ``verifier.cc_admin_utils.CcAdminUtils.fetch_rim_file`` and ``.send_ocsp_request``: the only
  two network calls (the RIM service and the OCSP responder).

What this runner does:

- the LGV logs to stdout (a handler bound at import) and writes ``verifier.log`` into the working
  directory (deleting an old one): file descriptor 1 is pointed at stderr before the import, the
  working directory is a private temporary one, and the document goes to the saved stdout;
- NVML is initialised once, first, and its CC state read; a failure there ends the run (without
  a GPU, nvmlInit blocks for the LGV's 30-second NVML timeout; it is not waited on twice);
- ``attest`` runs in user mode (the LGV never changes the GPU ready state: attestd does, after
  its own checks), with the caller's nonce, strict OCSP (no certificate hold, no validity or
  revocation grace: ``ocsp_attestation_settings = strict`` on Azure's build,
  ``allow_hold_cert = False`` upstream), the OCSP nonce on, and the RIM/OCSP URLs given;
- the two network calls are wrapped to record each call's outcome (ok, the exception chain, or
  still pending when ``attest`` returned: the LGV's own thread timeout gave up on it);
- exceptions seen in the LGV's log records are reported with their cause/context chains.

Document (``runner`` 1; keys sorted): ``stage`` (``import``, ``api``, ``nvml``, ``collect``,
``attest``, ``done``: how far it got), ``nonce``, ``lgv`` (package version, the verifier's own
version, API flavour), ``nvml`` (``initialized``, ``cc_feature``, ``ppcie``, ``devtools``),
``result`` (the LGV's overall result), ``detached_eat``, ``overall_claims`` and ``claims`` (the
token payloads, decoded, per GPU in index order), ``errors`` and ``collateral``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import importlib
import importlib.metadata
import inspect
import json
import logging
import os
import sys
import tempfile
import urllib.error
from collections.abc import Callable, Iterator
from typing import Any, TextIO

RUNNER_VERSION = 1
PACKAGE = "nv-local-gpu-verifier"
MAX_MESSAGE = 400
MAX_CHAIN = 8
MAX_ERRORS = 16
LOGGERS = ("gpu-verifier-event", "gpu-verifier-info")
NETWORK_CALLS = (("fetch_rim_file", "rim"), ("send_ocsp_request", "ocsp"))


def describe(exc: BaseException) -> list[dict[str, Any]]:
    """The exception and its causes (``__cause__``, else ``__context__``), outermost first: each
    with its class, the classes it derives from, its message and an HTTP status if it has one."""
    out: list[dict[str, Any]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(out) < MAX_CHAIN:
        seen.add(id(current))
        kind = type(current)
        entry: dict[str, Any] = {
            "type": f"{kind.__module__}.{kind.__qualname__}",
            "mro": [f"{k.__module__}.{k.__qualname__}" for k in kind.__mro__],
            "message": str(current)[:MAX_MESSAGE],
        }
        if isinstance(current, urllib.error.HTTPError):
            entry["http_status"] = current.code
        out.append(entry)
        current = current.__cause__ or current.__context__
    return out


class Capture(logging.Handler):
    """Keeps the exceptions the LGV logs (``log.exception(...)`` or ``log.error(exc)``)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.errors: list[dict[str, Any]] = []
        self._seen: set[int] = set()

    def emit(self, record: logging.LogRecord) -> None:
        exc: BaseException | None = None
        if record.exc_info and isinstance(record.exc_info[1], BaseException):
            exc = record.exc_info[1]
        elif isinstance(record.msg, BaseException):
            exc = record.msg
        if exc is None or id(exc) in self._seen or len(self.errors) >= MAX_ERRORS:
            return
        self._seen.add(id(exc))
        self.errors.append({"where": "attest", "chain": describe(exc)})


def wrap_network(utils: Any, records: list[dict[str, Any]]) -> None:
    """Record every RIM and OCSP call the LGV makes through ``CcAdminUtils``."""
    for name, service in NETWORK_CALLS:
        original = getattr(utils, name, None)
        if not callable(original):
            continue

        def call(
            *args: Any,
            _original: Callable[..., Any] = original,
            _service: str = service,
            **kwargs: Any,
        ) -> Any:
            record: dict[str, Any] = {"service": _service, "outcome": "pending"}
            records.append(record)
            try:
                value = _original(*args, **kwargs)
            except BaseException as exc:
                record["outcome"] = "error"
                record["chain"] = describe(exc)
                raise
            record["outcome"] = "ok"
            return value

        setattr(utils, name, staticmethod(call))


def arguments(options: argparse.Namespace) -> dict[str, Any]:
    """``attest``'s options dictionary, with the keys of both API flavours: upstream reads
    ``ocsp_url``/``ocsp_nonce_disabled``/``claims_version``/``service_key``; Azure's build reads
    ``ocsp_service_url``/``ocsp_nonce_enabled``/``ocsp_attestation_settings`` and the grace
    extensions. Each ignores the other's."""
    return {
        "verbose": False,
        "test_no_gpu": False,
        "driver_rim": None,
        "vbios_rim": None,
        "rim_root_cert": None,
        "user_mode": True,
        "nonce": options.nonce,
        "allow_hold_cert": False,
        "service_key": None,
        "claims_version": options.claims_version,
        "rim_service_url": options.rim_url,
        "ocsp_url": options.ocsp_url,
        "ocsp_service_url": options.ocsp_url,
        "ocsp_nonce_disabled": False,
        "ocsp_nonce_enabled": True,
        "ocsp_attestation_settings": "strict",
        "ocsp_validity_extension": 0,
        "ocsp_cert_revocation_extension_device": 0,
        "ocsp_cert_revocation_extension_driver_rim": 0,
        "ocsp_cert_revocation_extension_vbios_rim": 0,
    }


def token_payload(token: object) -> Any:
    """The payload of a compact JWT, decoded (no verification: the key is public)."""
    if not isinstance(token, str):
        return None
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        raw = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        return json.loads(raw)
    except (binascii.Error, ValueError):
        return None


def decode_eat(eat: Any, doc: dict[str, Any]) -> None:
    if not (isinstance(eat, list) and len(eat) == 2 and isinstance(eat[1], dict)):
        return
    if isinstance(eat[0], list) and len(eat[0]) == 2:
        doc["overall_claims"] = token_payload(eat[0][1])

    def index(name: str) -> int:
        digits = name.removeprefix("GPU-")
        return int(digits) if digits.isdigit() else sys.maxsize

    doc["claims"] = [token_payload(eat[1][name]) for name in sorted(eat[1], key=index)]


def lgv_versions(config: Any) -> dict[str, Any]:
    try:
        package: str | None = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        package = None
    verifier_version = getattr(config, "__version__", None)
    return {
        "package": PACKAGE,
        "version": package,
        "verifier_version": verifier_version if isinstance(verifier_version, str) else None,
    }


def flavour(config: Any) -> str:
    """``azure`` for the onboarding kit's build (it picks THIM mirrors by region), else
    ``upstream``."""
    settings = getattr(config, "BaseSettings", None)
    return "azure" if hasattr(settings, "set_thim_rim_service_base_url") else "upstream"


def run(options: argparse.Namespace, doc: dict[str, Any]) -> None:
    """Fill ``doc`` step by step; each step sets ``stage`` before it starts."""
    errors: list[dict[str, Any]] = doc["errors"]
    try:
        config = importlib.import_module("verifier.config")
        cc_admin = importlib.import_module("verifier.cc_admin")
        nvml = importlib.import_module("verifier.nvml")
        utils = importlib.import_module("verifier.cc_admin_utils")
    except Exception as exc:
        errors.append({"where": "import", "chain": describe(exc)})
        return
    doc["lgv"] = lgv_versions(config) | {"api": flavour(config)}

    doc["stage"] = "api"
    attest: Any = getattr(cc_admin, "attest", None)
    collect: Any = getattr(cc_admin, "collect_gpu_evidence_local", None)
    handler: Any = getattr(nvml, "NvmlHandler", None)
    util_class: Any = getattr(utils, "CcAdminUtils", None)
    problem = None
    if not callable(attest) or not callable(collect) or handler is None or util_class is None:
        problem = "verifier.cc_admin has no attest/collect_gpu_evidence_local, or no NvmlHandler"
    elif len(inspect.signature(attest).parameters) != 3:
        problem = "verifier.cc_admin.attest does not take (arguments, nonce, evidence_list)"
    if problem is not None:
        errors.append({"where": "api", "chain": [{"type": "api", "mro": [], "message": problem}]})
        return

    capture = Capture()
    for name in LOGGERS:
        logging.getLogger(name).addHandler(capture)
    wrap_network(util_class, doc["collateral"])

    doc["stage"] = "nvml"
    state: dict[str, Any] = doc["nvml"]
    try:
        handler.init_nvml()
        state["initialized"] = True
        state["cc_feature"] = bool(handler.is_cc_enabled())
        ppcie = getattr(handler, "is_ppcie_mode_enabled", None)  # older builds lack it
        state["ppcie"] = bool(ppcie()) if callable(ppcie) else None
        state["devtools"] = bool(handler.is_cc_dev_mode())
    except Exception as exc:
        errors.append({"where": "nvml", "chain": describe(exc)})
        return
    if not state["cc_feature"] and not state["ppcie"]:
        return

    doc["stage"] = "collect"
    try:
        evidence = collect(options.nonce)
    except Exception as exc:
        errors.append({"where": "collect", "chain": describe(exc)})
        errors.extend(capture.errors)
        return
    if not isinstance(evidence, list) or not evidence:
        message = "collect_gpu_evidence_local returned no evidence"
        errors.append(
            {"where": "collect", "chain": [{"type": "empty", "mro": [], "message": message}]}
        )
        errors.extend(capture.errors)
        return

    doc["stage"] = "attest"
    try:
        answer = attest(arguments(options), options.nonce, evidence)
    except Exception as exc:
        errors.append({"where": "attest", "chain": describe(exc)})
        errors.extend(capture.errors)
        return
    errors.extend(capture.errors)
    if not (isinstance(answer, tuple) and len(answer) == 2):
        kind = type(answer).__name__
        errors.append(
            {
                "where": "attest",
                "chain": [{"type": "api", "mro": [], "message": f"attest returned a {kind}"}],
            }
        )
        return
    result, eat = answer
    doc["result"] = result if isinstance(result, bool) else None
    try:
        json.dumps(eat)
    except (TypeError, ValueError):
        eat = None
    doc["detached_eat"] = eat
    decode_eat(eat, doc)
    doc["stage"] = "done"


@contextlib.contextmanager
def quiet_stdout() -> Iterator[TextIO]:
    """Yield the real stdout; meanwhile file descriptor 1 (and ``sys.stdout``) go to stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    real = os.fdopen(saved, "w", encoding="utf-8")
    try:
        yield real
    finally:
        real.flush()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lgv_runner", description="Run the LGV once; print JSON.")
    parser.add_argument("--nonce", required=True, help="32 bytes as 64 hex digits")
    parser.add_argument("--claims-version", default="3.0", choices=("2.0", "3.0"))
    parser.add_argument("--rim-url", default=None)
    parser.add_argument("--ocsp-url", default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(sys.argv[1:] if argv is None else argv)
    doc: dict[str, Any] = {
        "runner": RUNNER_VERSION,
        "stage": "import",
        "nonce": options.nonce,
        "lgv": None,
        "nvml": {"initialized": False, "cc_feature": None, "ppcie": None, "devtools": None},
        "result": None,
        "detached_eat": None,
        "overall_claims": None,
        "claims": None,
        "errors": [],
        "collateral": [],
    }
    with quiet_stdout() as out, tempfile.TemporaryDirectory(prefix="confinfer-lgv-") as scratch:
        os.chdir(scratch)  # the LGV writes (and first deletes) ./verifier.log
        try:
            run(options, doc)
        except Exception as exc:  # a fault of this runner: reported, decided as a failure
            doc["errors"].append({"where": "runner", "chain": describe(exc)})
        finally:
            os.chdir("/")
        out.write(json.dumps(doc, sort_keys=True, ensure_ascii=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
