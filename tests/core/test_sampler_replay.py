"""The "inverted" reference: captures recorded by ``ddim_invert`` and replayed by ``guided_ddim_sample``.

The yardstick is the lockstep ("resampled") sampler whose reference forwards are pinned, by a test-only
wrapper around the denoiser, to the inverted trajectory: replay must reproduce it (float64 storage), run
one reference forward instead of one per step, and return the inversion's start latent as reconstruction.
"""

from __future__ import annotations

import logging

import pytest
import torch

from zerocon_core.method.denoiser import CaptureRequest
from zerocon_core.method.guidance import CrossAttentionGuidance, GuidanceTerm, PatchNCEGuidance
from zerocon_core.method.inversion import ddim_invert
from zerocon_core.method.losses import PatchSamples, patch_locations
from zerocon_core.method.replay import RecordSettings, step_record_bytes
from zerocon_core.method.sampler import SamplerSettings, guided_ddim_sample
from zerocon_core.method.schedule import ddim_sigmas, inversion_sigmas

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
    assert all(isinstance(f, PatchSamples) for c in inv.record.captures.values() for f in c.features.values())
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


def _formula_bytes(den, request: CaptureRequest, bytes_per: int, num_patches: int, sizes=(1, 2)) -> int:
    """The tiny UNet: 8 heads everywhere; level 0 is 8x8 with 32 channels, level 1 4x4 with 64. PatchNCE keeps
    ``min(num_patches, HW / p^2)`` positions per layer and patch size."""
    level = {info.name: info.level for info in den.layers()}
    side, channels = {0: 8, 1: 4}, {0: 32, 1: 64}
    probs = [(8, side[level[n]] ** 2) for n in request.probs]
    patches = [
        (channels[level[n]], min(num_patches, (side[level[n]] // p) ** 2)) for n in request.features for p in sizes
    ]
    return step_record_bytes(probs, [], TOKENS, bytes_per, patches=patches)


@pytest.mark.parametrize("dtype, size", [("float16", 2), ("bfloat16", 2)])
def test_recorded_bytes_match_the_formula(den, setup, dtype, size):
    terms = (CrossAttentionGuidance(end=0.75), PatchNCEGuidance(num_patches=8))
    inv = invert(den, setup, terms, dtype=dtype)
    rec = inv.record
    assert rec.request.probs and rec.request.features
    expected = _formula_bytes(den, rec.request, size, num_patches=8)
    # 8 of 64 and 8 of 16 positions at level 0, 8 of 16 and all 4 at level 1: less than the maps (C x HW)
    assert expected < _formula_bytes(den, rec.request, size, num_patches=64) - 1000
    assert rec.step_bytes == expected
    assert sorted(rec.captures) == [1, 2, 3]  # levels n - i for the sampling steps 1..3 (step 0: live)
    assert rec.nbytes == 3 * expected and not rec.missing
    p = rec.captures[2]
    assert p.eps is None and all(t.dtype == getattr(torch, dtype) and t.device.type == "cpu" for t in p.probs.values())
    for samples in p.features.values():
        assert isinstance(samples, PatchSamples)
        assert all(v.dtype == getattr(torch, dtype) and v.device.type == "cpu" for v in samples.values.values())


def _pool(fmap: torch.Tensor, p: int) -> torch.Tensor:
    """p x p block means of (B, C, H, W), written out (H, W multiples of p here)."""
    b, c, h, w = fmap.shape
    return fmap.reshape(b, c, h // p, p, w // p, p).mean(dim=(3, 5))


def test_the_record_holds_the_pooled_features_at_exactly_the_steps_locations(den, setup):
    """At level k (sampling step n - k), layer l and patch size p the record holds the p x p block means of the
    inversion forward's map at ``patch_locations(seed, n - k, l, p)``, and nothing else."""
    sigmas, _, src, _ = setup
    term = PatchNCEGuidance(num_patches=8, seed=11)
    inv = invert(den, setup, (term,))
    rec, req = inv.record, term.request(den.layers())
    inv_sigmas = inversion_sigmas(sigmas)
    for k in (1, 2, 3):
        with torch.no_grad():
            (full,) = den.predict(inv.trajectory[k], inv_sigmas[k], [src], req)
        for name in req.features:
            fmap, stored = full.features[name], rec.captures[k].features[name]
            assert isinstance(stored, PatchSamples) and stored.shape == tuple(fmap.shape)
            assert sorted(stored.values) == [(1, 11, 8), (2, 11, 8)]
            for p in (1, 2):
                pooled = _pool(fmap, p).flatten(2)
                idx = patch_locations(11, N - k, name, p, pooled.shape[-1], 8)
                torch.testing.assert_close(stored.values[(p, 11, 8)], pooled[:, :, idx], rtol=0, atol=1e-12)
                other = patch_locations(11, k, name, p, pooled.shape[-1], 8)  # the level's index, not the step's
                if not torch.equal(other, idx):
                    assert not torch.allclose(stored.values[(p, 11, 8)], pooled[:, :, other])


def test_patch_locations_are_a_pure_function_of_seed_step_layer_and_size():
    first = patch_locations(3, 2, "up.attn1", 2, 1024, 256)
    torch.manual_seed(123)
    torch.randperm(1000)  # what was drawn before does not matter
    assert torch.equal(patch_locations(3, 2, "up.attn1", 2, 1024, 256), first)
    assert first.dtype == torch.int64 and len(set(first.tolist())) == 256 and 0 <= int(first.min()) < 1024
    assert int(first.max()) < 1024
    for other in [(4, 2, "up.attn1", 2), (3, 1, "up.attn1", 2), (3, 2, "up.attn1b", 2), (3, 2, "up.attn1", 1)]:
        assert not torch.equal(patch_locations(*other, 1024, 256), first), other
    assert sorted(patch_locations(3, 2, "x", 1, 12, 256).tolist()) == list(range(12))  # fewer locations: all


TERMS_SEED_1 = (TERMS[0], PatchNCEGuidance(weight=0.5, num_patches=8, seed=1))


def test_a_record_for_other_patchnce_settings_is_not_replayed(den, setup, caplog):
    """The sampler's PatchNCE draws other locations than the recorded ones (another seed): no replay, a note,
    and the same edit as with a record made for its own settings."""
    inv = invert(den, setup)  # TERMS: PatchNCE seed 0
    with caplog.at_level(logging.WARNING, logger="zerocon"):
        res = sample(den, inv, setup, TERMS_SEED_1)
    assert res.reference_mode == "inverted" and res.replayed == []
    assert any("recorded PatchNCEGuidance's samples for other settings" in n for n in res.notes), res.notes
    assert "for other settings" in caplog.text
    own = sample(den, invert(den, setup, TERMS_SEED_1), setup, TERMS_SEED_1)
    assert own.replayed == [1, 2, 3]
    torch.testing.assert_close(res.latent, own.latent, rtol=0, atol=1e-6)
    assert float((own.latent - sample(den, inv, setup).latent).abs().max()) > 1e-6  # the seed matters


class _WholeFeatures(GuidanceTerm):
    """A term that reads the reference feature maps whole (as a non-PatchNCE term would)."""

    def request(self, layers):
        return PatchNCEGuidance().request(layers)

    def loss(self, ctx, request):
        return sum(((ctx.edit.features[n] - ctx.ref.features[n]) ** 2).mean() for n in sorted(request.features))


def test_a_layer_also_read_whole_is_recorded_whole_and_replay_stays_exact(den, setup):
    terms = (*TERMS, _WholeFeatures(weight=0.2))
    inv = invert(den, setup, terms)
    assert inv.record.sampled == {} and all(
        isinstance(t, torch.Tensor) and t.ndim == 4 for t in inv.record.captures[2].features.values()
    )
    replay = sample(den, inv, setup, terms)
    pinned = Pinned(den, inv)
    lockstep = sample(pinned, inv, setup, terms, reference="resampled")
    assert replay.replayed == [1, 2, 3]
    torch.testing.assert_close(replay.latent, lockstep.latent, rtol=0, atol=1e-6)


def test_a_record_of_samples_is_not_replayed_to_a_term_reading_whole_maps(den, setup):
    inv = invert(den, setup)  # PatchNCE only reads the features: samples recorded
    terms = (*TERMS, _WholeFeatures(weight=0.2))
    res = sample(den, inv, setup, terms)
    assert res.replayed == [] and any("_WholeFeatures reads whole" in n for n in res.notes), res.notes
    torch.testing.assert_close(
        res.latent, sample(den, invert(den, setup, terms), setup, terms).latent, rtol=0, atol=1e-6
    )


def test_the_samplers_seed_does_not_move_patchnce_locations(den, setup):
    """PatchNCE's locations come from the term's seed (so the inversion can record them), not the sampler's."""
    inv = invert(den, setup)
    a, b = sample(den, inv, setup, seed=0), sample(den, inv, setup, seed=5)
    assert torch.equal(a.latent, b.latent)


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


def test_the_command_lines_seed_seeds_patchnce():
    from zerocon_core.diffusers_host.pipeline import default_guidance

    (nce,) = [t for t in default_guidance("eps", nce_seed=5, step_mode="auto") if isinstance(t, PatchNCEGuidance)]
    assert nce.seed == 5 and nce.samples_key == ("PatchNCE", (1, 2), 256, 5)
