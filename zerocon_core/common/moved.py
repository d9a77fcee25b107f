"""Old import paths of modules that moved into folders keep working (CHANGELOG.md lists them).

``install(package, moved)`` adds a finder to ``sys.meta_path``: importing ``<package>.<old>`` imports
``<package>.<new>`` and registers the same module object under the old name, so attributes set through either
name (a monkeypatch in a test, say) are seen by both; ``python -m <old name>`` runs the moved module. Nothing is
imported until an old name is asked for.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        """The target module already ran; nothing to do."""

    def get_code(self, fullname: str):
        """What ``python -m <old name>`` runs: the moved module as ``__main__``."""
        source = f"import runpy\nrunpy.run_module({self.target!r}, run_name='__main__', alter_sys=True)\n"
        return compile(source, f"<{fullname}: moved to {self.target}>", "exec")


class _MovedFinder(importlib.abc.MetaPathFinder):
    def __init__(self, package: str, moved: dict[str, str]) -> None:
        self.names = {f"{package}.{old}": f"{package}.{new}" for old, new in moved.items()}

    def find_spec(self, fullname, path=None, target=None):
        head, tail = fullname, ""
        while head not in self.names:  # a submodule of a moved package: toyworld.checker
            head, _, last = head.rpartition(".")
            if not head:
                return None
            tail = f".{last}{tail}"
        target_name = self.names[head] + tail
        return importlib.util.spec_from_loader(fullname, _Alias(target_name))


def install(package: str, moved: dict[str, str]) -> None:
    """Let ``<package>.<old>`` import as ``<package>.<new>`` for each pair of ``moved`` (idempotent)."""
    for finder in sys.meta_path:
        if isinstance(finder, _MovedFinder) and next(iter(finder.names), "").startswith(package + "."):
            return
    sys.meta_path.append(_MovedFinder(package, moved))


def old_attribute(package: str, moved: dict[str, str]):
    """A module ``__getattr__`` for ``package``: ``package.<old>`` reads the moved module (imported on first use)."""

    def __getattr__(name: str):
        if name not in moved:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return importlib.import_module(f"{package}.{moved[name]}")

    return __getattr__
