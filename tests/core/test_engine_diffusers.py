"""The engine on a diffusers UNet, checked against diffusers' own schedulers (float64, tiny random UNets).

The reference loops below use an untouched deep copy of the UNet (diffusers' attention processors) and
diffusers' ``DDIMScheduler`` / ``DDIMInverseScheduler``; the engine side uses ``DiffusersDenoiser``
(sigma space, our processors). Latents are compared in VP space: ``z = x * vp_scale(sigma)``.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from zerocon_core.denoiser import CaptureRequest, select_layers
from zerocon_core.denoiser_diffusers import DiffusersDenoiser, TextCond
from zerocon_core.inversion import ddim_invert
from zerocon_core.sampler import SamplerSettings, guided_ddim_sample
from zerocon_core.schedule import ddim_sigmas, sigma_from_alpha_bar, vp_scale

from .tiny import (
    sd_scheduler_config,
    single_thread,
    tiny_cond,
    tiny_denoiser,
    tiny_latent,
    tiny_sdxl_cond,
    tiny_sdxl_unet,
    tiny_unet,
)

PTYPES = {"eps": "epsilon", "v": "v_prediction"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module", params=["eps", "v"])
def pair(request):
    """(denoiser, untouched UNet copy, diffusers prediction_type) for an eps- and a v-prediction tiny model."""
    ptype = PTYPES[request.param]
    den, ref = tiny_denoiser(ptype, seed=0 if request.param == "eps" else 1, keep_copy=True)
    ref.requires_grad_(False)
    assert den.prediction_type == request.param
    return den, ref, ptype


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def f64(sched):
    """Give a diffusers DDIM(-inverse) scheduler float64 alpha tables, so both sides do float64 arithmetic
    on the same (float32-derived) alpha-bar values the denoiser's sigma table is built from."""
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    for attr in ("initial_alpha_cumprod", "final_alpha_cumprod"):
        if hasattr(sched, attr):
            setattr(sched, attr, torch.as_tensor(getattr(sched, attr)).double())
    return sched


# -- inversion ----------------------------------------------------------------------------------------------


def inverse_grid(inv: DDIMInverseScheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """How diffusers' inverse grid maps onto ours.

    ``DDIMInverseScheduler.step(out, t, z)`` moves ``z`` from alpha-bar level ``t - r`` (r = T // steps;
    ``initial_alpha_cumprod`` when ``t - r < 0``) up to level ``t``. With leading spacing and offset 1
    the timesteps are 1, 1 + r, ..., so the levels visited are
    ``[initial_alpha_cumprod, ab[1], ab[1 + r], ..., ab[1 + (steps-1) r]]``: steps + 1 sigmas, ascending.
    Returns (sigma grid, the source timestep of each step: where the "current" convention queries the model).
    """
    ts = inv.timesteps.tolist()
    r = inv.config.num_train_timesteps // inv.num_inference_steps
    levels = [inv.initial_alpha_cumprod] + [inv.alphas_cumprod[t] for t in ts]
    for k, t in enumerate(ts):  # step k goes from level k to level k + 1
        src = t - r
        assert (src < 0 and k == 0) or src == ts[k - 1]
    sources = [0] + ts[:-1]  # level 0 is ab[0] (set_alpha_to_one=False): timestep 0
    return sigma_from_alpha_bar(torch.stack(levels).double()), torch.tensor(sources)


@pytest.mark.parametrize("pair,steps", [("eps", 10), ("v", 10), ("eps", 50)], indirect=["pair"])
def test_inversion_next_matches_ddim_inverse_scheduler(pair, steps):
    """eval_at="next" is diffusers' DDIMInverseScheduler loop: the UNet sees the current VP latent with the
    *next* timestep. Exact for eps models; for v models diffusers converts v to eps with the *source* level's
    alpha while we use the level the model was queried at, so v is checked against explicit formulas."""
    den, ref, ptype = pair
    inv = f64(DDIMInverseScheduler.from_config(sd_scheduler_config(ptype)))
    inv.set_timesteps(steps)
    sigmas, _ = inverse_grid(inv)
    assert torch.equal(sigmas[1:], den.sigma_table[inv.timesteps])
    cond = tiny_cond(1)
    z0 = tiny_latent(0)

    z = z0.clone()
    with torch.no_grad():
        for k, t in enumerate(inv.timesteps):
            out = ref(z, t, encoder_hidden_states=cond.embeds).sample
            if ptype == "epsilon":
                z = inv.step(out, t, z).prev_sample
            else:  # v -> eps at the level the model was queried at (t), then the same DDIM update
                ab_q = inv.alphas_cumprod[t]
                eps = ab_q.sqrt() * out + (1 - ab_q).sqrt() * z
                ab_a = 1 / (1 + sigmas[k] ** 2)
                x0 = (z - (1 - ab_a).sqrt() * eps) / ab_a.sqrt()
                z = ab_q.sqrt() * x0 + (1 - ab_q).sqrt() * eps

    res = ddim_invert(den, z0 / vp_scale(sigmas[0]), sigmas, cond, eval_at="next")
    assert len(res.trajectory) == steps + 1
    assert rel_err(res.latent * vp_scale(sigmas[-1]), z) < 1e-5


def test_inversion_current_matches_ddim_inverse_scheduler(pair):
    """eval_at="current" is DDIMInverseScheduler's update with the UNet queried at the step's source level
    (the latent's own level), for eps and v alike: there diffusers' v conversion uses the queried level too."""
    den, ref, ptype = pair
    inv = f64(DDIMInverseScheduler.from_config(sd_scheduler_config(ptype)))
    inv.set_timesteps(10)
    sigmas, sources = inverse_grid(inv)
    cond = tiny_cond(1)
    z0 = tiny_latent(0)
    z = z0.clone()
    with torch.no_grad():
        for t, t_src in zip(inv.timesteps, sources):
            out = ref(z, t_src, encoder_hidden_states=cond.embeds).sample
            z = inv.step(out, t, z).prev_sample
    res = ddim_invert(den, z0 / vp_scale(sigmas[0]), sigmas, cond, eval_at="current")
    assert rel_err(res.latent * vp_scale(sigmas[-1]), z) < 1e-5


# -- sampling -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pair,cfg,steps",
    [("eps", 1.0, 10), ("eps", 5.0, 10), ("v", 1.0, 10), ("v", 5.0, 10), ("eps", 5.0, 50), ("v", 5.0, 30)],
    indirect=["pair"],
)
def test_sampling_matches_ddim_scheduler(pair, cfg, steps):
    """guided_ddim_sample without guidance terms is diffusers' DDIMScheduler (leading, offset 1, final
    alpha-bar ab[0]) with standard CFG ``uncond + cfg * (cond - uncond)`` on the model output."""
    den, ref, ptype = pair
    sch = f64(DDIMScheduler.from_config(sd_scheduler_config(ptype)))
    sch.set_timesteps(steps)
    sigmas = ddim_sigmas(den.sigma_table, steps)
    assert torch.equal(sigmas[:-1], den.sigma_table[sch.timesteps])
    assert float(sigmas[-1]) == float(sigma_from_alpha_bar(sch.final_alpha_cumprod))
    neg, pos, src = tiny_cond(7), tiny_cond(8), tiny_cond(9)
    z_t = tiny_latent(3)

    z = z_t.clone()
    emb = torch.cat([neg.embeds, pos.embeds])
    with torch.no_grad():
        for t in sch.timesteps:
            uncond, condo = ref(torch.cat([z, z]), t, encoder_hidden_states=emb).sample.chunk(2)
            z = sch.step(uncond + cfg * (condo - uncond), t, z).prev_sample

    res = guided_ddim_sample(
        den,
        z_t / vp_scale(sigmas[0]),
        sigmas,
        source_cond=src,
        edit_cond=pos,
        negative_cond=neg,
        settings=SamplerSettings(cfg=cfg),
    )
    assert res.reference is None and res.skipped == []
    assert rel_err(res.latent * vp_scale(sigmas[-1]), z) < 1e-5


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
