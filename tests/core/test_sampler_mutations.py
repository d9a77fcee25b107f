"""The guided sampler (zerocon_core.method.sampler) against pix2pix-zero's guided loop written out independently.

Each test here fails on a plausible mistake that the behaviour tests in test_sampler.py would let through:
the edit compared with the negative's reference half, the halves of ``branches="both"`` paired crosswise or
not averaged, ``"both"`` silently treated as ``"edit"``, a non-finite guard that only fires when every
element of the gradient is non-finite.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
import torch

from zerocon_core.method import losses as L
from zerocon_core.method.denoiser import CaptureRequest
from zerocon_core.method.guidance import CrossAttentionGuidance, GuidanceTerm, StepContext
from zerocon_core.method.sampler import SamplerSettings, guided_ddim_sample
from zerocon_core.method.schedule import ddim_sigmas, vp_scale

from .tiny import rel_err, tiny_cond, tiny_latent

WEIGHT, CFG, STEPS = 0.05, 3.0, 4


def sample(den, x, sigmas, **kw):
    """The sampler under test (one place to adapt if its signature changes)."""
    return guided_ddim_sample(den, x, sigmas, **kw)


def reference_loop(den, x, sigmas, src, edit, neg, cfg, weight, branches):
    """pix2pix-zero's guided DDIM loop with cross-attention guidance on every ``attn2`` layer, float64.

    Reference branch: DDIM from the same latent under CFG(negative, source), or the source alone when there
    is no separate negative (then the negative *is* the source). Edit branch, per step: one SGD step of size
    ``weight`` on the VP latent ``z = x / sqrt(1 + s^2)`` on the cross-attention loss of the edit half
    against the source's reference maps ("edit"), or the mean of that and the negative half against the
    negative's reference maps ("both"); then a CFG DDIM step ``x + (s_next - s) * eps``.
    Returns (edit latent, reference latent, per-step weighted losses).
    """
    names = frozenset(i.name for i in den.layers() if i.kind == "cross")
    req = CaptureRequest(probs=names)
    negc = src if neg is None else neg
    x, x_ref, logged = x.clone(), x.clone(), []
    for i in range(len(sigmas) - 1):
        s, sn = sigmas[i], sigmas[i + 1]
        with torch.no_grad():
            if neg is None:
                (r_src,) = den.predict(x_ref, s, [src], req)
                r_neg, eps_ref = r_src, r_src.eps
            else:
                r_neg, r_src = den.predict(x_ref, s, [neg, src], req)
                eps_ref = r_neg.eps + cfg * (r_src.eps - r_neg.eps)
            x_ref = x_ref + (sn - s) * eps_ref
        c = 1.0 / torch.sqrt(1.0 + s * s)
        z = (x * c).detach().requires_grad_(True)
        if branches == "edit":
            (e_edit,) = den.predict(z / c, s, [edit], req)
            loss = L.cross_attention_loss(e_edit.probs, r_src.probs)
        else:
            e_neg, e_edit = den.predict(z / c, s, [negc, edit], req)
            loss = 0.5 * (
                L.cross_attention_loss(e_neg.probs, r_neg.probs) + L.cross_attention_loss(e_edit.probs, r_src.probs)
            )
        (g,) = torch.autograd.grad(weight * loss, z)
        logged.append(float(weight * loss.detach()))
        x = ((z - g) / c).detach()
        with torch.no_grad():
            p_neg, p_edit = den.predict(x, s, [negc, edit])
            x = x + (sn - s) * (p_neg.eps + cfg * (p_edit.eps - p_neg.eps))
    return x, x_ref, logged


@pytest.fixture(scope="module")
def start(den):
    sig = ddim_sigmas(den.sigma_table, STEPS)
    return sig, tiny_latent(21) / vp_scale(sig[0])


@pytest.mark.parametrize("separate_negative", [False, True], ids=["neg=source", "neg=separate"])
@pytest.mark.parametrize("branches", ["edit", "both"])
def test_guided_loop_equals_the_written_out_loop(den, start, branches, separate_negative):
    """Latent, reconstruction and logged losses equal the independent loop: the edit half is compared with
    the source's reference maps, in "both" the negative half with the negative's, the two averaged."""
    sig, x = start
    src, edit = tiny_cond(1), tiny_cond(2)
    neg = tiny_cond(3, tokens=16) if separate_negative else None
    res = sample(
        den,
        x,
        sig,
        source_cond=src,
        edit_cond=edit,
        negative_cond=neg,
        guidance=(CrossAttentionGuidance(weight=WEIGHT),),
        settings=SamplerSettings(cfg=CFG, branches=branches, keep_reference=True, step_mode="raw"),
    )
    want, want_ref, want_losses = reference_loop(den, x, sig, src, edit, neg, CFG, WEIGHT, branches)
    assert rel_err(res.latent, want) < 1e-9
    assert rel_err(res.reference, want_ref) < 1e-12
    got_losses = [d["CrossAttentionGuidance"] for d in res.losses]
    assert got_losses == pytest.approx(want_losses, rel=1e-9)


def test_both_differs_from_edit_by_the_negative_half(den, start):
    """ "both" is not "edit": the negative half's gradient moves the latent by a measured amount, about half
    as far as guidance itself moves it (relative differences 2.1e-4 and 3.9e-4 here, against 1e-15 agreement
    with the written-out loop). At the first step both branches start from the same latent, so the negative
    half's loss is 0 and "both" logs exactly half of "edit": the halves are averaged, not summed."""
    sig, x = start
    src, edit, neg = tiny_cond(1), tiny_cond(2), tiny_cond(3, tokens=16)
    kw = dict(source_cond=src, edit_cond=edit)
    terms = (CrossAttentionGuidance(weight=WEIGHT),)
    for negative in (None, neg):
        unguided = sample(den, x, sig, negative_cond=negative, **kw, settings=SamplerSettings(cfg=CFG))
        e = sample(
            den,
            x,
            sig,
            negative_cond=negative,
            guidance=terms,
            **kw,
            settings=SamplerSettings(cfg=CFG, branches="edit", step_mode="raw"),
        )
        b = sample(
            den,
            x,
            sig,
            negative_cond=negative,
            guidance=terms,
            **kw,
            settings=SamplerSettings(cfg=CFG, branches="both", step_mode="raw"),
        )
        assert rel_err(b.latent, e.latent) > 0.25 * rel_err(e.latent, unguided.latent)
        first_edit, first_both = e.losses[0]["CrossAttentionGuidance"], b.losses[0]["CrossAttentionGuidance"]
        assert first_both == pytest.approx(first_edit / 2, rel=1e-9)


@dataclass(frozen=True)
class OneBadElement(GuidanceTerm):
    """A term whose gradient is finite everywhere but at one element of the latent (NaN or Inf there)."""

    bad: float = float("nan")

    def loss(self, ctx: StepContext, request: CaptureRequest) -> torch.Tensor:
        return ctx.x.sum() + ctx.x.flatten()[0] * self.bad


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_one_non_finite_element_skips_the_step(den, start, bad, caplog):
    sig, x = start
    src, edit = tiny_cond(1), tiny_cond(2)
    with caplog.at_level(logging.WARNING, logger="zerocon"):
        res = sample(den, x, sig, source_cond=src, edit_cond=edit, guidance=(OneBadElement(bad=bad),))
    assert res.skipped == list(range(STEPS))
    assert "not finite" in caplog.text
    plain = sample(den, x, sig, source_cond=src, edit_cond=edit)
    assert torch.equal(res.latent, plain.latent)
