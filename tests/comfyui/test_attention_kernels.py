"""Fast attention kernels without a backward (flash, sage...): selected as ComfyUI's optimized attention (or
by a custom node's ``optimized_attention_override``), the guided sampler still works. Its gradient passes run
PyTorch SDPA; every pass without grad still runs the user's kernel.

The fake kernel computes exactly what SDPA computes, in a ``torch.autograd.Function`` whose backward raises,
and counts its calls by whether grad was enabled."""

from __future__ import annotations

import logging

import pytest
import robust_helpers as rh
import sampling_helpers as h
import tiny_models as tm
import torch

STEPS = 4


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, heads, kwargs):
        from comfy.ldm.modules import attention

        return attention.attention_pytorch.__wrapped__(q, k, v, heads, **kwargs)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("the fake fast kernel has no backward")


def _fake_kernel(calls: dict, name: str = "attention_fake_flash"):
    """A ComfyUI-style kernel (wrapped by ``wrap_attn`` like ComfyUI's own) with no backward."""
    from comfy.ldm.modules import attention

    def kernel(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kw):
        calls["grad" if torch.is_grad_enabled() else "no_grad"] += 1
        kw = {k_: v_ for k_, v_ in kw.items() if k_ not in ("transformer_options", "_inside_attn_wrapper")}
        options = dict(mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape)
        return _NoBackward.apply(q, k, v, heads, dict(options, skip_output_reshape=skip_output_reshape, **kw))

    kernel.__name__ = name
    return attention.wrap_attn(kernel)


def _edit(zc, run, model, guided=True):
    lat, cap, edit = tm.latent(30), tm.conditioning(31), tm.conditioning(32)
    g = h.guidance(zc, run) if guided else None
    _, inversion, _ = h.invert(zc, run, model, lat, cap, steps=STEPS, guidance=g)
    out, _ = h.guided(zc, run, model, inversion, edit, guidance=g, reference="resampled")
    return out["samples"]


@pytest.fixture
def reference_edit(zc, run):
    """The edit with ComfyUI's stock kernel (SDPA on this machine's CPU build)."""
    return _edit(zc, run, tm.sd15())


@pytest.fixture
def tolerance(zc, run, reference_edit):
    """How far another kernel's edit may land from the stock one: 1% of the guidance's own effect (its distance to
    the unguided edit). Float32 round-off differs between kernels and CPUs (2.5e-5 relative was seen), and the
    normalised guidance step carries it through the steps; an edit that lost its gradients lands ~100x further."""
    return 1e-2 * rh.rel(reference_edit, _edit(zc, run, tm.sd15(), guided=False))


def test_kernel_without_backward_selected_as_comfyui_attention(zc, run, monkeypatch, reference_edit, tolerance):
    from comfy.ldm.modules import attention

    calls = {"grad": 0, "no_grad": 0}
    fake = _fake_kernel(calls)
    monkeypatch.setattr(attention, "optimized_attention", fake)
    monkeypatch.setattr(attention, "optimized_attention_masked", fake)
    results = rh.spy_engine(monkeypatch, zc)
    model = tm.sd15()
    lat, cap, edit = tm.latent(30), tm.conditioning(31), tm.conditioning(32)
    stock_before = h.ksampler(model, edit, cap, lat)
    before = rh.snapshot(model)
    calls.update(grad=0, no_grad=0)

    out = _edit(zc, run, model)

    assert calls["grad"] == 0  # never in a gradient pass (its backward would raise)
    assert calls["no_grad"] > 0  # the reference, CFG and inversion passes keep the user's kernel
    assert all(not r.skipped for r in results)
    assert rh.rel(out, reference_edit) < tolerance  # the same edit as with the stock kernel
    rh.assert_untouched(model, before, stock_before, edit, cap, lat)


def test_override_that_ignores_the_kernel_it_is_given(zc, run, monkeypatch, reference_edit, tolerance, caplog):
    """A custom node's override that always calls its own kernel (as sage-attention patch nodes do): in the
    gradient passes its output has no gradient, so after its first gradient call those passes use SDPA; the others
    keep the override."""
    calls = {"grad": 0, "no_grad": 0}

    def own_kernel(q, k, v, heads, **kwargs):  # a compiled kernel with no autograd support: a detached output
        from comfy.ldm.modules import attention

        calls["grad" if torch.is_grad_enabled() else "no_grad"] += 1
        with torch.no_grad():
            return attention.attention_pytorch(q, k, v, heads, **kwargs)

    def sage_patch_override(func, *args, **kwargs):
        return own_kernel(*args, **kwargs)

    model = tm.sd15()
    model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = sage_patch_override
    results = rh.spy_engine(monkeypatch, zc)
    with caplog.at_level(logging.WARNING, logger="zerocon"):
        out = _edit(zc, run, model)
    assert calls["grad"] > 0 and calls["no_grad"] > 0  # the override ran in every pass
    assert rh.rel(out, reference_edit) < tolerance  # ... but the gradients came from SDPA
    assert all(not r.skipped for r in results)
    assert "sage_patch_override" in caplog.text and "carries no gradient" in caplog.text
