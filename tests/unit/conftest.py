"""Unit tests start no processes: a stray subprocess fails the test that started it."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _no_subprocesses(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(self: Any, args: Any, *rest: Any, **kwargs: Any) -> None:
        raise AssertionError(f"a unit test started a process: {args!r} (move it to integration)")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    yield
