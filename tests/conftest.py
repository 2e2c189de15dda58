"""Suite-wide settings.

Hypothesis: no per-example deadline. Timing belongs in benchmarks; on a loaded two-core CI
machine a deadline turns a slow example into a spurious failure. Failures print the blob that
reproduces them.

Logging: the root logger is put back after every test.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "confinfer",
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("confinfer")


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A command run in-process (``main([...])``) points the root logger at the sys.stderr of
    that moment, pytest's capture, which is closed after the test; later log lines (a testbed's
    access log) would then fail. Every test gets the root logger back as it found it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
