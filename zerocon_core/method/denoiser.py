"""The contract between the engine and a host (diffusers, ComfyUI): the ``Denoiser`` protocol.

A denoiser predicts ``eps = (x - x0) / sigma`` in sigma space (the noise for VP models, the velocity for
flow-matching ones: ``prediction_type``) for a batch of latents under one or more conditionings, and
can record, on request, what the guidance losses need from inside the UNet:

- ``probs``: cross-attention probabilities ``softmax(q k^T / sqrt(d))`` of chosen ``attn2`` layers,
  shape ``(B, heads, HW, tokens)``, float32;
- ``features``: outputs of chosen self-attention (``attn1``) layers after their output projection,
  shape ``(B, C, H, W)``.

On an MM-DiT (Flux, SD3) a "cross" layer is the text-to-image part of a block's joint attention (image-token
queries against text-token keys, softmax over all keys) and a "self" layer is the block's image-token output,
both on the latent's patch grid (H/2 x W/2).

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
#: MM-DiT block kinds: Flux double-stream / single-stream blocks, SD3 joint blocks.
DIT_BLOCKS = ("double", "single", "joint")
#: A layer spec word meaning "the model family's default layers" (``default_layers``).
AUTO = "auto"
#: How many blocks the DiT defaults pick: text-image maps (from double / joint blocks) and PatchNCE features.
DIT_DEFAULT_CROSS_BLOCKS = 5
DIT_DEFAULT_FEATURE_BLOCKS = 4


@dataclass(frozen=True)
class LayerInfo:
    """One attention layer of the UNet, or one capture point of an MM-DiT block.

    ``name`` is the host's unique id; ``kind`` is "cross" (attn2, text) or "self" (attn1); ``block`` is
    "down", "mid" or "up"; ``level`` is the downsampling level (0 = the latent's own resolution, 1 = half...).
    On an MM-DiT ``block`` is "double" / "single" (Flux) or "joint" (SD3), ``level`` the block's index in its
    stack, ``kind`` "cross" for the block's text-to-image attention probabilities and "self" for its
    image-token output.
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


def _spread(items: Sequence[LayerInfo], count: int) -> list[LayerInfo]:
    """``count`` items evenly spread over the second half of ``items`` (its last item always included)."""
    n = len(items)
    if n == 0:
        return []
    lo = n // 2
    picks = sorted({round(lo + (n - 1 - lo) * j / max(count - 1, 1)) for j in range(count)})
    return [items[p] for p in picks]


def is_dit(layers: Sequence[LayerInfo]) -> bool:
    """Whether ``layers`` come from an MM-DiT (Flux, SD3) rather than a UNet."""
    return any(info.block in DIT_BLOCKS for info in layers)


def default_layers(layers: Sequence[LayerInfo], kind: str) -> list[str]:
    """The family's default layers of ``kind`` (what the spec "auto" selects), in forward order.

    UNet: every cross-attention layer (pix2pix-zero's choice) and the up blocks' self-attention (ours, for
    PatchNCE). MM-DiT (our choice, docs/families.md "Guidance on Flux and SD3.5 (MM-DiT)"): text-image maps from
    ``DIT_DEFAULT_CROSS_BLOCKS`` double-stream / joint blocks spread over the second half of that stack;
    PatchNCE features from ``DIT_DEFAULT_FEATURE_BLOCKS`` blocks spread over the second half of the whole
    model's depth (for Flux: single-stream blocks). Raises ``ValueError`` when there are none.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown layer kind {kind!r}; expected one of {KINDS}")
    if not is_dit(layers):
        return select_layers(layers, kind, BLOCKS if kind == "cross" else ("up",))
    of_kind = [info for info in layers if info.kind == kind]
    if kind == "cross":
        joint = [info for info in of_kind if info.block in ("double", "joint")]
        picked = _spread(joint or of_kind, DIT_DEFAULT_CROSS_BLOCKS)
    else:
        picked = _spread(of_kind, DIT_DEFAULT_FEATURE_BLOCKS)
    if not picked:
        raise ValueError(f"this model has no {kind} layers to guide")
    return [info.name for info in picked]


def select_layers(
    layers: Sequence[LayerInfo],
    kind: str,
    blocks: Sequence[str] = BLOCKS,
    levels: Sequence[int] | None = None,
) -> list[str]:
    """Names of the layers of ``kind`` in ``blocks`` (and, if given, at ``levels``), in forward order.

    ``blocks`` = ("auto",) selects ``default_layers``. On an MM-DiT, UNet block names ("down", "mid", "up";
    "all" parses to all three) also select the family's defaults, so the term nodes' UNet defaults and saved
    SD workflows mean something sensible there; DiT block names ("double", "single", "joint") select blocks,
    ``levels`` then being block indices. Raises ``ValueError`` for an unknown kind/block, DiT blocks on a
    UNet, or when nothing matches.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown layer kind {kind!r}; expected one of {KINDS}")
    bad = [b for b in blocks if b not in BLOCKS + DIT_BLOCKS + (AUTO,)]
    if bad:
        raise ValueError(f"unknown block(s) {bad}; expected a subset of {BLOCKS + DIT_BLOCKS} or {AUTO!r}")
    dit = is_dit(layers)
    if AUTO in blocks or (dit and all(b in BLOCKS for b in blocks)):
        return default_layers(layers, kind)
    if not dit and any(b in DIT_BLOCKS for b in blocks):
        raise ValueError(
            f"DiT block(s) {[b for b in blocks if b in DIT_BLOCKS]} asked for on a UNet; use {BLOCKS} or 'auto'"
        )
    names = [
        info.name
        for info in layers
        if info.kind == kind and info.block in blocks and (levels is None or info.level in levels)
    ]
    if not names:
        what = "block indices" if dit else "levels"
        raise ValueError(
            f"no {kind}-attention layers in blocks {list(blocks)}"
            + (f" at {what} {list(levels)}" if levels is not None else "")
            + f"; this model has {_describe(layers)}"
        )
    return names


def _describe(layers: Sequence[LayerInfo]) -> str:
    if not is_dit(layers):
        return str(sorted({(i.kind, i.block, i.level) for i in layers}))
    counts: dict[str, int] = {}
    for info in layers:
        counts[info.block] = max(counts.get(info.block, 0), info.level + 1)
    return ", ".join(f"{n} {b} blocks (indices 0-{n - 1})" for b, n in counts.items())


def parse_layer_spec(spec: str) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
    """Parse a user layer spec: "all", "auto", or comma-separated blocks ("down,up"), optionally ":levels".

    Examples: ``"all"``, ``"up"``, ``"down,mid"``, ``"up:0,1"`` (up blocks at levels 0 and 1); for an MM-DiT
    ``"double"``, ``"single:30,37"``, ``"joint:12,18"`` (indices are block numbers) and ``"auto"`` (the
    family's defaults: ``default_layers``).
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
    bad = [b for b in blocks if b not in BLOCKS + DIT_BLOCKS + (AUTO,)]
    if bad:
        raise ValueError(
            f"bad layer spec {spec!r}: unknown block(s) {bad}; use 'all', 'auto', a subset of {BLOCKS} (UNet) "
            f"or of {DIT_BLOCKS} (MM-DiT)"
        )
    if AUTO in blocks and (len(blocks) > 1 or levels is not None):
        raise ValueError(f"bad layer spec {spec!r}: 'auto' stands alone")
    return blocks, levels
