"""Guidance terms (zerocon_core.method.guidance): the step window's end is exclusive and a term's weight is applied
exactly once (by the sampler, not also inside the term's loss).

Checked through the sampler against the losses recomputed from the denoiser's captures; each test fails on
the mistake it names, which the behaviour tests in test_sampler.py let through.
"""

from __future__ import annotations

import pytest
import torch

from zerocon_core.method import losses as L
from zerocon_core.method.guidance import CrossAttentionGuidance, GuidanceTerm, PatchNCEGuidance
from zerocon_core.method.sampler import SamplerSettings, guided_ddim_sample
from zerocon_core.method.schedule import ddim_sigmas, vp_scale

from .tiny import tiny_cond, tiny_latent


def sample(den, x, sigmas, **kw):
    """The sampler under test (one place to adapt if its signature changes)."""
    return guided_ddim_sample(den, x, sigmas, **kw)


@pytest.mark.parametrize(
    "start,end,steps,active",
    [
        (0.0, 0.5, 4, [0, 1]),
        (0.25, 0.75, 4, [1, 2]),
        (0.5, 1.0, 4, [2, 3]),
        (0.0, 0.4, 5, [0, 1]),
        (0.2, 0.6, 5, [1, 2]),
    ],
)
def test_window_is_start_inclusive_end_exclusive(den, start, end, steps, active):
    """A term is active at step i of N when ``start <= i / N < end``: an end on a step boundary excludes
    that step (so windows [0, 0.5) and [0.5, 1) split the steps without overlap)."""
    term = CrossAttentionGuidance(weight=0.05, start=start, end=end)
    assert [i for i in range(steps) if term.active(i, steps)] == active
    sig = ddim_sigmas(den.sigma_table, steps)
    res = sample(
        den, tiny_latent(4) / vp_scale(sig[0]), sig, source_cond=tiny_cond(1), edit_cond=tiny_cond(2), guidance=[term]
    )
    assert len(res.losses) == len(active)
    if end < 1.0:  # the next window starts where this one ends: no step is in both
        after = GuidanceTerm(start=end, end=1.0)
        assert not any(term.active(i, steps) and after.active(i, steps) for i in range(steps))


@pytest.mark.parametrize("kind", ["xattn", "patchnce"])
@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_weight_is_applied_once(den, kind, weight):
    """The sampler logs ``weight * loss`` where ``loss`` is the unweighted loss of the captures (recomputed
    here at the first step, where edit and reference start from the same latent): a weight applied inside
    the term as well would log ``weight^2 * loss``. The term's own ``loss`` does not depend on the weight."""
    sig = ddim_sigmas(den.sigma_table, 2)
    x = tiny_latent(6) / vp_scale(sig[0])
    src, edit = tiny_cond(1), tiny_cond(2)
    if kind == "xattn":
        term = CrossAttentionGuidance(weight=weight)
    else:
        term = PatchNCEGuidance(weight=weight, num_patches=8, layers="up", patch_sizes=(1, 2))
    req = term.request(den.layers())
    res = sample(
        den,
        x,
        sig,
        source_cond=src,
        edit_cond=edit,
        guidance=[term],
        settings=SamplerSettings(step_mode="normalized", seed=3),
    )
    with torch.no_grad():
        (p_edit,) = den.predict(x, sig[0], [edit], req)
        (p_ref,) = den.predict(x, sig[0], [src], req)
    if kind == "xattn":
        loss = L.cross_attention_loss(p_edit.probs, p_ref.probs)
    else:  # the term's seed (default 0) and the step draw the sample locations
        loss = L.multi_patch_nce_loss(
            {n: p_edit.features[n] for n in sorted(req.features)},
            {n: p_ref.features[n] for n in sorted(req.features)},
            patch_sizes=(1, 2),
            num_patches=8,
            seed=0,
            step=0,
        )
    name = type(term).__name__
    assert res.losses[0][name] == pytest.approx(weight * float(loss), rel=1e-9)
