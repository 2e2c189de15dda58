"""Objects that hold something to give back (a TPM context, a key, a descriptor, a terminal line).

Subclasses define :meth:`close`; ``with obj:`` closes it on the way out, on success or error.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self


class Closable(ABC):
    @abstractmethod
    def close(self) -> None:
        """Give back what the object holds; safe to call twice."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
