"""``DiffusersDenoiser`` (zerocon_core.diffusers_host.denoiser) on tiny random UNets, against the UNet itself.

The reference side is an untouched deep copy of the UNet (diffusers' attention processors); the engine side
uses ``DiffusersDenoiser`` (sigma space, our processors). Latents are compared in VP space:
``z = x * vp_scale(sigma)``.
"""

from __future__ import annotations

import pytest
import torch

from zerocon_core.diffusers_host.denoiser import DiffusersDenoiser, TextCond
from zerocon_core.method.denoiser import CaptureRequest, select_layers
from zerocon_core.method.schedule import vp_scale

from .tiny import (
    rel_err,
    sd_scheduler_config,
    tiny_cond,
    tiny_denoiser,
    tiny_latent,
    tiny_sdxl_cond,
    tiny_sdxl_unet,
    tiny_unet,
)

# -- the denoiser itself -------------------------------------------------------------------------------------


def test_predict_matches_unet_and_batches_conds(pair):
    """One batched forward for several conds equals separate UNet calls; eps/v conversion is right."""
    den, ref, ptype = pair
    x = tiny_latent(0, batch=2)
    t = 421
    s = den.sigma_table[t]
    conds = [tiny_cond(1), tiny_cond(2, batch=2)]
    preds = den.predict(x, s, conds)
    z = x * vp_scale(s)
    ab = 1 / (1 + s**2)
    with torch.no_grad():
        for c, p in zip(conds, preds):
            out = ref(z, t, encoder_hidden_states=c.embeds.expand(2, -1, -1)).sample
            eps = out if ptype == "epsilon" else ab.sqrt() * out + (1 - ab).sqrt() * z
            assert p.eps.shape == x.shape and p.probs == {} and p.features == {}
            assert rel_err(p.eps, eps) < 1e-10


def test_conds_of_different_lengths_run_separately():
    den = tiny_denoiser()
    x = tiny_latent(0)
    s = den.sigma_table[300]
    short, long = tiny_cond(1, tokens=5), tiny_cond(2, tokens=11)
    both = den.predict(x, s, [short, long])
    assert torch.allclose(both[0].eps, den.predict(x, s, [short])[0].eps, rtol=0, atol=1e-12)
    assert torch.allclose(both[1].eps, den.predict(x, s, [long])[0].eps, rtol=0, atol=1e-12)


def test_sdxl_added_cond_kwargs():
    unet = tiny_sdxl_unet()
    den = DiffusersDenoiser(unet, scheduler_config=sd_scheduler_config())
    x = tiny_latent(0, batch=2)
    s = den.sigma_table[500]
    c1, c2 = tiny_sdxl_cond(1), tiny_sdxl_cond(2)
    both = den.predict(x, s, [c1, c2])
    for c, p in zip((c1, c2), both):
        (alone,) = den.predict(x, s, [c])
        assert torch.allclose(p.eps, alone.eps, rtol=0, atol=1e-12)
    assert not torch.allclose(both[0].eps, both[1].eps)
    levels = {(i.block, i.level) for i in den.layers()}
    assert levels == {("down", 0), ("down", 1), ("mid", 1), ("up", 1), ("up", 0)}


def test_layers_and_levels():
    den = tiny_denoiser()
    infos = den.layers()
    assert [i.block for i in infos] == sorted((i.block for i in infos), key=["down", "mid", "up"].index)
    cross = [i for i in infos if i.kind == "cross"]
    assert len(cross) == len([i for i in infos if i.kind == "self"]) == 7  # 1 + 1 down, 1 mid, 2 + 2 up
    assert all(i.name.endswith("attn2") for i in cross)
    by = {(i.block, i.level) for i in cross}
    assert by == {("down", 0), ("down", 1), ("mid", 1), ("up", 1), ("up", 0)}
    assert len(select_layers(infos, "self", ("up",), (0,))) == 2


def test_capture_matches_recomputation_from_q_and_k():
    """Captured probabilities equal softmax(q k^T * scale) per head from the layer's own to_q/to_k outputs;
    features equal the to_out output reshaped to (B, C, H, W); capture changes nothing else."""
    den = tiny_denoiser()
    unet = den.unet
    x = tiny_latent(0, batch=2).requires_grad_(True)
    s = den.sigma_table[700]
    conds = [tiny_cond(1), tiny_cond(2)]
    cross = {i.name: i for i in den.layers() if i.kind == "cross"}
    names = [n for n in cross if n.startswith(("down_blocks.0", "up_blocks.0", "mid_block"))]
    feat = [i.name for i in den.layers() if i.kind == "self" and i.block == "up"]
    seen: dict[str, dict[str, torch.Tensor]] = {}
    hooks = []
    for n in names + feat:
        mod = unet.get_submodule(n)
        for part in ("to_q", "to_k"):
            hooks.append(
                getattr(mod, part).register_forward_hook(
                    lambda m, i, o, n=n, part=part: seen.setdefault(n, {}).__setitem__(part, o)
                )
            )
        hooks.append(
            mod.to_out[0].register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, {}).__setitem__("out", o))
        )
    try:
        req = CaptureRequest(probs=frozenset(names), features=frozenset(feat))
        preds = den.predict(x, s, conds, req)
    finally:
        for h in hooks:
            h.remove()
    plain = den.predict(x, s, conds)
    for p, q in zip(preds, plain):
        assert torch.allclose(p.eps, q.eps, rtol=0, atol=1e-12)
        assert set(p.probs) == set(names) and set(p.features) == set(feat)
    for n in names:
        mod = unet.get_submodule(n)
        heads = mod.heads
        q, k = seen[n]["to_q"], seen[n]["to_k"]  # (2B, HW, inner), (2B, T, inner)
        d = q.shape[-1] // heads
        qh = q.view(q.shape[0], -1, heads, d).transpose(1, 2)
        kh = k.view(k.shape[0], -1, heads, d).transpose(1, 2)
        expect = torch.softmax(qh @ kh.transpose(-1, -2) / d**0.5, dim=-1)
        got = torch.cat([preds[0].probs[n], preds[1].probs[n]])
        assert got.shape == (4, heads, q.shape[1], 8)
        assert torch.allclose(got, expect, rtol=0, atol=1e-12)
        assert torch.allclose(got.sum(-1), torch.ones(()).double())
    for n in feat:
        out = seen[n]["out"]  # (2B, HW, C)
        got = torch.cat([preds[0].features[n], preds[1].features[n]])
        b, c, h, w = got.shape
        assert h * w == out.shape[1] and c == out.shape[2]
        assert torch.allclose(got.flatten(2).transpose(1, 2), out, rtol=0, atol=1e-12)
    # the captures keep their graph to x; nothing is retained in the denoiser; weights never require grad
    (g,) = torch.autograd.grad(preds[1].probs[names[0]].pow(2).sum() + preds[0].features[feat[0]].sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert den._state.probs == {} and den._state.features == {}
    assert not any(p.requires_grad for p in unet.parameters())


def test_capture_unknown_layer_is_an_error():
    den = tiny_denoiser()
    with pytest.raises(ValueError, match="not captured"):
        den.predict(tiny_latent(0), den.sigma_table[10], [tiny_cond(1)], CaptureRequest(probs=frozenset({"nope"})))


def test_timestep_and_construction():
    den = tiny_denoiser()
    for t in (0, 1, 21, 500, 981, 999):
        assert den.timestep(den.sigma_table[t]) == t
        assert den.timestep(den.sigma_table[t].float()) == t  # float32 copies of table sigmas snap
    mid = den.timestep((den.sigma_table[100] * den.sigma_table[101]).sqrt())
    assert mid == pytest.approx(100.5, abs=1e-6)
    assert den.autograd_session() is not None
    with pytest.raises(ValueError, match="prediction type"):
        DiffusersDenoiser(tiny_unet(), prediction_type="sample")
    with pytest.raises(TypeError, match="TextCond"):
        den.predict(tiny_latent(0), den.sigma_table[10], [tiny_cond(1).embeds])
    default = DiffusersDenoiser(tiny_unet())  # SD's schedule when none is given
    assert torch.allclose(default.sigma_table, den.sigma_table, rtol=1e-4)  # float64 vs float32 cumprod
    assert default.prediction_type == "eps"


def test_close_restores_processors():
    unet = tiny_unet()
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    den = DiffusersDenoiser(unet)
    assert all(type(v).__name__ == "_ZeroConAttnProcessor" for v in unet.attn_processors.values())
    den.close()
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


def test_float32_model_close_to_float64():
    den64 = tiny_denoiser()
    den32 = tiny_denoiser(dtype=torch.float32)
    x = tiny_latent(0)
    c = tiny_cond(1)
    s = den64.sigma_table[600]
    e64 = den64.predict(x, s, [c])[0].eps
    e32 = den32.predict(x.float(), s.float(), [TextCond(c.embeds.float())])[0].eps
    assert e32.dtype == torch.float32
    assert rel_err(e32.double(), e64) < 1e-4
