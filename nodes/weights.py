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
"""

from __future__ import annotations

import contextlib
import logging
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
            for store in (mod._parameters, mod._buffers):
                for name, t in list(store.items()):
                    if t is None or not (t.is_inference() or t.requires_grad):
                        continue
                    new = replacement.get(id(t))
                    if new is None:
                        try:
                            view = _normal_view(t)
                        except Exception as exc:  # leave it: the forward will say what failed
                            logger.debug("could not make %s usable by autograd: %s", name, exc)
                            continue
                        new = (
                            torch.nn.Parameter(view, requires_grad=False) if isinstance(t, torch.nn.Parameter) else view
                        )
                        replacement[id(t)] = new
                    store[name] = new
                    done.append((store, name, t, new))


def _restore(done: list[tuple[dict, str, torch.Tensor, torch.Tensor]]) -> None:
    for store, name, original, new in reversed(done):
        if store.get(name) is new:
            store[name] = original
        else:  # someone (e.g. a hook patch) replaced it meanwhile: theirs to restore
            logger.debug("weight %s was replaced during the run; leaving the newer tensor", name)


@contextlib.contextmanager
def autograd_weights(modules: Iterable[torch.nn.Module]) -> Iterator[int]:
    """Inside: ``torch.inference_mode(False)`` and autograd-usable weights. Yields how many tensors were swapped."""
    modules = [m for m in modules if isinstance(m, torch.nn.Module)]
    done: list[tuple[dict, str, torch.Tensor, torch.Tensor]] = []
    with torch.inference_mode(False):
        try:
            _swap_in(modules, done)
            logger.debug("autograd session: %d inference tensors made usable", len(done))
            yield len(done)
        finally:
            _restore(done)
