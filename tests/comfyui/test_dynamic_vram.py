"""Dynamic VRAM (ComfyUI's NVIDIA default from 0.33: ``ModelPatcherDynamic`` + comfy-aimdo), on a CPU.

ComfyUI builds a ``ModelPatcherDynamic`` only for a CUDA load device (on a CPU it returns a plain ModelPatcher), so
these tests set up exactly the parts of its state the pack meets, as ``ModelPatcherDynamic.load`` sets them, and run
the pack through ComfyUI's real code for the rest; ``bench/bench_dynamic_vram.py`` checks the whole on a GPU.

- every comfy.ops module casts per layer (``comfy_cast_weights``) and its weight Parameter carries the model dtype
  (``_model_dtype``), which ComfyUI reads back at every cast (``comfy.memory_management.tensors_to_geometries``):
  the marker must be on the weights the gradient passes see, here the model dtype fp16 of an fp32 checkpoint;
- quantized weights (comfy-kitchen ``QuantizedTensor`` Parameters) are dequantized per layer, never copied, and
  the edit is the one the dequantized weights give;
- each per-layer cast the backward redoes is released again (``uncast_bias_weight``: unpins the slot);
- the DiffuseIT decoder runs the VAE where and in the dtype ComfyUI's own VAE Decode does (``vae.device``,
  ``vae.vae_dtype``), not where its weights sit.
"""

from __future__ import annotations

import comfy.model_management as mm
import comfy.ops
import pytest
import robust_helpers as rh
import sampling_helpers as h
import tiny_models as tm
import torch

MODEL_DTYPE = torch.float16  # what Dynamic VRAM would compute an fp32 checkpoint in on a GPU


def _comfy_ops_modules(model):
    return [
        m
        for m in model.model.diffusion_model.modules()
        if hasattr(m, "comfy_cast_weights") and isinstance(m._parameters.get("weight"), torch.Tensor)
    ]


def _mark_as_dynamic(model) -> None:
    """What ``ModelPatcherDynamic.load`` leaves on a model: every comfy.ops module casts per layer, and each weight
    Parameter carries the model dtype as a Python attribute."""
    for m in _comfy_ops_modules(model):
        m.comfy_cast_weights = True
        m.weight._model_dtype = MODEL_DTYPE


def _geometry_dtype(weight: torch.Tensor):
    """The dtype ComfyUI casts this weight as (its own function where it has one)."""
    import importlib

    try:
        cmm = importlib.import_module("comfy.memory_management")
    except ImportError:  # ComfyUI before Dynamic VRAM: the marker itself
        return getattr(weight, "_model_dtype", weight.dtype)
    return cmm.tensors_to_geometries([weight])[0].dtype


def test_weight_markers_survive_the_gradient_pass(zc, run, monkeypatch):
    model = tm.sd15_as_loaded(torch.float32)
    _mark_as_dynamic(model)
    lat, cap, edit = tm.latent(30), tm.conditioning(31), tm.conditioning(32)
    stock_before = h.ksampler(model, edit, cap, lat)
    before = rh.snapshot(model)
    seen: list = []

    def patch(n, extra_options):  # inside every forward: the weights as ComfyUI's casts read them
        if torch.is_grad_enabled():
            seen.extend(_geometry_dtype(m.weight) for m in _comfy_ops_modules(model))
        return n

    model.set_model_attn1_output_patch(patch)
    h.resampled_edit(zc, run, model, steps=3)
    assert seen and set(seen) == {MODEL_DTYPE}  # not the file dtype: a cast would overrun its model-dtype slot
    model.model_options["transformer_options"]["patches"].pop("attn1_output_patch")
    before["options"]["transformer_options"].setdefault("patches", {})
    rh.assert_untouched(model, before, stock_before, edit, cap, lat)
    assert all(m.weight._model_dtype == MODEL_DTYPE for m in _comfy_ops_modules(model))


def _quantize(model, count: int = 6) -> list[str]:
    """The first ``count`` attention projection weights as fp8 ``QuantizedTensor`` Parameters (inference tensors, as
    ComfyUI's loader makes them), on per-layer cast modules; returns their names."""
    quant_ops = pytest.importorskip("comfy.quant_ops")
    if not getattr(quant_ops, "_CK_AVAILABLE", False):
        pytest.skip("this ComfyUI has no comfy-kitchen QuantizedTensor")
    names = []
    for name, m in model.model.diffusion_model.named_modules():
        if len(names) < count and name.endswith(("to_q", "to_k", "to_v")):
            with torch.inference_mode():
                q = quant_ops.QuantizedTensor.from_float(m.weight.detach().float(), "TensorCoreFP8Layout")
                m.weight = torch.nn.Parameter(q, requires_grad=False)
            m.comfy_cast_weights = True
            names.append(name)
    return names


def _dequantized_copy(model, names: list[str]):
    """The same model with those weights as plain float32 tensors holding the dequantized values."""
    copy = tm.sd15_as_loaded(torch.float32)
    modules = dict(model.model.diffusion_model.named_modules())
    for name, m in copy.model.diffusion_model.named_modules():
        if name in names:
            with torch.inference_mode():
                m.weight = torch.nn.Parameter(modules[name].weight.dequantize().float(), requires_grad=False)
    return copy


def test_quantized_weights_are_not_copied(zc, run, monkeypatch):
    model = tm.sd15_as_loaded(torch.float32)
    names = _quantize(model)
    reference = h.resampled_edit(zc, run, _dequantized_copy(model, names), steps=3)
    unguided = h.resampled_edit(zc, run, _dequantized_copy(model, names), with_guidance=False, steps=3)
    lat, cap, edit = tm.latent(30), tm.conditioning(31), tm.conditioning(32)
    stock_before = h.ksampler(model, edit, cap, lat)
    before = rh.snapshot(model)
    copied: list[str] = []
    real = zc.weights._normal_view

    def normal_view(t):
        copied.append(type(t).__name__)
        return real(t)

    monkeypatch.setattr(zc.weights, "_normal_view", normal_view)
    out = h.resampled_edit(zc, run, model, steps=3)
    assert "QuantizedTensor" not in copied and copied  # the plain weights are aliased, the quantized left alone
    assert rh.rel(out, reference) < 1e-2 * rh.rel(reference, unguided)  # the dequantized weights' edit
    monkeypatch.undo()
    rh.assert_untouched(model, before, stock_before, edit, cap, lat)


def test_backward_recasts_are_released(zc, run, monkeypatch):
    if not hasattr(comfy.ops, "uncast_bias_weight"):
        pytest.skip("this ComfyUI's casts hold nothing to release (no uncast_bias_weight)")
    rh.force_partial_load(monkeypatch, 60_000)
    model = tm.sd15_as_loaded(torch.float16, torch.float32)
    casts: list = []
    released: list = []
    real_cast, real_uncast = comfy.ops.cast_bias_weight, comfy.ops.uncast_bias_weight

    def cast(s, *args, **kwargs):
        out = real_cast(s, *args, **kwargs)
        if torch._C._current_autograd_node() is not None:  # a cast made while a backward runs: our recast
            casts.append(id(out[2]) if len(out) == 3 else None)
        return out

    def uncast(s, weight, bias, state):
        released.append(id(state))
        return real_uncast(s, weight, bias, state)

    monkeypatch.setattr(comfy.ops, "cast_bias_weight", cast)
    monkeypatch.setattr(comfy.ops, "uncast_bias_weight", uncast)
    h.resampled_edit(zc, run, model, steps=3)
    assert rh.cast_modules(model)[0] > 0  # the partial load left modules cast per layer
    assert casts and all(c is not None and c in released for c in casts)  # every recast in a backward was released


def test_diffuseit_decodes_where_comfyui_decodes(monkeypatch):
    """Weights left in the file dtype (fp32) while ComfyUI decodes in ``vae_dtype`` (bf16 here): the decoder feeds
    the VAE bf16 on ``vae.device``, as ComfyUI's own VAE Decode does, and gives its image."""
    import comfy.latent_formats
    import tiny_clip
    from conftest import pack_module

    dn = pack_module("nodes.classes.diffuseit_nodes")
    vae = tiny_clip.vae(0)
    for m in vae.first_stage_model.modules():
        if hasattr(m, "comfy_cast_weights"):
            m.comfy_cast_weights = True  # streamed per layer, as under Dynamic VRAM
    vae.vae_dtype = torch.bfloat16
    seen: list = []
    real = vae.first_stage_model.decode

    def decode(z, *args, **kwargs):
        seen.append((z.dtype, z.device))
        return real(z, *args, **kwargs)

    monkeypatch.setattr(vae.first_stage_model, "decode", decode)
    fmt = comfy.latent_formats.SD15()
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(False):
        image = dn.VAEDecoder(vae, fmt, "SD1.5")(fmt.process_in(latent))
    assert seen[-1] == (torch.bfloat16, torch.device(vae.device))
    with torch.inference_mode():
        comfy_image = vae.decode(latent).movedim(-1, 1).float()  # ComfyUI's own decode, clamped to [0, 1]
    assert seen[-1] == (torch.bfloat16, torch.device(vae.device))
    assert float((image.detach().clamp(0, 1) - comfy_image).abs().max()) < 1e-6


@pytest.fixture(autouse=True)
def _unload():
    yield
    mm.unload_all_models()


def test_inversion_and_sampler_agree_on_a_delegates_weights(zc):
    """With hooked conditioning, ComfyUI 0.33 samples a dynamic MODEL through a non-dynamic delegate whose model it
    caches on the MODEL (``non_dynamic_delegate_model``) and shares between guiders: the inversion's record and the
    sampler must name those weights the same way, so the "inverted" reference does not fall back."""
    import types

    key = zc.sampling.model_key
    shared = object()
    user = types.SimpleNamespace(model=object(), non_dynamic_delegate_model=(shared, None))
    delegate = types.SimpleNamespace(model=shared, non_dynamic_delegate_model=None)  # what a guider samples with
    plain = types.SimpleNamespace(model=shared)
    assert key(user) == key(delegate) == key(plain) == id(shared)
    assert key(types.SimpleNamespace(model=user.model, non_dynamic_delegate_model=None)) == id(user.model)
