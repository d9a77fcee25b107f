"""Text-encoder layouts: which model family a CLIP, a conditioning or an edit direction belongs to.

One rule (:func:`identify_layout`) names the layout from what can be seen: the tokenizer's encoder keys (a
ComfyUI CLIP object: ``l``; ``h``; ``l`` + ``g``; ``g`` + ``l`` + ``t5xxl``; ``l`` + ``t5xxl``), or the
conditioning's width, pooled width and CLIP token count (a CONDITIONING, or an edit direction file written
before layouts were saved). Layouts, as ComfyUI builds their conditionings:

========  ========================================================================  ===============
layout    sequence (tokens x width)                                                 pooled
========  ========================================================================  ===============
SD1.x     CLIP-L, 77-token chunks x 768                                             (768, unused)
SD2.x     OpenCLIP-H, 77-token chunks x 1024                                        (1024, unused)
SDXL      CLIP-L (768) and CLIP-G (1280) side by side: 77-token chunks x 2048        CLIP-G, 1280
SD3       CLIP part (77-token chunks; CLIP-L in channels 0..767, CLIP-G in          CLIP-L + CLIP-G,
          768..2047, zeros up to 4096), then the T5-XXL tokens (x 4096)             2048
Flux      T5-XXL tokens x 4096 (padded to at least 256)                             CLIP-L, 768
Qwen-     Qwen2.5-VL 7B hidden states x 3584 (the chat template's tokens dropped),  none
Image     with an ``attention_mask`` when padded; not told from a conditioning
Z-Image   Qwen3-4B hidden states x 2560; not told from a conditioning             none
Flux.2    LLM hidden states of three layers side by side (Mistral 3 for dev: 15360;  none
          Qwen3 for Klein: 7680 / 12288), 512 tokens; not told from a conditioning
========  ========================================================================  ===============

Any of SD3's three encoders may be absent (CLIPLoader "sd3" with one or two files): its channels (CLIP) or
tokens (T5) are then missing or zero, and its pooled half is zero (ComfyUI's ``SD3ClipModel``). The CLIP part
of an SD3 conditioning is found by its zero padding: its tokens are exactly zero from channel 2048 on, T5's
never are.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = [
    "CHUNK",
    "LAYOUTS",
    "SD3_CLIP_WIDTH",
    "SD3_L_WIDTH",
    "T5_KEY",
    "T5_WIDTH",
    "ConditioningLayout",
    "conditioning_layout",
    "describe_encoders",
    "identify_layout",
    "sd3_offsets",
]

CHUNK = 77
"""Tokens per CLIP chunk."""
T5_KEY = "t5xxl"
"""ComfyUI's token key (and our encoder name) for T5-XXL."""
T5_WIDTH = 4096
"""T5-XXL's width: SD3's joint sequence and Flux's context are this wide."""
SD3_CLIP_WIDTH = 2048
"""Channels of SD3's CLIP part that carry CLIP-L + CLIP-G; the rest (up to 4096) is zero padding."""
SD3_L_WIDTH = 768
"""Where ComfyUI puts CLIP-G in SD3's CLIP part when CLIP-L is absent (it pads CLIP-G by 768 on the left)."""
LAYOUTS = ("SD1.x", "SD2.x", "SDXL", "SD3", "Flux", "Flux.2", "Qwen-Image", "Z-Image")

_BY_KEYS = {
    frozenset({"l"}): "SD1.x",
    frozenset({"h"}): "SD2.x",
    frozenset({"l", "g"}): "SDXL",
    frozenset({"l", "g", T5_KEY}): "SD3",
    frozenset({"l", T5_KEY}): "Flux",
}
_BY_WIDTH = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
_NAMES = {"l": "CLIP-L", "h": "OpenCLIP-H", "g": "CLIP-G", T5_KEY: "T5-XXL"}


def delta_layout(keys, width: int | None = None, pooled_width: int | None = None) -> str:
    """The layout of a direction from the encoders its deltas cover: a T5 delta alone is Flux's (its CLIP-L gives
    only the pooled delta), a T5 delta with CLIP deltas is SD3's (any of its encoders may be absent); without T5,
    ``identify_layout`` on the key set (which then names the same encoders as a CLIP object's tokens) and widths."""
    keys = set(keys or ())
    if T5_KEY in keys:
        return "Flux" if keys == {T5_KEY} else "SD3"
    return identify_layout(width, pooled_width, keys=tuple(sorted(keys)))


def identify_layout(
    width: int | None = None, pooled_width: int | None = None, keys=None, clip_tokens: int | None = None
) -> str:
    """The layout name (one of :data:`LAYOUTS`), or ``""`` when it cannot be told.

    ``keys``: a CLIP object's token keys (decisive when they match a layout). Otherwise from the width:
    768 SD1.x, 1024 SD2.x, 2048 SDXL; 4096 (T5-XXL) is SD3 when the conditioning has a CLIP part
    (``clip_tokens > 0``) or a 2048-wide pooled output (SD3 pads missing pooled halves with zeros), Flux
    when it has another pooled output (CLIP-L's), and ``""`` (SD3 or Flux) when it has none. ``width`` None
    (keys only): ``""`` unless the keys decide.
    """
    if keys is not None:
        found = _BY_KEYS.get(frozenset(keys))
        if found:
            return found
    if width is None:
        return ""
    width = int(width)
    if width in _BY_WIDTH:
        return _BY_WIDTH[width]
    if width == T5_WIDTH:
        if (clip_tokens or 0) > 0 or pooled_width == SD3_CLIP_WIDTH:
            return "SD3"
        if pooled_width is not None:
            return "Flux"
    return ""


def describe_encoders(encoders) -> str:
    """``"CLIP-L + CLIP-G + T5-XXL"`` for encoder names ``("l", "g", "t5xxl")`` (``"no text encoder"`` if none)."""
    names = [_NAMES.get(k, k) for k in encoders]
    return " + ".join(names) if names else "no text encoder"


def sd3_offsets(widths: dict[str, int]) -> dict[str, int]:
    """First channel of CLIP-L and CLIP-G in SD3's CLIP part, given the widths of the encoders present
    (``{"l": 768, "g": 1280}`` or a subset): CLIP-L at 0, CLIP-G after CLIP-L, or at 768 without CLIP-L
    (ComfyUI's ``SD3ClipModel``)."""
    out = {}
    if "l" in widths:
        out["l"] = 0
    if "g" in widths:
        out["g"] = int(widths["l"]) if "l" in widths else SD3_L_WIDTH
    return out


@dataclass(frozen=True)
class ConditioningLayout:
    """What a conditioning tensor holds: ``layout`` (or ``""``), ``width``, ``tokens``; for T5-wide ones
    ``clip_tokens`` (SD3's leading CLIP part, a multiple of 77) and ``t5_tokens`` (the rest); ``pooled_width``
    (None without pooled output); ``encoders``: the encoders seen in it (SD3 only, else None)."""

    layout: str
    width: int
    tokens: int
    clip_tokens: int
    t5_tokens: int
    pooled_width: int | None
    encoders: tuple[str, ...] | None = None

    def describe(self) -> str:
        """``"SDXL"``, ``"SD3: CLIP-L + T5-XXL"``, ``"SD3 or Flux"`` or ``"unknown family"``."""
        if self.layout == "SD3" and self.encoders is not None:
            return f"SD3: {describe_encoders(self.encoders)}"
        if self.layout:
            return self.layout
        return "SD3 or Flux" if self.width == T5_WIDTH else "unknown family"


def _sd3_clip_tokens(cond: Tensor) -> int:
    """Leading tokens of ``cond (B, T, 4096)`` that are zero from channel 2048 on, rounded down to whole chunks."""
    padded = (cond[..., SD3_CLIP_WIDTH:] == 0).all(dim=-1).all(dim=0)  # (T,)
    not_padded = (~padded).nonzero()
    count = int(not_padded[0, 0]) if len(not_padded) else int(padded.shape[0])
    return count - count % CHUNK


def conditioning_layout(cond: Tensor, pooled: Tensor | None = None, l_width: int = SD3_L_WIDTH) -> ConditioningLayout:
    """The layout of a conditioning ``(B, T, D)`` (or ``(T, D)``) with optional ``pooled (B, P)``.

    For a T5-wide conditioning the SD3 CLIP part is found by its zero padding; which of SD3's encoders are
    present is read from its channels (CLIP-L in ``[0, l_width)``, CLIP-G in ``[l_width, 2048)``; ``l_width``
    is CLIP-L's width, 768 for real models) and from whether T5 tokens follow.
    """
    c = cond if cond.ndim == 3 else cond.unsqueeze(0)
    width, tokens = int(c.shape[-1]), int(c.shape[-2])
    pooled_width = None if pooled is None else int(pooled.shape[-1])
    clip_tokens, t5_tokens = 0, 0
    if width == T5_WIDTH:
        clip_tokens = _sd3_clip_tokens(c)
        t5_tokens = tokens - clip_tokens
    layout = identify_layout(width, pooled_width, clip_tokens=clip_tokens)
    encoders = None
    if layout == "SD3":
        part = c[:, :clip_tokens]
        present = []
        if clip_tokens and bool((part[..., :l_width] != 0).any()):
            present.append("l")
        if clip_tokens and bool((part[..., l_width:SD3_CLIP_WIDTH] != 0).any()):
            present.append("g")
        if t5_tokens:
            present.append(T5_KEY)
        encoders = tuple(present)
    return ConditioningLayout(layout, width, tokens, clip_tokens, t5_tokens, pooled_width, encoders)
