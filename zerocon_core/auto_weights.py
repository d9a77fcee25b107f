"""Auto guidance weights: the one rule the nodes, the pipeline and the CLI use to pick a term's weight.

A guidance term whose ``weight`` is negative (``AUTO``, -1: what the guidance nodes default to, and what
the pipeline uses when no weight is given) is "auto". It resolves, once the model's prediction type is
known, to

    auto weight = the term class's default weight x PREDICTION_SCALE[prediction type]

The class default is the step for eps-prediction models (SD1.x, SD2-base, SDXL): cross-attention 0.1
(pix2pix-zero's step for real images), PatchNCE 0.5 (our calibration, matched to the cross-attention
term's pull). v-prediction models (SD2-768-v) get a tenth of it for **every** term: their guidance
gradients are about ten times larger, pix2pix-zero's authors advise a cross-attention step of 0.01 or less
for them (the default steps blow up), and PatchNCE's default is calibrated against the cross-attention
term, so it takes the same factor (0.05). Weight 0 disables a term; a positive weight is used as given.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from .guidance import GuidanceTerm

#: The weight value meaning "auto" (any negative weight is auto).
AUTO = -1.0
#: Factor on the class default weights per prediction type ("eps", "v" or "flow"). "flow" (SD3, Flux):
#: uncalibrated (no real weights measured yet), the eps steps as a starting point.
PREDICTION_SCALE = {"eps": 1.0, "v": 0.1, "flow": 1.0}


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


def auto_weight(term: GuidanceTerm | type[GuidanceTerm], prediction_type: str) -> float:
    """What an auto weight of ``term`` (an instance or a class) resolves to for ``prediction_type``."""
    return default_weight(term) * weight_scale(prediction_type)


def resolve_weights(terms: Iterable[GuidanceTerm] | None, prediction_type: str) -> tuple[GuidanceTerm, ...]:
    """``terms`` with every auto (negative) weight replaced by ``auto_weight``; the others unchanged."""
    scale = weight_scale(prediction_type)
    return tuple(dataclasses.replace(t, weight=default_weight(t) * scale) if t.weight < 0 else t for t in (terms or ()))
