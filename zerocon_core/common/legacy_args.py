"""Old keyword (and positional) arguments of a function whose options moved into a settings dataclass.

``merge_settings(cls, settings, args, kwargs, where)`` returns ``settings`` (or ``cls()``) with the old-style
values put in: positional ``args`` fill the dataclass's fields in their order, ``kwargs`` by name. Unknown
names, too many positional values and a name given twice raise ``TypeError`` the way Python does for a call.
``from_old_keywords`` builds a grouped argument from old keywords of other names (``source_cond=`` ->
``Conditionings.source``), and ``reject_unknown`` is Python's error for a keyword nobody takes.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, Mapping, Sequence, TypeVar

T = TypeVar("T")


def merge_settings(cls: type[T], settings: T | None, args: Sequence[Any], kwargs: Mapping[str, Any], where: str) -> T:
    """``settings`` (None: ``cls()``) with ``args`` / ``kwargs`` (old call style) replacing its fields."""
    base = cls() if settings is None else settings
    names = [f.name for f in fields(cls) if f.init]
    if len(args) > len(names):
        raise TypeError(f"{where}() got {len(args)} extra positional arguments; it takes at most {len(names)}")
    values = dict(zip(names, args))
    for key, value in kwargs.items():
        if key not in names:
            raise TypeError(f"{where}() got an unexpected keyword argument {key!r}")
        if key in values:
            raise TypeError(f"{where}() got multiple values for argument {key!r}")
        values[key] = value
    return replace(base, **values) if values else base


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
