"""Nothing is left behind on the user's MODEL: after a guided run, an interrupted run or a failing run, a stock
KSampler gives a bit-identical result, the weights are the very same (inference) tensors with unchanged
requires_grad flags, and the model options hold no patches. (The tensors autograd sees during a run never
require grad: ``test_autograd_weights_alias_and_restore``.)"""

from __future__ import annotations

import copy
import dataclasses

import comfy.model_management
import pytest
import robust_helpers as rh
import sampling_helpers as h
import tiny_models as tm
import torch


def _snapshot(model):
    tensors = rh.model_tensors(model)
    return {
        "tensors": tensors,
        "requires_grad": {name: t.requires_grad for name, t in tensors.items()},
        "options": copy.deepcopy(model.model_options),
        "patches": dict(model.patches),
        "object_patches": dict(model.object_patches),
        "wrappers": copy.copy(model.wrappers),
        "callbacks": copy.copy(model.callbacks),
    }


def _assert_untouched(model, before, reference_output, pos, neg, lat):
    after = _snapshot(model)
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, t in after["tensors"].items():
        assert t is before["tensors"][name], f"{name} was replaced"
        # loader-made parameters carry requires_grad=True (nn.Parameter's default; ComfyUI never clears it):
        # the run must not change the flag either way
        assert t.requires_grad == before["requires_grad"][name], f"{name}: requires_grad changed"
        assert t.is_inference(), f"{name} is no longer the loader's inference tensor"
    assert after["options"] == before["options"]
    tro = model.model_options.get("transformer_options", {})
    assert "patches_replace" not in tro and "patches" not in tro and "optimized_attention_override" not in tro
    assert after["patches"] == before["patches"] and after["object_patches"] == before["object_patches"]
    assert after["wrappers"] == before["wrappers"] and after["callbacks"] == before["callbacks"]
    assert torch.equal(h.ksampler(model, pos, neg, lat), reference_output)


def _setup(zc, run, model, pooled=False):
    lat, cap, edit = tm.latent(30), tm.conditioning(31, pooled=pooled), tm.conditioning(32, pooled=pooled)
    _, inversion, _ = h.invert(zc, run, model, lat, cap)
    reference = h.ksampler(model, edit, cap, lat)
    return lat, cap, edit, inversion, h.guidance(zc, run), reference


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_guided_run_leaves_the_model_as_it_was(zc, run, name):
    build, pooled = h.models()[name]
    model = build()
    lat, cap, edit, inversion, guidance, reference = _setup(zc, run, model, pooled)
    before = _snapshot(model)
    out, _ = h.guided(zc, run, model, inversion, edit, guidance=guidance, branches="both")
    assert torch.isfinite(out["samples"]).all()
    _assert_untouched(model, before, reference, edit, cap, lat)


def test_interrupt_mid_run_cleans_up(zc, run, sd15_model, monkeypatch):
    """Cancel pressed after step 1: ComfyUI's interrupt flag, honoured by the sampler before the next step."""
    lat, cap, edit, inversion, guidance, reference = _setup(zc, run, sd15_model)
    before = _snapshot(sd15_model)
    steps_seen = rh.interrupt_at_step(monkeypatch, zc, 1)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        h.guided(zc, run, sd15_model, inversion, edit, guidance=guidance)
    assert steps_seen == [0, 1]
    monkeypatch.undo()
    _assert_untouched(sd15_model, before, reference, edit, cap, lat)


def test_error_inside_a_gradient_pass_cleans_up(zc, run, sd15_model):
    """An exception raised while the backward graph is alive (inside a loss) must still restore everything."""
    GuidanceTerm = zc.guidance.GuidanceTerm
    CrossAttentionGuidance = zc.guidance.CrossAttentionGuidance

    @dataclasses.dataclass(frozen=True)
    class Exploding(CrossAttentionGuidance):
        def loss(self, ctx, request):
            value = super().loss(ctx, request)
            if ctx.step == 1:
                raise comfy.model_management.InterruptProcessingException()
            return value

    assert issubclass(Exploding, GuidanceTerm)
    lat, cap, edit, inversion, _, reference = _setup(zc, run, sd15_model)
    before = _snapshot(sd15_model)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        h.guided(zc, run, sd15_model, inversion, edit, guidance=(Exploding(weight=0.1),))
    _assert_untouched(sd15_model, before, reference, edit, cap, lat)


def test_autograd_weights_alias_and_restore(zc):
    """The weight swap is zero-copy (same storage) and puts the original objects back."""
    with torch.inference_mode():
        lin = torch.nn.Linear(3, 2)
        lin.register_buffer("scale", torch.ones(2))
    original_w, original_b = lin.weight, lin.bias
    with zc.weights.autograd_weights([lin]) as swapped:
        assert swapped == 3
        assert lin.weight is not original_w and not lin.weight.is_inference()
        assert lin.weight.data_ptr() == original_w.data_ptr()  # no copy
        assert not lin.weight.requires_grad
        x = torch.randn(4, 3, requires_grad=True)
        (g,) = torch.autograd.grad((lin(x) * lin.scale).sum(), x)
        assert torch.isfinite(g).all()
    assert lin.weight is original_w and lin.bias is original_b and lin.weight.is_inference()


def test_autograd_weights_detach_normal_parameters(zc):
    """Normal parameters flagged requires_grad get a detached alias for the run, and come back untouched."""
    lin = torch.nn.Linear(3, 2)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    w = lin.weight
    with zc.weights.autograd_weights([lin, frozen]) as swapped:
        assert swapped == 2  # lin.weight, lin.bias; frozen's plain tensors are usable as they are
        assert not lin.weight.requires_grad and lin.weight.data_ptr() == w.data_ptr()
        x = torch.randn(4, 3, requires_grad=True)
        y = frozen(lin(x)).sum()
        assert torch.autograd.grad(y, x)[0].shape == (4, 3)
    assert lin.weight is w and w.requires_grad and w.grad is None
