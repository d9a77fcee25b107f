"""ComfyUI 0.33's multi-GPU conditioning path (``model_options["multigpu_clones"]``, set by MultiGPU nodes) runs
its forwards under ``torch.no_grad``: the guidance passes take the single-device path, every other pass keeps it."""

from __future__ import annotations

import comfy.samplers
import pytest
import sampling_helpers as h
import tiny_models as tm
import torch


def test_guidance_passes_leave_the_multigpu_path(zc, run, monkeypatch):
    if not hasattr(comfy.samplers, "_calc_cond_batch_multigpu"):
        pytest.skip("this ComfyUI has no multi-GPU conditioning path")
    model = tm.sd15()
    lat, cap, edit = tm.latent(30), tm.conditioning(31), tm.conditioning(32)
    _, inversion, _ = h.invert(zc, run, model, lat, cap, steps=3)
    plain, _ = h.guided(zc, run, model, inversion, edit)
    guided, _ = h.guided(zc, run, model, inversion, edit, guidance=h.guidance(zc, run))
    calls = {"multigpu": 0}

    def single_device_standin(model_, conds, x_in, timestep, model_options):
        calls["multigpu"] += 1
        assert not torch.is_grad_enabled() or not x_in.requires_grad  # never asked for a gradient
        options = {k: v for k, v in model_options.items() if k != "multigpu_clones"}
        with torch.no_grad():  # as ComfyUI's multi-GPU path does
            return comfy.samplers._calc_cond_batch(model_, conds, x_in, timestep, options)

    monkeypatch.setattr(comfy.samplers, "_calc_cond_batch_multigpu", single_device_standin)
    clone = model.clone()
    clone.model_options["multigpu_clones"] = {torch.device("cpu"): clone}
    out, _ = h.guided(zc, run, clone, inversion, edit, guidance=h.guidance(zc, run))
    assert calls["multigpu"] > 0  # the passes without grad kept the multi-GPU path
    assert torch.allclose(out["samples"], guided["samples"], atol=1e-5, rtol=0)  # the same guided edit
    assert not torch.equal(out["samples"], plain["samples"])
