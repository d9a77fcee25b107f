"""LoRAs: a random LoRA file in ComfyUI's key format, loaded with the stock LoraLoader node, changes the guided
edit, and the edit equals the one made with a checkpoint whose weights have the LoRA merged in (merged
independently here, in float64: ``W + strength * alpha / rank * up @ down``).

Measured (fp32, 6 steps, CFG 5, cross-attention 0.1 + PatchNCE 0.05; relative L2 distance of the edits):
LoRA run vs merged checkpoint 1.1e-5 (float32 round-off of the two ways to add the same product, grown by six
guided steps; the stock KSampler: 1.7e-6); LoRA run vs no LoRA 0.89 (stock KSampler: 0.12). Tolerances: 1e-4
and 2e-5."""

from __future__ import annotations

import robust_helpers as rh
import sampling_helpers as h
import tiny_models as tm
import torch

STEPS = 6
STRENGTH = 0.8


def _edit(zc, run, model):
    lat, cap, edit = tm.latent(30), tm.conditioning(31), tm.conditioning(32)
    g = h.guidance(zc, run)
    _, inversion, _ = h.invert(zc, run, model, lat, cap, steps=STEPS, guidance=g)
    out, _ = h.guided(zc, run, model, inversion, edit, guidance=g)
    return out["samples"]


def test_lora_from_the_stock_loader_equals_the_merged_checkpoint(zc, run, monkeypatch, tmp_path):
    import comfy.model_management as mm

    mm.unload_all_models()
    base = tm.sd15_as_loaded(torch.float32)
    unet = {k: v.clone() for k, v in base.model.diffusion_model.state_dict().items()}
    lora = rh.random_lora(unet, scale=0.3)
    model = rh.load_lora(tmp_path, base, lora, STRENGTH)
    assert len(model.patches) == len(rh.LORA_TARGETS)  # every key was mapped, the diffusers-named one too
    merged = tm.sd15_as_loaded(torch.float32, state_dict=rh.merge_lora(unet, lora, STRENGTH))

    lat, cap, edit = tm.latent(30), tm.conditioning(31), tm.conditioning(32)
    stock_lora = h.ksampler(model, edit, cap, lat)
    stock_base = h.ksampler(base, edit, cap, lat)
    results = rh.spy_engine(monkeypatch, zc)

    with_lora = _edit(zc, run, model)
    stock_again = h.ksampler(model, edit, cap, lat)  # the LoRA is patched in again: snapshot that state
    before = rh.snapshot(model)
    with_lora_again = _edit(zc, run, model)
    rh.assert_untouched(model, before, stock_lora, edit, cap, lat)
    assert torch.equal(stock_again, stock_lora)
    without = _edit(zc, run, base)
    assert torch.equal(h.ksampler(base, edit, cap, lat), stock_base)  # the LoRA left the base MODEL alone
    from_merged = _edit(zc, run, merged)

    assert all(not r.skipped for r in results)
    assert torch.equal(with_lora, with_lora_again)
    assert rh.rel(with_lora, from_merged) < 1e-4
    assert rh.rel(with_lora, without) > 0.1  # the LoRA changes the edit, far beyond the round-off above
    assert rh.rel(stock_lora, h.ksampler(merged, edit, cap, lat)) < 2e-5  # the same merge, checked on ComfyUI's own
