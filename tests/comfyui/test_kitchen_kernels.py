"""Ops without a backward in ComfyUI's model code (comfy-kitchen's RoPE and INT8 kernels from ComfyUI 0.33 on, custom
nodes' attention overrides), and Cancel inside a forward or a backward.

- A guided Flux edit runs on this ComfyUI's real Flux code (its gradient against finite differences:
  ``test_dit_capture.test_gradient_agrees_with_finite_differences``): on 0.33 its RoPE is a comfy-kitchen custom op without
  autograd, which the gradient passes must never run (``comfy.model_management.in_training`` set for them only, and
  restored after guided, interrupted and failed runs); the stock sampler is bit-identical afterwards.
- An attention override that ignores the kernel it is handed and returns a custom op's output (which requires grad
  but has no backward, like ComfyUI 0.33's "comfy kitchen attention") is bypassed in gradient passes only.
- An op without a backward that nothing routes around is a clear error before any backward runs.
- ComfyUI's interrupt is honoured at every attention call of a forward and of a backward.
"""

from __future__ import annotations

import logging

import comfy.model_management as mm
import pytest
import robust_helpers as rh
import sampling_helpers as h
import tiny_models as tm
import torch
from test_flow_families import _assert_untouched, _snapshot, _x0_energy

STEPS = 3
_OPS: dict = {}


def _opaque(name: str):
    """A ``torch.library.custom_op`` with no autograd formula computing ``fn``: what comfy-kitchen's ops are."""
    if name not in _OPS:

        @torch.library.custom_op(f"zerocon_test::{name}", mutates_args=())
        def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
            from comfy.ldm.modules import attention

            return attention.attention_pytorch.__wrapped__(q, k, v, heads).clone()

        @op.register_fake
        def _(q, k, v, heads):
            return torch.empty_like(q)

        _OPS[name] = op
    return _OPS[name]


def _has_kitchen() -> bool:
    import importlib.util

    return hasattr(mm, "in_training") and importlib.util.find_spec("comfy_kitchen") is not None


def _kitchen_rope():
    """comfy-kitchen's ops as ComfyUI's Flux code calls them (``comfy.quant_ops.ck``), or None without them."""
    if not _has_kitchen():
        return None
    import comfy.quant_ops

    return getattr(comfy.quant_ops, "ck", None)


def _spy_kitchen_rope(monkeypatch) -> list[tuple[bool, bool]]:
    """(grad enabled, in_training) at every comfy-kitchen RoPE call."""
    calls: list[tuple[bool, bool]] = []
    ck = _kitchen_rope()
    if ck is None:
        return calls
    for name in ("apply_rope", "apply_rope1"):
        real = getattr(ck, name)

        def spy(*args, _real=real, **kwargs):
            calls.append((torch.is_grad_enabled(), mm.in_training))
            return _real(*args, **kwargs)

        monkeypatch.setattr(ck, name, spy)
    return calls


def _flux_setup(zc, run):
    model = tm.flux()
    source, edit = tm.flow_conditioning(1), tm.flow_conditioning(2)
    lat = tm.flow_latent(7, size=8)
    _, inversion, _ = h.invert(zc, run, model, lat, source, steps=STEPS)
    return model, source, edit, lat, inversion


def test_guided_flux_never_backwards_through_kitchen_rope(zc, run, monkeypatch):
    model, source, edit, lat, inversion = _flux_setup(zc, run)
    reference = h.ksampler(model, edit, source, lat)
    before = _snapshot(model)
    calls = _spy_kitchen_rope(monkeypatch)
    (g,) = run(zc.guidance.ZeroConCrossAttentionGuidance, weight=0.5, layers="all", start=0.0, end=1.0)
    terms = (_x0_energy(zc),)

    out, _ = h.guided(zc, run, model, inversion, edit, cfg=1.0, guidance=g)
    energy, _ = h.guided(zc, run, model, inversion, edit, cfg=1.0, guidance=terms)
    plain, _ = h.guided(zc, run, model, inversion, edit, cfg=1.0)

    for result in (out, energy):
        assert torch.isfinite(result["samples"]).all()
        assert float((result["samples"] - plain["samples"]).abs().max()) > 1e-4  # the gradient moved the latent
    assert not any(grad and not training for grad, training in calls)  # kitchen RoPE never in a gradient pass
    if _has_kitchen():
        assert any(not grad for grad, _ in calls)  # ... but still in every pass without grad (the fast path)
        assert mm.in_training is False
    monkeypatch.undo()
    _assert_untouched(model, before, reference, edit, source, lat)


@pytest.mark.parametrize("how", ["interrupted", "failed"])
def test_switch_restored_after_interrupted_and_failed_runs(zc, run, monkeypatch, how):
    model, source, edit, lat, inversion = _flux_setup(zc, run)
    reference = h.ksampler(model, edit, source, lat)
    before = _snapshot(model)
    had = getattr(mm, "in_training", None)
    inside: list = []
    real_predict = zc.denoiser.ComfyDenoiser.predict

    def predict(self, x, *args, **kwargs):
        if torch.is_grad_enabled() and how == "interrupted":
            mm.interrupt_current_processing(True)  # Cancel pressed during the guidance forward
        out = real_predict(self, x, *args, **kwargs)
        inside.append(getattr(mm, "in_training", None))
        return out

    base = zc.guidance.GuidanceTerm

    class Fails(base):
        def loss(self, ctx, request):
            raise ValueError("a guidance term failed")

    monkeypatch.setattr(zc.denoiser.ComfyDenoiser, "predict", predict)
    expected = mm.InterruptProcessingException if how == "interrupted" else ValueError
    try:
        with pytest.raises(expected):
            term = _x0_energy(zc) if how == "interrupted" else Fails(weight=1.0)
            h.guided(zc, run, model, inversion, edit, cfg=1.0, guidance=(term,))
    finally:
        mm.interrupt_current_processing(False)
    monkeypatch.undo()
    assert getattr(mm, "in_training", None) == had
    _assert_untouched(model, before, reference, edit, source, lat)


# -- attention overrides and ops without a backward ---------------------------------------------------------------


def test_override_that_ignores_its_kernel_and_returns_a_custom_op_output(zc, run, monkeypatch, caplog):
    """As ComfyUI 0.33's ModelAttentionBackend "comfy kitchen attention": its output requires grad, its backward
    raises. Gradient passes bypass it; every other pass keeps it."""
    op = _opaque("int8_like_attention")
    calls = {"grad": 0, "no_grad": 0}

    def kitchen_override(func, q, k, v, heads, mask=None, **kwargs):
        assert mask is None and not kwargs.get("skip_reshape")
        calls["grad" if torch.is_grad_enabled() else "no_grad"] += 1
        return op(q, k, v, heads)

    reference = h.resampled_edit(zc, run, tm.sd15(), steps=4)
    unguided = h.resampled_edit(zc, run, tm.sd15(), with_guidance=False, steps=4)
    model = tm.sd15()
    model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = kitchen_override
    lat, cap, edit = tm.latent(30), tm.conditioning(31), tm.conditioning(32)
    stock_before = h.ksampler(model, edit, cap, lat)
    before = rh.snapshot(model)
    results = rh.spy_engine(monkeypatch, zc)
    calls.update(grad=0, no_grad=0)
    with caplog.at_level(logging.WARNING, logger="zerocon"):
        out = h.resampled_edit(zc, run, model, steps=4)
    assert calls["no_grad"] > 0 and calls["grad"] == 1  # detected at its first gradient call, then bypassed
    assert all(not r.skipped for r in results)
    # the same edit as the stock kernel's, far closer than the guidance's own effect (not an unguided edit)
    assert rh.rel(out, reference) < 1e-2 * rh.rel(reference, unguided)
    assert "kitchen_override" in caplog.text and "carries no gradient" in caplog.text
    monkeypatch.undo()
    rh.assert_untouched(model, before, stock_before, edit, cap, lat)


def test_op_without_backward_in_the_model_is_a_clear_error(zc, run):
    """An op with no backward that nothing routes around (here a user's patch) stops the run with our error, before
    any backward; the MODEL is left as it was."""
    op = _opaque("opaque_patch")

    def patch(n, extra_options):  # attn1_output_patch: the user's post-attention step, an opaque op
        return op(n, n, n, 1) * 0 + n

    model = tm.sd15()
    lat, cap, edit = tm.latent(30), tm.conditioning(31), tm.conditioning(32)
    _, inversion, _ = h.invert(zc, run, model, lat, cap, steps=3)
    model.set_model_attn1_output_patch(patch)
    stock_before = h.ksampler(model, edit, cap, lat)
    before = rh.snapshot(model)
    with pytest.raises(RuntimeError, match="opaque_patch.*no backward") as err:
        h.guided(zc, run, model, inversion, edit, guidance=h.guidance(zc, run))
    assert "Trying to backward" not in str(err.value)
    rh.assert_untouched(model, before, stock_before, edit, cap, lat)


# -- Cancel inside a forward and a backward ------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["forward", "backward", "no-grad forward"])
def test_cancel_takes_effect_at_the_next_attention_call(zc, run, where):
    """Cancel pressed inside one attention call stops the run at the next one, whatever the image size: in a guided
    forward, in its backward, and in a forward without grad (inversion)."""
    model = tm.sd15()
    lat, cap, edit = tm.latent(30), tm.conditioning(31), tm.conditioning(32)
    state = {"after": 0, "pressed": False}

    def press():
        state["pressed"] = True
        mm.interrupt_current_processing(True)

    def counting_override(func, *args, **kwargs):
        if state["pressed"]:
            state["after"] += 1
        grad = torch.is_grad_enabled()
        state[grad] = state.get(grad, 0) + 1
        out = func(*args, **kwargs)
        if where == "forward" and grad and state[grad] == 3:
            press()
        elif where == "backward" and out.requires_grad:
            out.register_hook(lambda grad: state.update(after=state["after"] + 1) if state["pressed"] else press())
        elif where == "no-grad forward" and not grad and state[grad] == 3:
            press()
        return out

    g = h.guidance(zc, run)
    model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = counting_override
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _, inversion, _ = h.invert(zc, run, model, lat, cap, steps=3)
            h.guided(zc, run, model, inversion, edit, guidance=g)
    finally:
        mm.interrupt_current_processing(False)
    assert state["pressed"]
    assert state["after"] == 0  # no further attention call (or, in a backward, no earlier attention layer) ran
    assert getattr(mm, "in_training", False) is False
