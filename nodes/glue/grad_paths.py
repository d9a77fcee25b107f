"""Gradient passes through ComfyUI's model code: its differentiable paths, and a check that none was missed.

Newer ComfyUI (0.33 does) runs RoPE, fused norm + RoPE and INT8 linears through comfy-kitchen custom ops that have no
autograd formula: their outputs require grad, but the backward raises. The model code takes plain torch paths
while ``comfy.model_management.in_training`` is set. ``torch_paths()`` sets it for one grad-enabled forward and
puts the old value back on exit, on errors and interrupts too. On a ComfyUI without the switch it does nothing.

``opaque_op`` tells what actually happened instead of trusting a list of names: it walks a tensor's autograd graph
and names the first node of a custom op with no backward.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

_GENERATED = "GeneratedBackwardFor_"


@contextlib.contextmanager
def torch_paths() -> Iterator[None]:
    """Inside: ComfyUI's model code takes its differentiable (torch) paths. Scoped, restored on any exit."""
    import comfy.model_management as mm

    if not hasattr(mm, "in_training"):
        yield
        return
    previous = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = previous


def _formula_less(node) -> str | None:
    """The op's name if ``node`` is the backward of a ``torch.library.custom_op`` with no autograd formula."""
    cls = getattr(node, "_forward_cls", None)
    if cls is None or not cls.__name__.startswith(_GENERATED):
        return None
    backward = getattr(cls, "backward", None)
    code, cells = getattr(backward, "__code__", None), getattr(backward, "__closure__", None)
    if code is None or not cells:
        return None
    free = dict(zip(code.co_freevars, cells))
    info = free["info"].cell_contents if "info" in free else None
    if info is None or getattr(info, "_backward_fn", None) is not None:
        return None
    op = free["op"].cell_contents if "op" in free else cls.__name__[len(_GENERATED) :]
    return str(op)


def opaque_op(outputs: Iterable[torch.Tensor], stop: Iterable[torch.Tensor] = ()) -> str | None:
    """The first op without a backward between ``outputs`` and ``stop`` (or the leaves), else None."""
    alive = [t.grad_fn for t in stop if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    seen = {id(node) for node in alive}  # the nodes stay referenced in ``alive``: their ids are never reused
    todo = [t.grad_fn for t in outputs if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        alive.append(node)
        name = _formula_less(node)
        if name is not None:
            return name
        todo.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return None


def differentiable(out: torch.Tensor, inputs: Iterable[torch.Tensor]) -> bool:
    """Whether gradients can flow from ``out`` back to ``inputs`` (True when none of them requires grad)."""
    inputs = [t for t in inputs if isinstance(t, torch.Tensor)]
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in inputs):
        return True
    return out.requires_grad and opaque_op([out], inputs) is None
