"""How the loops are called: the progress and interrupt ``Hooks`` the sampler and the inversion share, and the
old keywords (one per field) they still accept in place of a grouped argument."""

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


def from_old_keywords(func: str, param: str, given: Any, cls: type, old: dict[str, Any], names: dict[str, str]) -> Any:
    """``given``, or (when the caller used the old keywords) a ``cls`` built from them: ``names`` maps each old
    keyword to its field; the keywords found are popped from ``old``. None when neither was passed.
    ``TypeError`` when both ``param`` and old keywords were passed."""
    used = [k for k in old if k in names]
    if not used:
        return given
    if given is not None:
        raise TypeError(f"{func}() got {param}= and the old keywords {', '.join(used)}: pass one")
    return cls(**{names[k]: old.pop(k) for k in used})


def reject_unknown(func: str, old: dict[str, Any], *known: dict[str, str]) -> None:
    """``TypeError`` as Python's own for the first keyword in ``old`` that is none of the ``known`` old keywords."""
    unknown = [k for k in old if not any(k in names for names in known)]
    if unknown:
        raise TypeError(f"{func}() got an unexpected keyword argument {unknown[0]!r}")
