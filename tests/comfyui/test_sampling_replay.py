"""The "inverted" reference through the nodes: DDIM Inversion records for its guidance input, the Guided
Sampler replays the record when it matches (else a logged "resampled" fallback), and a stock KSampler is
bit-identical afterwards."""

from __future__ import annotations

import logging

import sampling_helpers as h
import tiny_models as tm
import torch


def _spy(zc, monkeypatch) -> list:
    """Record every engine ``SampleResult`` the pack's guided sampler produces."""
    results = []
    real = zc.sampling.guided_ddim_sample

    def spy(*args, **kwargs):
        res = real(*args, **kwargs)
        results.append(res)
        return res

    monkeypatch.setattr(zc.sampling, "guided_ddim_sample", spy)
    return results


def test_inversion_records_what_the_guidance_needs_and_the_sampler_replays_it(zc, run, sd15_model, monkeypatch):
    lat, cap, edit = tm.latent(40), tm.conditioning(41), tm.conditioning(42)
    g = h.guidance(zc, run)
    _, inversion, _ = h.invert(zc, run, sd15_model, lat, cap, guidance=g)
    replay = inversion.replay
    assert replay is not None and sorted(replay.record.captures) == list(range(1, h.STEPS))
    assert replay.record.request.probs and replay.record.request.features
    assert all(t.dtype == torch.float16 and t.device.type == "cpu" for t in replay.record.captures[1].probs.values())
    # PatchNCE's layers hold only its sampled positions (16 per patch size), fp16 on the CPU
    for samples in replay.record.captures[1].features.values():
        assert type(samples).__name__ == "PatchSamples" and samples.values
        assert all(
            v.dtype == torch.float16 and v.device.type == "cpu" and v.shape[-1] <= 16 for v in samples.values.values()
        )

    results = _spy(zc, monkeypatch)
    edit_inv, rec_inv = h.guided(zc, run, sd15_model, inversion, edit, guidance=g)
    edit_res, rec_res = h.guided(zc, run, sd15_model, inversion, edit, guidance=g, reference="resampled")
    assert results[0].reference_mode == "inverted" and results[0].replayed == list(range(1, h.STEPS))
    assert results[1].reference_mode == "resampled" and results[1].replayed == []
    # the reconstruction is the inversion's start latent (up to the latent format's scaling round-off)
    torch.testing.assert_close(rec_inv["samples"], lat["samples"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(rec_res["samples"], lat["samples"], rtol=1e-3, atol=1e-3)
    assert (edit_inv["samples"] - edit_res["samples"]).abs().max() > 1e-4


def test_a_mismatched_record_falls_back_to_resampled_with_a_log_line(zc, run, sd15_model, monkeypatch, caplog):
    lat, cap, edit = tm.latent(43), tm.conditioning(44), tm.conditioning(45)
    g = h.guidance(zc, run)
    _, recorded_other, _ = h.invert(zc, run, sd15_model, lat, cap, guidance=h.guidance(zc, run, xa=0.2))
    _, recorded_none, _ = h.invert(zc, run, sd15_model, lat, cap)
    results = _spy(zc, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="zerocon"):
        other, _ = h.guided(zc, run, sd15_model, recorded_other, edit, guidance=g)
        none, _ = h.guided(zc, run, sd15_model, recorded_none, edit, guidance=g)
    assert "reference 'inverted' falls back to 'resampled': the guidance differs from the one DDIM Inversion" in (
        caplog.text
    )
    assert "DDIM Inversion recorded nothing: connect the same guidance to its 'guidance' input" in caplog.text
    assert [r.reference_mode for r in results] == ["resampled", "resampled"]
    # each fallback is the "resampled" edit of its own inversion (an inversion that captured differs from one that
    # did not by float32 round-off: the capturing attention computes its probabilities explicitly)
    for fallback, inv in ((other, recorded_other), (none, recorded_none)):
        resampled, _ = h.guided(zc, run, sd15_model, inv, edit, guidance=g, reference="resampled")
        assert torch.equal(fallback["samples"], resampled["samples"])


def test_another_source_conditioning_is_not_replayed(zc, run, sd15_model, monkeypatch, caplog):
    lat, cap, edit = tm.latent(52), tm.conditioning(53), tm.conditioning(54)
    g = h.guidance(zc, run)
    _, inversion, _ = h.invert(zc, run, sd15_model, lat, cap, guidance=g)
    results = _spy(zc, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="zerocon"):
        h.guided(zc, run, sd15_model, inversion, edit, guidance=g, source=tm.conditioning(55))
    assert "falls back to 'resampled': the source conditioning is not the one the inversion used" in caplog.text
    assert results[0].reference_mode == "resampled"


def _guider_nodes(zc, run, model, seed: int):
    """A guided inversion of latent ``seed`` (caption ``seed + 1``) and the Guider (edit ``seed + 2``, that
    inversion) and Guided DDIM Sampler nodes: (guider, sampler, inversion, sigmas)."""
    lat, cap, edit = tm.latent(seed), tm.conditioning(seed + 1), tm.conditioning(seed + 2)
    g = h.guidance(zc, run)
    _, inversion, sigmas = h.invert(zc, run, model, lat, cap, guidance=g)
    (guider,) = run(zc.sampling.ZeroConGuiderNode, model=model, edited=edit, source=cap, cfg=5.0, guidance=g,
                    inversion=inversion)  # fmt: skip
    return guider, h.ddim_sampler_node(zc, run), inversion, sigmas


def test_the_guider_replays_through_sampler_custom_advanced_nodes(zc, run, sd15_model, monkeypatch):
    guider, sampler, inversion, sigmas = _guider_nodes(zc, run, sd15_model, 46)
    results = _spy(zc, monkeypatch)
    h.sample_custom_advanced(guider, sampler, sigmas, {"samples": inversion.latent})
    assert results[0].reference_mode == "inverted" and results[0].replayed == list(range(1, h.STEPS))


def test_stock_ksampler_is_bit_identical_after_a_replayed_run(zc, run, sd15_model):
    lat, cap, edit = tm.latent(49), tm.conditioning(50), tm.conditioning(51)
    g = h.guidance(zc, run)
    before = h.ksampler(sd15_model, edit, cap, lat)
    _, inversion, _ = h.invert(zc, run, sd15_model, lat, cap, guidance=g)
    h.guided(zc, run, sd15_model, inversion, edit, guidance=g)
    assert torch.equal(h.ksampler(sd15_model, edit, cap, lat), before)


def test_other_steps_through_the_guider_are_not_replayed(zc, run, sd15_model, monkeypatch, caplog):
    guider, sampler, inversion, _ = _guider_nodes(zc, run, sd15_model, 56)
    results = _spy(zc, monkeypatch)
    other = h.ddim_sigmas(sd15_model, h.STEPS - 1)
    with caplog.at_level(logging.WARNING, logger="zerocon"):
        h.sample_custom_advanced(guider, sampler, other, {"samples": inversion.latent})
    assert f"the inversion has {h.STEPS} steps, the sampler {h.STEPS - 1}" in caplog.text
    assert results[0].reference_mode == "resampled"


def test_the_patchnce_nodes_seed_picks_the_recorded_locations(zc, run, sd15_model, monkeypatch, caplog):
    """The PatchNCE node's seed reaches the term: another seed records other locations, and a sampler whose guidance
    has another seed than the inversion recorded for does not replay (logged fallback)."""
    lat, cap, edit = tm.latent(43), tm.conditioning(44), tm.conditioning(45)
    g0, g7 = h.guidance(zc, run), h.guidance(zc, run, seed=7)
    assert [t.seed for t in g7 if type(t).__name__ == "PatchNCEGuidance"] == [7]
    _, inv0, _ = h.invert(zc, run, sd15_model, lat, cap, guidance=g0)
    _, inv7, _ = h.invert(zc, run, sd15_model, lat, cap, guidance=g7)
    s0 = next(iter(inv0.replay.record.captures[1].features.values()))
    s7 = next(iter(inv7.replay.record.captures[1].features.values()))
    assert sorted(k[1] for k in s0.values) == [0, 0] and sorted(k[1] for k in s7.values) == [7, 7]  # (p, seed, S)
    pairs = [(s0.values[(p, 0, n)], s7.values[(p, 7, n)]) for p, _, n in s0.values]
    assert any(not torch.equal(a, b) for a, b in pairs), "the seed did not move the locations"
    results = _spy(zc, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="zerocon"):
        h.guided(zc, run, sd15_model, inv0, edit, guidance=g7)
    assert results[0].reference_mode == "resampled"
    assert "the guidance differs from the one DDIM Inversion recorded for" in caplog.text
