"""Old keyword (and positional) arguments of a function whose options moved into a settings dataclass.

``merge_settings(cls, settings, args, kwargs, where)`` returns ``settings`` (or ``cls()``) with the old-style
values put in: positional ``args`` fill the dataclass's fields in their order, ``kwargs`` by name. Unknown
names, too many positional values and a name given twice raise ``TypeError`` the way Python does for a call.
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
