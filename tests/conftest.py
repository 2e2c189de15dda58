"""Suite-wide settings.

Hypothesis: no per-example deadline. Timing belongs in benchmarks; on a loaded two-core CI
machine a deadline turns a slow example into a spurious failure. Failures print the blob that
reproduces them.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "confinfer",
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("confinfer")
