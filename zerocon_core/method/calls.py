"""How the loops are called: the progress and interrupt ``Hooks`` the sampler and the inversion share, and the
old keywords of its fields (``common.legacy_args`` turns old keywords into grouped arguments)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

#: The old keywords of ``Hooks``' fields.
HOOK_KEYWORDS = {"callback": "callback", "check_interrupt": "check_interrupt"}


@dataclass(frozen=True)
class Hooks:
    """``callback(i, n, x, ...)`` after each step ``i`` of ``n`` (the sampler adds the step's ``x0``);
    ``check_interrupt()`` before each step (it raises to stop the loop)."""

    callback: Callable[..., None] | None = None
    check_interrupt: Callable[[], None] | None = None

    def interrupt(self) -> None:
        """Call ``check_interrupt`` (if any): it raises to stop."""
        if self.check_interrupt is not None:
            self.check_interrupt()

    def progress(self, *args: Any) -> None:
        """Call ``callback(*args)`` (if any)."""
        if self.callback is not None:
            self.callback(*args)
