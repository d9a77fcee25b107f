"""ComfyUI's low-VRAM path: the MODEL partially loaded (``ModelPatcher.load`` with a small
``lowvram_model_memory``: the modules that do not fit are marked ``comfy_cast_weights`` and cast per layer by
``comfy.ops``, a LoRA is applied per layer by ``LowVramPatch`` weight functions), forced on the CPU by handing
``LoadedModel.model_load`` a budget of about a third of the tiny UNet (``robust_helpers.force_partial_load``).

A guided edit on the partially loaded MODEL equals the fully loaded one, with fp32 weights, with fp16 weights
cast to fp32 per layer, and with a LoRA; after it, a stock KSampler on the same MODEL is bit-identical to one
before, and no weight required grad in the gradient passes (``robust_helpers.spy_engine``)."""

from __future__ import annotations

import pytest
import robust_helpers as rh
import sampling_helpers as h
import tiny_models as tm
import torch

STEPS = 4
BUDGET = 1_500_000  # bytes of weights kept loaded: about a third of the tiny fp32 UNet (4.3 MB)


def _edit(zc, run, model):
    lat, cap, edit = tm.latent(30), tm.conditioning(31), tm.conditioning(32)
    g = h.guidance(zc, run)
    _, inversion, _ = h.invert(zc, run, model, lat, cap, steps=STEPS, regularize=True, guidance=g)
    out, _ = h.guided(zc, run, model, inversion, edit, guidance=g)
    return out["samples"]


def _partial_run(zc, run, monkeypatch, model, lora: bool = False):
    """The guided edit with ``model`` partially loaded; checks the partial path was really taken, also inside
    the gradient passes, and that the MODEL is left as it was."""
    lat, cap, edit = tm.latent(30), tm.conditioning(31), tm.conditioning(32)
    rh.force_partial_load(monkeypatch, BUDGET)
    stock_before = h.ksampler(model, edit, cap, lat)
    before = rh.snapshot(model)
    results = rh.spy_engine(monkeypatch, zc)
    seen = []
    real_predict = zc.denoiser.ComfyDenoiser.predict

    def predict(self, *args, **kwargs):
        if torch.is_grad_enabled():
            loaded = model.model.model_loaded_weight_memory
            seen.append((model.model.model_lowvram, loaded, rh.cast_modules(model)[0], rh.lowvram_patches(model)))
        return real_predict(self, *args, **kwargs)

    monkeypatch.setattr(zc.denoiser.ComfyDenoiser, "predict", predict)
    out = _edit(zc, run, model)
    assert seen, "no gradient pass ran"
    for lowvram, loaded, cast, patches in seen:
        assert lowvram and 0 < loaded <= BUDGET < model.model_size() and cast > 0  # partially loaded
        assert (patches > 0) == lora  # LoRA weights of the modules left out patched per layer
    assert all(not r.skipped for r in results) and torch.isfinite(out).all()
    rh.assert_untouched(model, before, stock_before, edit, cap, lat)
    assert model.model.model_lowvram  # the stock KSampler ran on the partially loaded MODEL too
    return out


@pytest.mark.parametrize(
    "weight_dtype, compute_dtype", [(torch.float32, None), (torch.float16, torch.float32)], ids=["fp32", "fp16-cast"]
)
def test_partially_loaded_model_gives_the_fully_loaded_edit(zc, run, monkeypatch, weight_dtype, compute_dtype):
    import comfy.model_management as mm

    mm.unload_all_models()
    full = _edit(zc, run, tm.sd15_as_loaded(weight_dtype, compute_dtype))
    partial = _partial_run(zc, run, monkeypatch, tm.sd15_as_loaded(weight_dtype, compute_dtype))
    assert torch.equal(partial, full)  # on one device the per-layer cast computes with the very same weights
    monkeypatch.undo()
    mm.unload_all_models()


def test_lora_on_a_partially_loaded_model(zc, run, monkeypatch, tmp_path):
    """The LoRA applied per layer (LowVramPatch) during the gradient passes gives the fully patched edit."""
    import comfy.model_management as mm

    mm.unload_all_models()
    base = tm.sd15_as_loaded(torch.float32)
    lora = rh.random_lora(base.model.diffusion_model.state_dict(), scale=0.3)
    full = _edit(zc, run, rh.load_lora(tmp_path / "a", base, lora, 0.8))
    mm.unload_all_models()
    model = rh.load_lora(tmp_path / "b", tm.sd15_as_loaded(torch.float32), lora, 0.8)
    partial = _partial_run(zc, run, monkeypatch, model, lora=True)
    without = _edit(zc, run, tm.sd15_as_loaded(torch.float32))
    assert rh.rel(partial, full) < 1e-5
    assert rh.rel(partial, without) > 0.1  # the per-layer LoRA was applied
    monkeypatch.undo()
    mm.unload_all_models()


@pytest.mark.parametrize(
    "weight_dtype, compute_dtype, partial",
    [(torch.float16, torch.float32, False), (torch.float32, None, True)],
    ids=["fp16-cast", "fp32-partial"],
)
def test_gradient_pass_does_not_keep_per_layer_cast_weights(zc, run, monkeypatch, weight_dtype, compute_dtype, partial):
    """Autograd would keep every per-layer cast weight for the backward (a copy of those weights on the device
    for the whole gradient pass); the autograd session recasts them in the backward instead. Each one replaced
    must rebuild exactly the tensor that was saved."""
    import comfy.model_management as mm

    mm.unload_all_models()
    if partial:
        rh.force_partial_load(monkeypatch, BUDGET)
    model = tm.sd15_as_loaded(weight_dtype, compute_dtype)
    resident = {p.untyped_storage().data_ptr() for p in model.model.parameters()}
    cast = zc.weights._CastWeights
    saved = {"recast": 0, "transient": 0, "resident": 0}
    real_pack = cast.pack

    def pack(self, t):
        packed = real_pack(self, t)
        size = t.numel() * t.element_size()
        if isinstance(packed, zc.weights._Recast):
            assert torch.equal(cast.unpack(packed), t)  # the backward gets the very values the forward used
            saved["recast"] += size
        elif not t.requires_grad:
            saved["resident" if t.untyped_storage().data_ptr() in resident else "transient"] += size
        return packed

    monkeypatch.setattr(cast, "pack", pack)
    passes = []
    real_predict = zc.denoiser.ComfyDenoiser.predict

    def predict(self, *args, **kwargs):
        passes.append(torch.is_grad_enabled())
        return real_predict(self, *args, **kwargs)

    monkeypatch.setattr(zc.denoiser.ComfyDenoiser, "predict", predict)
    out = _edit(zc, run, model)
    assert torch.isfinite(out).all()
    grad_passes = sum(passes)
    cast_weights = sum(  # the cast modules' weights in the compute dtype (float32 here)
        m.weight.numel() * 4
        for m in model.model.diffusion_model.modules()
        if getattr(m, "comfy_cast_weights", False) and isinstance(getattr(m, "weight", None), torch.Tensor)
    )
    # measured per gradient pass: fp16-cast 3.80 MB recast of 4.27 MB (biases are never saved), 0.32 MB of no-grad
    # activations kept; fp32-partial 2.32 of 2.78 MB recast, 0.32 MB kept, 1.48 MB of resident weights by reference
    assert grad_passes == STEPS and saved["recast"] / grad_passes > 0.75 * cast_weights
    assert saved["transient"] < 0.15 * saved["recast"]
    assert (saved["resident"] > 0) == partial
    monkeypatch.undo()
    mm.unload_all_models()


def test_flux_gradient_pass_recasts_cast_weights_inside_its_blocks(zc, run, monkeypatch):
    """Flux's blocks open their own saved-tensor hooks in gradient passes (copies of their in-place-updated inputs);
    those chain to the session's, so per-layer cast weights inside the blocks are recast in the backward too, not
    kept (PyTorch runs only the innermost hooks: without the chaining none of them would be)."""
    import comfy.model_management as mm

    mm.unload_all_models()
    model = tm.flux_dev(weight_dtype=torch.float16)
    net = model.model.diffusion_model
    cast = zc.weights._CastWeights
    recast = set()
    real_pack = cast.pack

    def pack(self, t):
        packed = real_pack(self, t)
        if isinstance(packed, zc.weights._Recast):
            recast.add(id(packed.module))
        return packed

    monkeypatch.setattr(cast, "pack", pack)
    source, edit = tm.flow_conditioning(1, guidance=3.5), tm.flow_conditioning(2, guidance=3.5)
    g = h.guidance(zc, run)
    _, inversion, _ = h.invert(zc, run, model, tm.flow_latent(3, size=8), source, steps=2, guidance=g)
    out, _ = h.guided(zc, run, model, inversion, edit, guidance=g, cfg=1.0)
    assert torch.isfinite(out["samples"]).all()
    names = {id(m): name for name, m in net.named_modules()}
    recast_names = {names[i] for i in recast if i in names}
    # the layers on the image tokens' path inside the blocks (their weights are saved for the latent's gradient)
    on_latent_path = {
        "double_blocks.0.img_attn.qkv",
        "double_blocks.0.img_mlp.0",
        "double_blocks.0.img_mlp.2",
        "single_blocks.0.linear1",
        "single_blocks.0.linear2",
    }
    assert on_latent_path <= recast_names, f"kept for the backward instead: {sorted(on_latent_path - recast_names)}"
    monkeypatch.undo()
    mm.unload_all_models()
