"""The auto guidance-weight rule (``zerocon_core.auto_weights``) and the pipeline's use of it.

Expected values are the documented ones, written out here: cross-attention 0.1 / PatchNCE 0.5 on
eps-prediction models, a tenth of each (0.01 / 0.05) on v-prediction models.
"""

from __future__ import annotations

import pytest

from zerocon_core import auto_weights as aw
from zerocon_core.guidance import CrossAttentionGuidance, PatchNCEGuidance
from zerocon_core.pipeline import default_guidance

from .tiny import tiny_denoiser

DOCUMENTED = {"eps": (0.1, 0.5), "v": (0.01, 0.05)}


@pytest.mark.parametrize("ptype", ["eps", "v"])
def test_every_auto_term_is_scaled(ptype):
    xa, nce = DOCUMENTED[ptype]
    terms = (
        CrossAttentionGuidance(weight=aw.AUTO, layers="up"),
        PatchNCEGuidance(weight=-0.5, num_patches=8),  # any negative weight is auto
        CrossAttentionGuidance(weight=0.3),
        PatchNCEGuidance(weight=0.0),
    )
    out = aw.resolve_weights(terms, ptype, step_mode="raw")
    assert [t.weight for t in out] == pytest.approx([xa, nce, 0.3, 0.0], rel=1e-12)
    # only the weight changes
    assert out[0].layers == "up" and out[1].num_patches == 8
    assert out[2] is terms[2] and out[3] is terms[3]
    assert aw.auto_weight(CrossAttentionGuidance, ptype) == pytest.approx(xa, rel=1e-12)
    assert aw.auto_weight(PatchNCEGuidance(), ptype) == pytest.approx(nce, rel=1e-12)


def test_no_terms():
    assert aw.resolve_weights(None, "v", step_mode="raw") == ()
    assert aw.resolve_weights((), "eps", step_mode="auto") == ()


@pytest.mark.parametrize("bad", ["epsilon", "v_prediction", "sample", ""])
def test_unknown_prediction_type_is_a_clear_error(bad):
    with pytest.raises(
        ValueError, match=r"unknown prediction type .* for auto guidance weights; expected one of eps, v"
    ):
        aw.resolve_weights((CrossAttentionGuidance(weight=aw.AUTO),), bad, step_mode="raw")


@pytest.mark.parametrize("ptype", ["eps", "v"])
def test_pipeline_default_guidance_uses_the_rule(ptype):
    xa, nce = DOCUMENTED[ptype]
    terms = default_guidance(ptype, step_mode="raw")
    assert [type(t) for t in terms] == [CrossAttentionGuidance, PatchNCEGuidance]
    assert [t.weight for t in terms] == pytest.approx([xa, nce], rel=1e-12)
    # given weights are kept, 0 drops a term
    (only,) = default_guidance(ptype, xa_weight=0.0, nce_weight=0.2, step_mode="raw")
    assert isinstance(only, PatchNCEGuidance) and only.weight == 0.2
    (only,) = default_guidance(ptype, xa_weight=0.07, nce_weight=0.0, step_mode="raw")
    assert isinstance(only, CrossAttentionGuidance) and only.weight == 0.07
    assert default_guidance(ptype, 0.0, 0.0, step_mode="raw") == ()


def test_pipeline_on_a_v_prediction_model():
    """The pipeline resolves with its denoiser's prediction type: a v-prediction UNet gets 0.01 / 0.05."""
    den = tiny_denoiser("v_prediction", seed=1)
    assert den.prediction_type == "v"
    assert [t.weight for t in default_guidance(den.prediction_type, step_mode="raw")] == pytest.approx(
        DOCUMENTED["v"], rel=1e-12
    )
