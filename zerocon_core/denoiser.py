"""The contract between the engine and a host (diffusers, ComfyUI): the ``Denoiser`` protocol.

A denoiser predicts ``eps = (x - x0) / sigma`` in sigma space (the noise for VP models, the velocity for
flow-matching ones: ``prediction_type``) for a batch of latents under one or more conditionings, and
can record, on request, what the guidance losses need from inside the UNet:

- ``probs``: cross-attention probabilities ``softmax(q k^T / sqrt(d))`` of chosen ``attn2`` layers,
  shape ``(B, heads, HW, tokens)``, float32;
- ``features``: outputs of chosen self-attention (``attn1``) layers after their output projection,
  shape ``(B, C, H, W)``.

Gradients flow from both (and from ``eps``) to ``x`` when the caller enables grad inside
``denoiser.autograd_session()``. Conditionings are opaque, host-specific objects.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ContextManager, NamedTuple, Protocol, Sequence, runtime_checkable

from torch import Tensor

KINDS = ("cross", "self")
BLOCKS = ("down", "mid", "up")


@dataclass(frozen=True)
class LayerInfo:
    """One attention layer of the UNet.

    ``name`` is the host's unique id; ``kind`` is "cross" (attn2, text) or "self" (attn1); ``block`` is
    "down", "mid" or "up"; ``level`` is the downsampling level (0 = the latent's own resolution, 1 = half...).
    """

    name: str
    kind: str
    block: str
    level: int


@dataclass(frozen=True)
class CaptureRequest:
    """Which layers to record: cross-attention probabilities and self-attention output features."""

    probs: frozenset[str] = field(default_factory=frozenset)
    features: frozenset[str] = field(default_factory=frozenset)

    def __bool__(self) -> bool:
        return bool(self.probs or self.features)

    def __or__(self, other: CaptureRequest) -> CaptureRequest:
        return CaptureRequest(self.probs | other.probs, self.features | other.features)


class Prediction(NamedTuple):
    """What one conditioning gave: ``eps`` shaped like ``x``, plus the requested captures by layer name."""

    eps: Tensor
    probs: dict[str, Tensor]
    features: dict[str, Tensor]


@runtime_checkable
class Denoiser(Protocol):
    """A noise predictor in sigma space (see the module docstring)."""

    #: The model's training sigmas, ascending, indexed by timestep (float64, CPU).
    sigma_table: Tensor
    #: "eps" or "v" (VP models: predictions are always converted to eps, the noise; default guidance step sizes
    #: differ) or "flow" (flow matching, SD3 / Flux: ``x = (1 - t) x0 + t n`` with ``t = sigma``, and eps is the
    #: velocity ``n - x0``). The engine's VP-vs-flow formulas (``parameterization``) read it.
    prediction_type: str

    def layers(self) -> list[LayerInfo]:
        """All attention layers that can be captured, in forward order."""
        ...

    def predict(
        self, x: Tensor, sigma: Tensor, conds: Sequence[Any], capture: CaptureRequest | None = None
    ) -> list[Prediction]:
        """Predict eps for latent ``x`` (B, C, H, W) at noise level ``sigma`` (0-d) under each of ``conds``.

        Returns one ``Prediction`` per conditioning, in order. The host may batch the conditionings
        into one forward.
        """
        ...

    def autograd_session(self) -> ContextManager[None]:
        """A context inside which gradients may flow through the model to the latent.

        Hosts whose weights cannot take part in autograd as they are (ComfyUI's inference tensors) swap
        in usable ones here and restore everything on exit. Weights never require grad.
        """
        ...


def no_session() -> ContextManager[None]:
    """An ``autograd_session`` for hosts that need nothing special."""
    return contextlib.nullcontext()


def select_layers(
    layers: Sequence[LayerInfo],
    kind: str,
    blocks: Sequence[str] = BLOCKS,
    levels: Sequence[int] | None = None,
) -> list[str]:
    """Names of the layers of ``kind`` in ``blocks`` (and, if given, at ``levels``), in forward order.

    Raises ``ValueError`` for an unknown kind/block or when nothing matches.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown layer kind {kind!r}; expected one of {KINDS}")
    bad = [b for b in blocks if b not in BLOCKS]
    if bad:
        raise ValueError(f"unknown UNet block(s) {bad}; expected a subset of {BLOCKS}")
    names = [
        info.name
        for info in layers
        if info.kind == kind and info.block in blocks and (levels is None or info.level in levels)
    ]
    if not names:
        raise ValueError(
            f"no {kind}-attention layers in blocks {list(blocks)}"
            + (f" at levels {list(levels)}" if levels is not None else "")
            + f"; this UNet has {sorted({(i.kind, i.block, i.level) for i in layers})}"
        )
    return names


def parse_layer_spec(spec: str) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
    """Parse a user layer spec: "all", or comma-separated blocks ("down,up"), optionally ":levels".

    Examples: ``"all"``, ``"up"``, ``"down,mid"``, ``"up:0,1"`` (up blocks at levels 0 and 1).
    """
    spec = spec.strip().lower()
    blocks_part, _, levels_part = spec.partition(":")
    blocks = BLOCKS if blocks_part in ("", "all") else tuple(b.strip() for b in blocks_part.split(",") if b.strip())
    levels = None
    if levels_part.strip():
        try:
            levels = tuple(int(v) for v in levels_part.split(",") if v.strip())
        except ValueError as exc:
            raise ValueError(f"bad levels in layer spec {spec!r}: expected integers like 'up:0,1'") from exc
    bad = [b for b in blocks if b not in BLOCKS]
    if bad:
        raise ValueError(f"bad layer spec {spec!r}: unknown block(s) {bad}; use 'all' or a subset of {BLOCKS}")
    return blocks, levels
