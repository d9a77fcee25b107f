"""Guidance weights: the one rule the nodes, the pipeline and the CLI use to turn a term's ``weight`` into
what the sampler uses, for the sampler's step mode (``SamplerSettings.step_mode``).

A guidance term whose ``weight`` is negative (``AUTO``, -1: what the guidance nodes default to, and what the
pipeline uses when no weight is given) is "auto". Weight 0 disables a term in every mode.

**Step mode "auto"** (the default): the sampler normalises each active term's gradient by its own RMS, mixes
the terms by their weights, which are **unitless ratios** (how hard a term pulls relative to the others), and
scales the mix to ``step_size`` x the latent's RMS per step (``sampler._guidance_step``). A positive weight is
the term's ratio as given; auto is the term class's ``AUTO_RATIOS`` entry:

- cross-attention 1 (the reference the others are measured against);
- PatchNCE 1: as hard as cross-attention, the target of our calibration (``bench/calibrate_patchnce.py``:
  the raw defaults 0.1 / 0.5 realise about 0.87 of that on a random SD1.5 UNet);
- DINO structure 1 and DINO style 1 (DiffuseIT's two main losses, equal pull);
- semantic divergence 0.5 and range 0.5: DiffuseIT weighs them lower than the structure loss (100 and 200
  vs 1000 + 200). Our choice, not calibrated (no real DINO weights here): change them with the nodes' weights.

A term class not in the table gets ratio 1. Because every gradient is normalised, the ratios do not depend
on the model's gradient scale (a v-prediction model, a 10x steeper loss): no per-family factor is needed.

**Step modes "raw" and "normalized"** (advanced): the weight is a step size, ``z <- z - sum_k w_k grad L_k``.
Auto resolves, once the model's prediction type is known, to

    auto weight = the term class's default weight x PREDICTION_SCALE[prediction type]

The class default is the step for eps-prediction models (SD1.x, SD2-base, SDXL): cross-attention 0.1
(pix2pix-zero's step for real images), PatchNCE 0.5 (our calibration, matched to the cross-attention
term's pull). v-prediction models (SD2-768-v) get a tenth of it for **every** term: their guidance
gradients are about ten times larger, pix2pix-zero's authors advise a cross-attention step of 0.01 or less
for them (the default steps blow up), and PatchNCE's default is calibrated against the cross-attention
term, so it takes the same factor (0.05). A positive weight is used as given.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from .guidance import GuidanceTerm

#: The weight value meaning "auto" (any negative weight is auto).
AUTO = -1.0
#: Factor on the class default weights per prediction type ("eps", "v" or "flow"), raw and normalized modes.
#: "flow" (SD3, Flux): uncalibrated (no real weights measured yet), the eps steps as a starting point.
PREDICTION_SCALE = {"eps": 1.0, "v": 0.1, "flow": 1.0}
#: Step mode "auto": each term class's default ratio (its pull relative to cross-attention's), by class name
#: (the DINO terms live in ``diffuseit``, which imports the sampler: names avoid an import cycle).
AUTO_RATIOS = {
    "CrossAttentionGuidance": 1.0,
    "PatchNCEGuidance": 1.0,
    "DinoStructureGuidance": 1.0,
    "DinoStyleGuidance": 1.0,
    "SemanticDivergenceGuidance": 0.5,
    "RangeGuidance": 0.5,
}
#: The step modes whose weights are step sizes (the others' are ratios).
RAW_WEIGHT_MODES = ("raw", "normalized")


def weight_scale(prediction_type: str) -> float:
    """The factor for ``prediction_type`` ("eps" or "v"); ``ValueError`` naming the accepted values otherwise."""
    try:
        return PREDICTION_SCALE[prediction_type]
    except KeyError:
        raise ValueError(
            f"unknown prediction type {prediction_type!r} for auto guidance weights; "
            f"expected one of {', '.join(PREDICTION_SCALE)}"
        ) from None


def default_weight(term: GuidanceTerm | type[GuidanceTerm]) -> float:
    """The default ``weight`` of the term's class (its documented step for eps-prediction models)."""
    cls = term if isinstance(term, type) else type(term)
    for f in dataclasses.fields(cls):
        if f.name == "weight":
            return float(f.default)
    raise TypeError(f"{cls.__name__} has no weight field")  # unreachable for GuidanceTerm subclasses


def auto_ratio(term: GuidanceTerm | type[GuidanceTerm]) -> float:
    """Step mode "auto": the default ratio of ``term``'s class (``AUTO_RATIOS``; 1 for a class not listed)."""
    cls = term if isinstance(term, type) else type(term)
    return AUTO_RATIOS.get(cls.__name__, 1.0)


def auto_weight(term: GuidanceTerm | type[GuidanceTerm], prediction_type: str, step_mode: str = "raw") -> float:
    """What an auto weight of ``term`` (an instance or a class) resolves to for ``prediction_type`` and
    ``step_mode``: the ratio ``auto_ratio`` in "auto" mode, the scaled class default step otherwise."""
    scale = weight_scale(prediction_type)  # checked in every mode
    if _is_auto_mode(step_mode):
        return auto_ratio(term)
    return default_weight(term) * scale


def resolve_weights(
    terms: Iterable[GuidanceTerm] | None, prediction_type: str, *, step_mode: str
) -> tuple[GuidanceTerm, ...]:
    """``terms`` with every auto (negative) weight replaced by ``auto_weight`` for ``prediction_type`` and
    ``step_mode``; the others unchanged (the same objects). ``ValueError`` for an unknown prediction type or
    step mode, even when no weight is auto."""
    weight_scale(prediction_type)
    _is_auto_mode(step_mode)
    return tuple(
        dataclasses.replace(t, weight=auto_weight(t, prediction_type, step_mode)) if t.weight < 0 else t
        for t in (terms or ())
    )


def _is_auto_mode(step_mode: str) -> bool:
    if step_mode == "auto":
        return True
    if step_mode in RAW_WEIGHT_MODES:
        return False
    raise ValueError(f"unknown step mode {step_mode!r} for guidance weights; expected auto, raw or normalized")
