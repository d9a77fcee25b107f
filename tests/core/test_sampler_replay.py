"""The "inverted" reference: captures recorded by ``ddim_invert`` and replayed by ``guided_ddim_sample``.

The yardstick is the lockstep ("resampled") sampler whose reference forwards are pinned, by a test-only
wrapper around the denoiser, to the inverted trajectory: replay must reproduce it (float64 storage), run
one reference forward instead of one per step, and return the inversion's start latent as reconstruction.
"""

from __future__ import annotations

import logging

import pytest
import torch

from zerocon_core.denoiser import CaptureRequest
from zerocon_core.guidance import CrossAttentionGuidance, GuidanceTerm, PatchNCEGuidance
from zerocon_core.inversion import ddim_invert
from zerocon_core.replay import RecordSettings, step_record_bytes
from zerocon_core.sampler import SamplerSettings, guided_ddim_sample
from zerocon_core.schedule import ddim_sigmas, inversion_sigmas

from .tiny import TOKENS, tiny_cond, tiny_latent

N = 4
TERMS = (CrossAttentionGuidance(weight=0.3), PatchNCEGuidance(weight=0.5, num_patches=8))


class Pinned:
    """Wraps a denoiser: a no-grad forward that captures (the reference branch) runs on the inverted latent
    of its sigma instead of the latent it was given; counts those forwards."""

    def __init__(self, den, inv=None) -> None:
        self.den, self.inv, self.reference_forwards = den, inv, 0
        self.sigma_table, self.prediction_type = den.sigma_table, den.prediction_type

    def layers(self):
        return self.den.layers()

    def autograd_session(self):
        return self.den.autograd_session()

    def predict(self, x, sigma, conds, capture=None):
        if capture and not torch.is_grad_enabled():
            self.reference_forwards += 1
            if self.inv is not None:
                (k,) = [k for k, s in enumerate(self.inv.sigmas) if float(s) == float(sigma)]
                x = self.inv.trajectory[k]
        return self.den.predict(x, sigma, conds, capture)


@pytest.fixture(scope="module")
def setup(den):
    sigmas = ddim_sigmas(den.sigma_table, N)
    x0 = tiny_latent(3) / 1.0
    src, edit = tiny_cond(4), tiny_cond(5)
    return sigmas, x0, src, edit


def invert(den, setup, terms=TERMS, **record):
    sigmas, x0, src, _ = setup
    rec = RecordSettings(guidance=tuple(terms), **{"dtype": "float64", **record})
    return ddim_invert(den, x0, inversion_sigmas(sigmas), src, record=rec)


def sample(den, inv, setup, terms=TERMS, **settings):
    sigmas, _, src, edit = setup
    return guided_ddim_sample(
        den, inv.latent, sigmas, source_cond=src, edit_cond=edit, guidance=terms,
        settings=SamplerSettings(**settings), inversion=inv,
    )  # fmt: skip


def test_replay_equals_lockstep_pinned_to_the_inverted_trajectory(den, setup):
    inv = invert(den, setup)
    counting = Pinned(den)
    replay = sample(counting, inv, setup)
    assert replay.reference_mode == "inverted" and replay.replayed == [1, 2, 3]
    assert counting.reference_forwards == 1  # only sigma_max, which the inversion never evaluates

    pinned = Pinned(den, inv)
    lockstep = sample(pinned, inv, setup, reference="resampled")
    assert lockstep.reference_mode == "resampled" and pinned.reference_forwards == N
    torch.testing.assert_close(replay.latent, lockstep.latent, rtol=0, atol=1e-6)
    for a, b in zip(replay.losses, lockstep.losses):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(b[k])) for k in a)

    drifting = sample(den, inv, setup, reference="resampled")  # the plain lockstep branch is another edit
    assert float((drifting.latent - replay.latent).abs().max()) > 1e-4


def test_inverted_reconstruction_is_the_inversions_start_latent(den, setup):
    inv = invert(den, setup)
    res = sample(den, inv, setup, keep_reference=True)
    assert torch.equal(res.reference, inv.trajectory[0])
    resampled = sample(den, inv, setup, keep_reference=True, reference="resampled")
    assert not torch.allclose(resampled.reference, inv.trajectory[0], atol=1e-6)  # DDIM reconstruction drifts


def _formula_bytes(den, request: CaptureRequest, bytes_per: int) -> int:
    """The tiny UNet: 8 heads everywhere; level 0 is 8x8 with 32 channels, level 1 4x4 with 64."""
    level = {info.name: info.level for info in den.layers()}
    hw, channels = {0: 64, 1: 16}, {0: 32, 1: 64}
    probs = [(8, hw[level[n]]) for n in request.probs]
    feats = [(channels[level[n]], hw[level[n]]) for n in request.features]
    return step_record_bytes(probs, feats, TOKENS, bytes_per)


@pytest.mark.parametrize("dtype, size", [("float16", 2), ("bfloat16", 2)])
def test_recorded_bytes_match_the_formula(den, setup, dtype, size):
    terms = (CrossAttentionGuidance(end=0.75), PatchNCEGuidance(num_patches=8))
    inv = invert(den, setup, terms, dtype=dtype)
    rec = inv.record
    assert rec.request.probs and rec.request.features
    expected = _formula_bytes(den, rec.request, size)
    assert rec.step_bytes == expected
    assert sorted(rec.captures) == [1, 2, 3]  # levels n - i for the sampling steps 1..3 (step 0: live)
    assert rec.nbytes == 3 * expected and not rec.missing
    p = rec.captures[2]
    assert p.eps is None and all(t.dtype == getattr(torch, dtype) and t.device.type == "cpu" for t in p.probs.values())


def test_only_levels_where_a_capturing_term_is_active_are_recorded(den, setup):
    terms = (CrossAttentionGuidance(start=0.0, end=0.5),)  # sampling steps 0, 1 -> level 3 only
    inv = invert(den, setup, terms)
    assert sorted(inv.record.captures) == [3]
    assert inv.record.request.probs and not inv.record.request.features


def test_over_budget_levels_fall_back_to_a_live_reference_forward(den, setup, caplog):
    full = invert(den, setup)
    budget = 1.5 * full.record.step_bytes / 2**20  # one level fits
    with caplog.at_level(logging.WARNING, logger="zerocon"):
        inv = invert(den, setup, budget_mb=budget)
    assert sorted(inv.record.captures) == [3] and inv.record.missing == [1, 2]
    assert "1 of 3 levels fit" in caplog.text and "sampling steps [2, 3]" in caplog.text
    counting = Pinned(den)
    res = sample(counting, inv, setup)
    assert res.replayed == [1] and counting.reference_forwards == 3
    assert any("steps [2, 3] ran the reference forward on the inverted latent" in n for n in res.notes)
    torch.testing.assert_close(res.latent, sample(den, full, setup).latent, rtol=0, atol=1e-6)


class _NoCapture(GuidanceTerm):
    def loss(self, ctx, request):
        return (ctx.x0**2).mean()


@pytest.mark.parametrize("terms", [(), (_NoCapture(weight=0.1),)])
def test_nothing_is_recorded_when_no_term_needs_captures(den, setup, terms):
    counting = Pinned(den)
    inv = invert(counting, setup, terms)
    assert inv.record.captures == {} and inv.record.step_bytes == 0 and counting.reference_forwards == 0


@pytest.mark.parametrize(
    "how, why",
    [
        ("next", "the 'next' convention"),
        ("negative", "a separate negative"),
        ("pix2pix-zero", "branches 'pix2pix-zero' keeps diffusers' lockstep reference"),
        ("none", "no inversion trajectory was given"),
        ("grid", "the sampling grid is not the inversion's grid reversed"),
    ],
)
def test_inverted_falls_back_to_resampled_where_replay_is_not_exact(den, setup, how, why):
    sigmas, x0, src, edit = setup
    eval_at = "next" if how == "next" else "current"
    inv = ddim_invert(den, x0, inversion_sigmas(sigmas), src, eval_at=eval_at, record=RecordSettings(TERMS))
    kw = {"branches": "pix2pix-zero"} if how == "pix2pix-zero" else {}
    grid = ddim_sigmas(den.sigma_table, N + 1) if how == "grid" else sigmas
    x = inv.latent if how != "grid" else x0
    res = guided_ddim_sample(
        den, x, grid, source_cond=src, edit_cond=edit, guidance=TERMS,
        negative_cond=tiny_cond(6) if how == "negative" else None,
        settings=SamplerSettings(**kw), inversion=None if how == "none" else inv,
    )  # fmt: skip
    assert res.reference_mode == "resampled" and res.replayed == []
    assert any("reference 'inverted' falls back to 'resampled'" in n and why in n for n in res.notes), res.notes


def test_bad_reference_and_record_settings_are_refused():
    with pytest.raises(ValueError, match=r"reference must be one of \('inverted', 'resampled'\), got 'pinned'"):
        SamplerSettings(reference="pinned")
    with pytest.raises(ValueError, match="record dtype must be one of"):
        RecordSettings(dtype="int8")
    with pytest.raises(ValueError, match="record budget must be >= 0 MiB"):
        RecordSettings(budget_mb=-1)
