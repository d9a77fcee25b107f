"""Let gradients flow through ComfyUI's inference-tensor weights without copying or changing them.

ComfyUI runs every prompt under ``torch.inference_mode()``, so the weights its loaders create are
*inference tensors*: autograd refuses to save them for backward ("Inference tensors cannot be saved for
backward"), which breaks any gradient w.r.t. the latent.

``autograd_weights(modules)`` fixes that for the duration of a ``with`` block: inside
``torch.inference_mode(False)`` it replaces every inference-tensor parameter and buffer of the given
modules by a *normal* tensor that aliases the same storage (zero-copy: no second copy of the UNet; a real
clone is the fallback for tensor subclasses and anything that cannot be aliased). Parameters that are
normal tensors but flagged ``requires_grad`` (``nn.Parameter``'s default, which ComfyUI's loaders leave
set) are replaced by a detached alias too, so no weight requires grad during the run: autograd then
tracks the latent only and does not keep activations for weight gradients. On exit, in ``finally`` (so also on errors and interrupts), the original tensor objects are
put back, so the model is exactly as it was: same objects, same values, same flags; a later stock KSampler
gives bit-identical results. Nothing is written to the weights' storage at any point.

Weights that ComfyUI casts per layer (``comfy.ops`` modules with ``comfy_cast_weights``: the part of a partially
loaded model that did not fit, every layer under manual cast, LoRAs applied per layer by weight functions) are
fresh copies made during the forward; autograd would keep each of them for the backward, i.e. a copy of those
weights in the compute dtype on the device for the whole gradient pass. Inside the block such a copy is not
kept: the backward casts it again from the module (``comfy.ops.cast_bias_weight``, weight functions
included), as the forward did, and the cast is released again (nothing stays pinned under Dynamic VRAM). Resident
weights are kept by reference, as before. Replacements keep the originals' Python attributes (Dynamic VRAM's
per-Parameter ``_model_dtype``); quantized weights (tensor subclasses) of per-layer cast modules are not replaced at
all: they are dequantized into fresh tensors at each use, so they are never copied.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import weakref
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

logger = logging.getLogger("zerocon")

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _normal_view(t: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) tensor with ``t``'s values that does not require grad; shares storage when
    possible. Call outside inference mode."""
    if not t.is_inference():
        return t.detach()
    if type(t) in _PLAIN and t.layout == torch.strided and t.device.type != "meta":
        try:
            alias = torch.empty(0, dtype=t.dtype, device=t.device)
            alias.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
            if not alias.is_inference():
                return alias
        except (RuntimeError, TypeError):  # exotic storage: fall back to a copy
            pass
    return t.detach().clone()


def _swap_in(modules: Iterable[torch.nn.Module], done: list[tuple[dict, str, torch.Tensor, torch.Tensor]]) -> None:
    """Replace inference tensors and tensors that require grad in the modules' ``_parameters``/``_buffers``,
    appending to the undo list."""
    replacement: dict[int, torch.Tensor] = {}  # id(original) -> replacement: tied weights stay tied
    seen: set[int] = set()
    for root in modules:
        for mod in root.modules():
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            cast = _casts_per_layer(mod)
            for store in (mod._parameters, mod._buffers):
                for name, t in list(store.items()):
                    if t is None or not (t.is_inference() or t.requires_grad):
                        continue
                    if cast and type(t) not in _PLAIN and not t.requires_grad:
                        continue  # a quantized weight: dequantized per layer into a fresh tensor, never copied here
                    new = replacement.get(id(t))
                    if new is None:
                        try:
                            new = _replacement(t)
                        except Exception as exc:  # leave it: the forward will say what failed
                            logger.debug("could not make %s usable by autograd: %s", name, exc)
                            continue
                        replacement[id(t)] = new
                    store[name] = new
                    done.append((store, name, t, new))


def _replacement(t: torch.Tensor) -> torch.Tensor:
    """``t`` usable by autograd (``_normal_view``), a Parameter again if ``t`` was one, with ``t``'s Python attributes
    (ComfyUI's markers such as Dynamic VRAM's ``_model_dtype``, read at every per-layer cast)."""
    view = _normal_view(t)
    new = torch.nn.Parameter(view, requires_grad=False) if isinstance(t, torch.nn.Parameter) else view
    extra = getattr(t, "__dict__", None)
    if extra:
        new.__dict__.update(extra)
    return new


def _casts_per_layer(mod: torch.nn.Module) -> bool:
    """A comfy.ops module whose weight is cast (or patched) per layer in each forward."""
    return bool(getattr(mod, "comfy_cast_weights", False) or getattr(mod, "weight_function", None))


def _restore(done: list[tuple[dict, str, torch.Tensor, torch.Tensor]]) -> None:
    for store, name, original, new in reversed(done):
        if store.get(name) is new:
            store[name] = original
        else:  # someone (e.g. a hook patch) replaced it meanwhile: theirs to restore
            logger.debug("weight %s was replaced during the run; leaving the newer tensor", name)


@dataclass(frozen=True)
class _Recast:
    """What the backward needs to rebuild a saved view of a per-layer cast weight."""

    module: torch.nn.Module
    dtype: torch.dtype
    device: torch.device
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


class _CastWeights:
    """Saved-tensor hooks that keep per-layer cast weights out of the autograd graph (see the module docstring).

    ``mark(module)`` is appended to the module's weight functions: it sees the final cast weight of every
    forward and remembers which module made it. ``pack`` replaces a saved tensor that is (a view of) such a
    weight, still alive, by a ``_Recast``; ``unpack`` casts the weight again and takes the same view."""

    def __init__(self) -> None:
        self._made: dict[int, tuple[weakref.ref, torch.nn.Module]] = {}  # storage address -> (weight, module)

    def marker(self, module: torch.nn.Module):
        def mark(weight: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled() and weight.is_contiguous():
                if len(self._made) > 4096:  # forget the weights already freed
                    self._made = {k: v for k, v in self._made.items() if v[0]() is not None}
                self._made[weight.untyped_storage().data_ptr()] = (weakref.ref(weight), module)
            return weight

        return mark

    def pack(self, t: torch.Tensor):
        if t.requires_grad or not self._made:
            return t
        entry = self._made.get(t.untyped_storage().data_ptr())
        weight = entry[0]() if entry is not None else None
        if (
            weight is None
            or weight.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
            or weight.dtype != t.dtype
            or weight.device != t.device
        ):
            return t
        return _Recast(entry[1], t.dtype, t.device, tuple(t.size()), tuple(t.stride()), t.storage_offset())

    @staticmethod
    def unpack(packed):
        if not isinstance(packed, _Recast):
            return packed
        return _recast(packed)


def _recast(packed: _Recast) -> torch.Tensor:
    """The module's weight cast again, viewed as it was saved. Where ComfyUI can release a cast (``offloadable``
    casts into reused buffers and Dynamic VRAM's pinned slots), the view is copied out and the cast released at
    once, so nothing stays pinned."""
    import comfy.ops

    module = packed.module
    if hasattr(comfy.ops, "uncast_bias_weight"):
        weight, bias, state = comfy.ops.cast_bias_weight(
            module, dtype=packed.dtype, device=packed.device, offloadable=True
        )
        try:
            return weight.as_strided(packed.size, packed.stride, packed.offset).clone()
        finally:
            comfy.ops.uncast_bias_weight(module, weight, bias, state)
    weight, _ = comfy.ops.cast_bias_weight(module, dtype=packed.dtype, device=packed.device)
    return weight.as_strided(packed.size, packed.stride, packed.offset)


def _cast_modules(modules: Iterable[torch.nn.Module]) -> list[torch.nn.Module]:
    """The comfy.ops modules whose weight is cast (or patched) per layer in each forward."""
    out, seen = [], set()
    for root in modules:
        for mod in root.modules():
            if id(mod) in seen or not isinstance(mod._parameters.get("weight"), torch.Tensor):
                continue
            seen.add(id(mod))
            if _casts_per_layer(mod):
                out.append(mod)
    return out


#: The saved-tensor hooks ``(pack, unpack)`` an autograd session installed, for hooks opened inside it to chain to:
#: PyTorch runs only the innermost pair, so a nested pair must hand what it does not handle to these.
ACTIVE_SAVED_TENSOR_HOOKS: contextvars.ContextVar[tuple | None] = contextvars.ContextVar(
    "zerocon_saved_tensor_hooks", default=None
)


@contextlib.contextmanager
def _recast_in_backward(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Mark the cast modules' weights and install the saved-tensor hooks; the weight function lists are put
    back (the very objects, or the class default) on exit."""
    cast = _CastWeights()
    undo: list[tuple[torch.nn.Module, object]] = []
    try:
        for mod in modules:
            undo.append((mod, mod.__dict__.get("weight_function", _NO_ATTRIBUTE)))
            mod.weight_function = list(mod.weight_function) + [cast.marker(mod)]  # a new list: never the class's
        token = ACTIVE_SAVED_TENSOR_HOOKS.set((cast.pack, cast.unpack))
        try:
            with torch.autograd.graph.saved_tensors_hooks(cast.pack, cast.unpack):
                yield
        finally:
            ACTIVE_SAVED_TENSOR_HOOKS.reset(token)
    finally:
        for mod, previous in reversed(undo):
            if previous is _NO_ATTRIBUTE:
                mod.__dict__.pop("weight_function", None)
            else:
                mod.weight_function = previous


_NO_ATTRIBUTE = object()


@contextlib.contextmanager
def autograd_weights(modules: Iterable[torch.nn.Module]) -> Iterator[int]:
    """Inside: ``torch.inference_mode(False)``, autograd-usable weights, and per-layer cast weights recast in the
    backward instead of kept. Yields how many tensors were swapped."""
    modules = [m for m in modules if isinstance(m, torch.nn.Module)]
    done: list[tuple[dict, str, torch.Tensor, torch.Tensor]] = []
    with torch.inference_mode(False):
        try:
            _swap_in(modules, done)
            logger.debug("autograd session: %d inference tensors made usable", len(done))
            cast = _cast_modules(modules)
            with _recast_in_backward(cast) if cast else contextlib.nullcontext():
                yield len(done)
        finally:
            _restore(done)
