"""The registry of family adapters: every module of this package that exports ``ADAPTERS`` is a family module.

Adding a family means adding one module: ``FamilyRegistry`` finds it (``pkgutil`` over the package), orders
its adapters by rank with the others', and from then on ``detect_family`` recognises its models, the
"unsupported" error names it, and ``ModelFamily`` reads its settings. A family module may also export
``refuse_unclaimed(base)``: the refusals, with their own wording, for networks of its kind that no adapter
claims (a video UNet, an unrecognised UNet). The family modules are found on the registry's first use, so this
module imports none of them (they import it, through ``model_family``).
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable

from .adapter import FamilyAdapter


def _discover() -> list[ModuleType]:
    """The family modules of this package (those exporting ``ADAPTERS``), in file-name order."""
    package = __name__.rpartition(".")[0]
    out = []
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda m: m.name):
        module = importlib.import_module(f"{package}.{info.name}")
        if getattr(module, "ADAPTERS", None):
            out.append(module)
    return out


class FamilyRegistry:
    """The family modules in use and their adapters, ordered by ``FamilyAdapter.rank``.

    ``discover``: called once, on first use, for more modules to register (after ``modules``)."""

    def __init__(
        self, modules: Iterable[ModuleType] = (), discover: Callable[[], Iterable[ModuleType]] | None = None
    ) -> None:
        self._modules: list[ModuleType] = []
        self._discover = discover
        for module in modules:
            self.add(module)

    def _loaded(self) -> list[ModuleType]:
        """The registered modules, the discovered ones added on the first call."""
        if self._discover is not None:
            discover, self._discover = self._discover, None
            for module in discover():
                self.add(module)
        return self._modules

    @property
    def modules(self) -> tuple[ModuleType, ...]:
        return tuple(self._loaded())

    def adapters(self) -> tuple[FamilyAdapter, ...]:
        """Every registered adapter, by rank."""
        found = [a for module in self._loaded() for a in module.ADAPTERS]
        return tuple(sorted(found, key=lambda a: (a.rank, a.name)))

    def add(self, module: ModuleType) -> None:
        """Register a family module; ``ValueError`` if one of its family names is registered already."""
        taken = {a.name for a in self.adapters()}
        clash = sorted(taken & {a.name for a in module.ADAPTERS})
        if clash:
            raise ValueError(f"ZeroCon: model families {clash} are registered twice")
        self._loaded().append(module)

    def remove(self, module: ModuleType) -> None:
        """Unregister a family module added with ``add``."""
        self._loaded().remove(module)

    def claiming(self, base: Any) -> FamilyAdapter | None:
        """The adapter that recognises the BaseModel ``base`` by its classes, or None."""
        for adapter in self.adapters():
            if adapter.claims(base):
                return adapter
        return None

    def named(self, name: str) -> FamilyAdapter:
        """The adapter of family ``name``; ``KeyError`` if none."""
        for adapter in self.adapters():
            if adapter.name == name:
                return adapter
        raise KeyError(name)

    def refuse_unclaimed(self, base: Any) -> None:
        """Run the family modules' refusals for a network no adapter claims (each may raise)."""
        for module in self._loaded():
            refuse = getattr(module, "refuse_unclaimed", None)
            if refuse is not None:
                refuse(base)


REGISTRY = FamilyRegistry(discover=_discover)


class UnsupportedModelError(ValueError):
    """The MODEL is not one the ZeroCon samplers can run."""


def unsupported(what: str) -> UnsupportedModelError:
    """The error for a MODEL that is ``what``, naming every registered family (``supported_text``)."""
    return UnsupportedModelError(
        f"ZeroCon supports {supported_text()} models only; this MODEL is {what}. "
        f"Load {load_text()} checkpoint (LoRAs and other model patches are fine)."
    )


def article(name: str) -> str:
    """ "an" before a family name read letter by letter (an SD1.x, an SDXL), else "a" (a Flux)."""
    return "an" if name.startswith("SD") else "a"


def _listing(labels: list[str], last: str) -> str:
    return labels[0] if len(labels) == 1 else f"{', '.join(labels[:-1])} {last} {labels[-1]}"


def supported_text() -> str:
    """The registered families as the "supported" sentence names them ("SD1.x, ..., Flux, Chroma, Qwen-Image and Z-Image")."""
    return _listing([a.label for a in REGISTRY.adapters()], "and")


def load_text() -> str:
    """What the "unsupported" error asks to load ("an SD1.x, ..., Flux (dev or schnell) or Chroma")."""
    labels = [a.load_label for a in REGISTRY.adapters()]
    return f"{article(labels[0])} {_listing(labels, 'or')}"


def adapter_named(name: str) -> FamilyAdapter:
    """The registered adapter of family ``name`` (``KeyError`` if none)."""
    return REGISTRY.named(name)


def detect_family(model) -> Any:
    """The ``ModelFamily`` (``model_family``) of a MODEL (ModelPatcher), or ``UnsupportedModelError`` naming what is supported.

    The adapter that recognises the model's classes runs its family's checks; a model no adapter recognises
    gets the family modules' refusals for its kind of network, else the general one."""
    base = getattr(model, "model", None)
    if base is None:
        raise unsupported(f"a {type(model).__name__}, not a ComfyUI MODEL")
    adapter = REGISTRY.claiming(base)
    if adapter is not None:
        return adapter.detect(adapter, model, base)
    REGISTRY.refuse_unclaimed(base)
    raise unsupported(f"a {type(getattr(base, 'diffusion_model', None)).__name__} network ({type(base).__name__})")


def capture_code(base) -> str | None:
    """The DiT capture code ("flux", "mmdit", "qwen": ``dit_capture``; "lumina": ``joint_capture``) for the
    BaseModel ``base``, None for the UNet capture code: its family adapter's choice; for a network no adapter
    recognises, its class decides (``dit_capture.dit_type``, ``joint_capture.is_joint_stream``)."""
    adapter = REGISTRY.claiming(base)
    if adapter is not None:
        return adapter.dit_type
    from ..glue.dit_capture import dit_type
    from ..glue.joint_capture import is_joint_stream

    return "lumina" if is_joint_stream(base.diffusion_model) else dit_type(base.diffusion_model)


def needs_torch_paths(base) -> bool:
    """Whether gradient passes through the BaseModel ``base`` take ComfyUI's torch paths (its family adapter's
    ``gradient.torch_paths``; True for a network no adapter recognises)."""
    adapter = REGISTRY.claiming(base)
    return True if adapter is None else adapter.gradient.torch_paths
