"""Why an edit looks the way it does: a per-step chart and a one-paragraph summary of a guided run.

Both read only ``SampleResult.records`` (one ``sampler.StepRecord`` per guidance evaluation), ``num_steps`` and
``step_mode``: what the sampler itself measured, nothing recomputed. For step 0's resampling repeats the chart
and the per-step numbers take the step's last evaluation; a step counts as skipped when any of its
evaluations was.

- ``summarize``: the numbers (steps with guidance applied, skipped, retried; mean update; each term's pull
  relative to the first term's), ``summary``: them in words, with what to do when more than a few steps were
  skipped (``too_many_skipped``).
- ``chart``: a ComfyUI IMAGE ``(1, H, W, 3)`` float in [0, 1], drawn with Pillow: each term's loss (min-max
  normalised per term, its range in the legend), the update size (over its maximum, in the legend), skipped
  steps as red bands, retried steps as orange ticks at the top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .sampler import SampleResult, StepRecord

#: Words for the terms' class names (the summary and the legend).
LABELS = {
    "CrossAttentionGuidance": "cross-attention",
    "PatchNCEGuidance": "PatchNCE",
    "DinoStructureGuidance": "DINO structure",
    "DinoStyleGuidance": "DINO style",
    "SemanticDivergenceGuidance": "semantic divergence",
    "RangeGuidance": "range",
}
#: More skipped steps than this many, or than this fraction of the guided steps, earn a warning.
SKIP_WARN_STEPS = 2
SKIP_WARN_FRACTION = 0.05
#: Series colours (RGB 0..255): terms in order, then the update.
TERM_COLOURS = ((31, 119, 180), (44, 160, 44), (148, 103, 189), (140, 86, 75), (23, 190, 207), (188, 189, 34))
UPDATE_COLOUR = (20, 20, 20)
SKIP_COLOUR = (230, 60, 60)
RETRY_COLOUR = (255, 150, 0)
BACKGROUND = (255, 255, 255)


def label(name: str) -> str:
    """The words for a record's term key ("PatchNCEGuidance #2" -> "PatchNCE #2")."""
    base, _, suffix = name.partition(" #")
    return LABELS.get(base, base) + (f" #{suffix}" if suffix else "")


@dataclass(frozen=True)
class RunSummary:
    """The numbers behind ``summary``. ``active``: steps at which some term was active; ``applied``: those
    none of whose evaluations was skipped; ``skipped`` / ``retried``: step indices (ascending, unique).
    ``mean_update``: mean update RMS over the applied evaluations, as a fraction of the latent's RMS.
    ``pulls``: each further term's pull over the first term's (sums over the evaluations where both were
    measured; empty where not measured)."""

    num_steps: int
    step_mode: str
    terms: tuple[str, ...]
    active: int
    applied: int
    skipped: tuple[int, ...]
    retried: tuple[int, ...]
    mean_update: float
    pulls: dict[str, float] = field(default_factory=dict)


def per_step(result: SampleResult) -> list[StepRecord | None]:
    """For each sampler step, its last guidance evaluation's record (None where no term was active)."""
    out: list[StepRecord | None] = [None] * result.num_steps
    for rec in result.records:
        if 0 <= rec.step < result.num_steps:
            out[rec.step] = rec
    return out


def summarize(result: SampleResult) -> RunSummary:
    """The run's numbers (see ``RunSummary``), from ``result.records``."""
    recs = result.records
    terms: list[str] = []
    for rec in recs:
        terms.extend(n for n in rec.losses if n not in terms)
    active = sorted({r.step for r in recs})
    skipped = sorted({r.step for r in recs if r.skipped})
    retried = sorted({r.step for r in recs if r.retried})
    done = [r.update for r in recs if not r.skipped]
    pulls: dict[str, float] = {}
    if terms:
        first = terms[0]
        for name in terms[1:]:
            both = [r for r in recs if not r.skipped and first in r.pulls and name in r.pulls]
            ref = sum(r.pulls[first] for r in both)
            if both and ref > 0:
                pulls[name] = sum(r.pulls[name] for r in both) / ref
    return RunSummary(
        num_steps=result.num_steps,
        step_mode=result.step_mode,
        terms=tuple(terms),
        active=len(active),
        applied=len(active) - len(skipped),
        skipped=tuple(skipped),
        retried=tuple(retried),
        mean_update=sum(done) / len(done) if done else 0.0,
        pulls=pulls,
    )


def too_many_skipped(s: RunSummary) -> bool:
    """More than ``SKIP_WARN_STEPS`` skipped steps and more than ``SKIP_WARN_FRACTION`` of the guided ones."""
    return len(s.skipped) > max(SKIP_WARN_STEPS, SKIP_WARN_FRACTION * s.active)


def summary(result: SampleResult) -> str:
    """A few sentences a user can act on, e.g. "guidance applied at 48/50 steps (step mode auto); mean update
    2.1% of the latent RMS; PatchNCE pulled 0.4x as hard as cross-attention." plus skipped/retried steps, and a
    plain warning with what to change when ``too_many_skipped``."""
    s = summarize(result)
    if not s.active:
        return f"no guidance: no term was active at any of the {s.num_steps} steps (a plain DDIM edit)."
    parts = [f"guidance applied at {s.applied}/{s.num_steps} steps (step mode {s.step_mode})"]
    if s.active < s.num_steps:
        parts[0] += f"; the terms were active at {s.active} (their start/end)"
    parts.append(f"mean update {100 * s.mean_update:.1f}% of the latent RMS")
    first = label(s.terms[0])
    parts.extend(f"{label(n)} pulled {r:.2g}x as hard as {first}" for n, r in s.pulls.items())
    text = "; ".join(parts) + "."
    if s.retried:
        text += f" Overflowing gradient rescaled and retried at {len(s.retried)} step(s): {_steps(s.retried)}."
    if s.skipped:
        text += f" Skipped (gradient not finite even after rescaling) at step(s) {_steps(s.skipped)}."
    if too_many_skipped(s):
        text += (
            f" WARNING: the guidance was skipped at {len(s.skipped)} of {s.active} steps, so the edit is weaker and"
            " less faithful than asked. The model's gradients overflow at this precision: load the model in bf16 or"
            " fp32 instead of fp16, or lower step_size."
        )
    return text


def _steps(steps: tuple[int, ...], limit: int = 12) -> str:
    shown = ", ".join(str(i) for i in steps[:limit])
    return shown + (f" and {len(steps) - limit} more" if len(steps) > limit else "")


# -- the chart --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where the chart puts things: an image ``width`` x ``height`` px, the plot area inside the margins.
    ``x(i)``: the column of step ``i`` of ``n``; ``y(v)``: the row of a normalised value ``v`` in [0, 1]."""

    width: int = 640
    height: int = 360
    left: int = 12
    right: int = 12
    top: int = 24
    legend: int = 110

    @property
    def bottom(self) -> int:
        return self.height - self.legend

    def x(self, i: int, n: int) -> int:
        return int(round(self.left + (i + 0.5) * (self.width - self.left - self.right) / max(n, 1)))

    def y(self, v: float) -> int:
        return int(round(self.bottom - v * (self.bottom - self.top)))


def series(result: SampleResult) -> dict[str, list[tuple[int, float]]]:
    """The chart's points: for each term, ``(step, loss normalised to [0, 1] over the run: (v - min) / (max -
    min), 0.5 when constant)``, and "update": ``(step, update / max update)``, both from ``per_step``; skipped
    evaluations have no update point, losses that are not finite no point."""
    recs = [(i, r) for i, r in enumerate(per_step(result)) if r is not None]
    out: dict[str, list[tuple[int, float]]] = {}
    for name in summarize(result).terms:
        pts = [(i, r.losses[name]) for i, r in recs if name in r.losses and math.isfinite(r.losses[name])]
        if not pts:
            continue
        lo, hi = min(v for _, v in pts), max(v for _, v in pts)
        out[name] = [(i, (v - lo) / (hi - lo) if hi > lo else 0.5) for i, v in pts]
    ups = [(i, r.update) for i, r in recs if not r.skipped]
    top = max((u for _, u in ups), default=0.0)
    out["update"] = [(i, u / top if top > 0 else 0.0) for i, u in ups]
    return out


def chart_font():
    """Pillow's bitmap font: its spaces are a full character wide (the FreeType default that Pillow >= 10.1 returns
    from ``load_default`` draws a 2-pixel space, so words run together at this size)."""
    from PIL import ImageFont

    bitmap = getattr(ImageFont, "load_default_imagefont", None)
    return bitmap() if bitmap is not None else ImageFont.load_default()


def chart(result: SampleResult, layout: Layout = Layout()) -> Tensor:
    """The per-step chart (module docstring) as a ComfyUI IMAGE ``(1, height, width, 3)`` float32 in [0, 1]."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = chart_font()
    n = max(result.num_steps, 1)
    s = summarize(result)
    half = max(1, (layout.width - layout.left - layout.right) // (2 * n))
    for i in s.skipped:
        draw.rectangle([layout.x(i, n) - half, layout.top, layout.x(i, n) + half, layout.bottom], fill=(250, 205, 205))
    draw.rectangle([layout.left, layout.top, layout.width - layout.right, layout.bottom], outline=(160, 160, 160))
    for i in s.retried:
        draw.line([layout.x(i, n), layout.top - 8, layout.x(i, n), layout.top - 1], fill=RETRY_COLOUR, width=3)
    for i in range(0, n, max(1, n // 10)):
        draw.text((layout.x(i, n) - 3, layout.bottom + 2), str(i), fill=(90, 90, 90), font=font)
    title = f"ZeroCon guidance per step ({s.step_mode}): {s.applied}/{s.num_steps} steps applied"
    draw.text((layout.left, 4), title, fill=(0, 0, 0), font=font)

    pts = series(result)
    names = list(s.terms)
    entries = [("update", UPDATE_COLOUR, _update_legend(result))]
    for k, name in enumerate(names):
        entries.append((name, TERM_COLOURS[k % len(TERM_COLOURS)], _loss_legend(result, name)))
    for name, colour, _ in entries:  # the update first, the terms' dots on top
        xy = [(layout.x(i, n), layout.y(v)) for i, v in pts.get(name, [])]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=1)
        for px, py in xy:
            draw.rectangle([px - 2, py - 2, px + 2, py + 2], fill=colour)
    row = layout.bottom + 16
    for _, colour, text in entries:
        draw.rectangle([layout.left, row + 2, layout.left + 10, row + 10], fill=colour)
        draw.text((layout.left + 16, row), text, fill=(0, 0, 0), font=font)
        row += 13
    if s.skipped:
        draw.rectangle([layout.left, row + 2, layout.left + 10, row + 10], fill=(250, 205, 205))
        draw.text((layout.left + 16, row), f"skipped steps: {_steps(s.skipped)}", fill=SKIP_COLOUR, font=font)
        row += 13
    if s.retried:
        draw.rectangle([layout.left, row + 2, layout.left + 10, row + 10], fill=RETRY_COLOUR)
        draw.text((layout.left + 16, row), f"overflow retried: {_steps(s.retried)}", fill=(0, 0, 0), font=font)
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(layout.height, layout.width, 3)
    return (data.float() / 255.0).unsqueeze(0)


def _loss_legend(result: SampleResult, name: str) -> str:
    values = [r.losses[name] for r in per_step(result) if r is not None and math.isfinite(r.losses.get(name, math.nan))]
    if not values:
        return f"{label(name)} loss: not finite"
    return f"{label(name)} loss, {min(values):.4g} .. {max(values):.4g} (scaled per term)"


def _update_legend(result: SampleResult) -> str:
    ups = [r.update for r in per_step(result) if r is not None and not r.skipped]
    return f"update size, up to {100 * max(ups, default=0.0):.2f}% of the latent RMS"
