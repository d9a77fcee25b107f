"""The auto guidance-weight rule (``zerocon_core.method.auto_weights``) and the pipeline's use of it.

Expected values are the documented ones, written out here: cross-attention 0.1 / PatchNCE 0.5 on
eps-prediction models, a tenth of each (0.01 / 0.05) on v-prediction models.
"""

from __future__ import annotations

import pytest

from zerocon_core.diffusers_host.pipeline import default_guidance
from zerocon_core.method import auto_weights as aw
from zerocon_core.method.guidance import CrossAttentionGuidance, PatchNCEGuidance

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


# -- step mode "auto": weights are ratios ---------------------------------------------------------------------


@pytest.mark.parametrize("ptype", ["eps", "v"])
def test_auto_mode_resolves_to_the_default_ratios(ptype):
    """In step mode auto an auto weight is the class's ratio, the same on every prediction type; a positive
    weight is the ratio as given; 0 stays off."""
    terms = (
        CrossAttentionGuidance(weight=aw.AUTO),
        PatchNCEGuidance(weight=-0.5),
        CrossAttentionGuidance(weight=0.3),
        PatchNCEGuidance(weight=0.0),
    )
    out = aw.resolve_weights(terms, ptype, step_mode="auto")
    assert [t.weight for t in out] == [1.0, 1.0, 0.3, 0.0]
    assert out[2] is terms[2] and out[3] is terms[3]
    assert [t.weight for t in default_guidance(ptype, step_mode="auto")] == [1.0, 1.0]
    assert [t.weight for t in default_guidance(ptype, 2.0, None, step_mode="auto")] == [2.0, 1.0]


def test_dino_terms_have_their_documented_ratios():
    from zerocon_core.diffuseit.guidance import (
        DinoStructureGuidance,
        DinoStyleGuidance,
        RangeGuidance,
        SemanticDivergenceGuidance,
    )

    ratios = [aw.auto_ratio(c) for c in (DinoStructureGuidance, DinoStyleGuidance, SemanticDivergenceGuidance)]
    assert ratios + [aw.auto_ratio(RangeGuidance)] == [1.0, 1.0, 0.5, 0.5]
    assert aw.auto_weight(RangeGuidance, "v", "auto") == 0.5
    assert aw.auto_weight(RangeGuidance, "v", "raw") == pytest.approx(0.1)  # class default 1 x the v factor


def test_unknown_step_mode_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown step mode 'adam' for guidance weights; expected auto, raw or"):
        aw.resolve_weights((), "eps", step_mode="adam")


def test_edit_options_default_to_auto_except_pix2pix_zero():
    from zerocon_core.diffusers_host.pipeline import EditOptions

    assert EditOptions().sampler_settings().step_mode == "auto"
    assert EditOptions(branches="pix2pix-zero").sampler_settings().step_mode == "raw"
    s = EditOptions(step_mode="normalized", step_size=0.05).sampler_settings()
    assert (s.step_mode, s.step_size) == ("normalized", 0.05)
    with pytest.raises(ValueError, match="step_size must be a finite number >= 0"):
        EditOptions(step_size=-1.0).validate()
