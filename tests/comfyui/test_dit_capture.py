"""Captures on MM-DiT joint attention (nodes/glue/dit_capture.py) through ComfyDenoiser on tiny Flux / SD3 models:
probabilities against an independent float64 recomputation from the block's weights (RoPE from the token
positions), chunking, gradients (gradcheck, finite differences through the model), guided steps, the user's
kernel and block patches, and a model left as it was."""

from __future__ import annotations

import copy
import math

import comfy.model_management
import dit_helpers as dh
import pytest
import sampling_helpers as h
import tiny_models as tm
import torch
import torch.nn.functional as F
from conftest import pack_module
from dit_helpers import _den, _inside_sampler, _recording_patch, _sigmas

dc = pack_module("nodes.glue.dit_capture")
core_den = pack_module("zerocon_core.method.denoiser")
guidance = pack_module("zerocon_core.method.guidance")
CR = core_den.CaptureRequest


def _sharp(model):
    """Flux's QK-norm scales as a trained model has them (about 1; tiny_models draws them near 0, which makes
    every attention map uniform and would let a missing RoPE or a wrong normaliser pass unnoticed)."""
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for module_name, module in model.model.diffusion_model.named_modules():
            if module_name.endswith(("query_norm", "key_norm")):
                p = _qk_norm(module)[0]
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
    return model


def _qk_norm(norm) -> tuple[torch.Tensor, float]:
    """(scale, eps) of a Flux QK-norm: ComfyUI's own RMSNorm (``.scale``, eps 1e-6) in older versions,
    ``operations.RMSNorm`` (a ``torch.nn.RMSNorm``: ``.weight``, ``.eps``, None for the float32 epsilon the
    blocks compute in) in newer ones."""
    if hasattr(norm, "scale"):
        return norm.scale, 1e-6
    eps = norm.eps
    return norm.weight, torch.finfo(torch.float32).eps if eps is None else eps


def flux(seed=3):
    return _sharp(tm.flux(seed))


def flux_dev(seed=4):
    return _sharp(tm.flux_dev(seed))


_SD3_CONFIG = {
    "in_channels": 16,
    "pos_embed_scaling_factor": None,
    "patch_size": 2,
    "depth": 2,
    "num_patches": 64 * 64,
    "pos_embed_max_size": 64,
    "adm_in_channels": tm.POOLED_DIM,
    "context_embedder_config": {
        "target": "torch.nn.Linear",
        "params": {"in_features": tm.CONTEXT_DIM, "out_features": 128},
    },
    "dtype": torch.float32,
}


def flux_dev_two_singles():
    """A Flux-dev-like model (a clone) with two single blocks: the second adds to the first one's output in place."""
    import comfy.supported_models

    config = comfy.supported_models.Flux({**tm._flux_config(True), "depth_single_blocks": 2})
    return _sharp(tm._dit_patcher(config, 4)).clone()


def sd3(seed=5, depth=2):
    """tiny_models.sd3 with its ``pos_embed`` buffer filled (it is left uninitialised: NaNs now and then)."""
    model = tm.sd3(seed, depth)
    with torch.inference_mode():
        pe = model.model.diffusion_model.pos_embed
        pe.copy_(0.1 * torch.randn(pe.shape, generator=torch.Generator().manual_seed(seed)))
    return model


def _all(layers, kind):
    return frozenset(i.name for i in layers if i.kind == kind)


# -- layer table -------------------------------------------------------------------------------------------


def test_layer_tables_and_defaults(zc):
    def body(guider, x, sigmas, extra_args):
        den = _den(zc, guider, extra_args)
        return den.layers(), den.dit_type, den.prediction_type

    layers, kind, pred = _inside_sampler(flux(), {"positive": tm.flow_conditioning(1)}, body)
    assert kind == "flux" and pred == "flow"
    assert [(i.name, i.kind, i.block, i.level) for i in layers] == [
        ("double.0.img2txt", "cross", "double", 0),
        ("double.0.img", "self", "double", 0),
        ("single.0.img2txt", "cross", "single", 0),
        ("single.0.img", "self", "single", 0),
    ]
    # the term nodes' UNet defaults ("all", "up") resolve to the family defaults on a DiT
    assert guidance.CrossAttentionGuidance().request(layers).probs == {"double.0.img2txt"}
    assert guidance.PatchNCEGuidance().request(layers).features == {"single.0.img"}
    assert guidance.CrossAttentionGuidance(layers="single:0").request(layers).probs == {"single.0.img2txt"}
    layers, kind, _ = _inside_sampler(sd3(depth=3), {"positive": tm.flow_conditioning(1)}, body)
    assert kind == "mmdit" and [i.name for i in layers if i.kind == "cross"] == [f"joint.{i}.img2txt" for i in range(3)]
    assert guidance.CrossAttentionGuidance(layers="auto").request(layers).probs == {
        "joint.1.img2txt",
        "joint.2.img2txt",
    }


# -- an independent float64 recomputation -------------------------------------------------------------------


def _rope_angles(ids: torch.Tensor, axes_dim, theta) -> torch.Tensor:
    """(L, d/2) rotation angles of Flux's RoPE from the token positions (float64)."""
    parts = []
    for axis, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        parts.append(ids[:, axis, None].double() * omega)
    return torch.cat(parts, -1)


def _rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    a, b = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos(), angles.sin()
    return torch.stack((cos * a - sin * b, sin * a + cos * b), -1).flatten(-2)


def _rms(x, norm):
    scale, eps = _qk_norm(norm)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale.double()


def _lin(x, lin):
    return F.linear(x, lin.weight.double(), None if lin.bias is None else lin.bias.double())


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _heads(qkv, heads):
    b, n, _ = qkv.shape
    q, k, _ = qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return q, k


def _flux_qk(block, args, single: bool):
    """q, k (B, H, L, d) of a Flux block in float64 from its weights, before RoPE."""
    vec = args["vec"].double()
    mods = _lin(F.silu(vec), (block.modulation if single else block.img_mod).lin)[:, None]
    if single:
        shift, scale = mods.chunk(3, -1)[:2]
        x = args["img"].double()
        qkv = _lin(_ln(x) * (1 + scale) + shift, block.linear1)[..., : 3 * block.hidden_size]
        q, k = _heads(qkv, block.num_heads)
        return _rms(q, block.norm.query_norm), _rms(k, block.norm.key_norm)
    out = []
    for x, mod, attn in (
        (args["txt"].double(), block.txt_mod, block.txt_attn),
        (args["img"].double(), block.img_mod, block.img_attn),
    ):
        shift, scale = _lin(F.silu(vec), mod.lin)[:, None].chunk(6, -1)[:2]
        q, k = _heads(_lin(_ln(x) * (1 + scale) + shift, attn.qkv), block.num_heads)
        out.append((_rms(q, attn.norm.query_norm), _rms(k, attn.norm.key_norm)))
    return torch.cat((out[0][0], out[1][0]), 2), torch.cat((out[0][1], out[1][1]), 2)


def _first_blocks_probabilities(dm, seen, angles, qk=_flux_qk, mask=None):
    """(name, single, probabilities) of the first double and single block: the float64 softmax over all keys of
    (RoPE q)(RoPE k)^T (+ ``mask``), q and k from ``qk(block, recorded arguments, single)``."""
    out = []
    for name, single in (("double", False), ("single", True)):
        block = (dm.single_blocks if single else dm.double_blocks)[0]
        q, k = qk(block, seen[name], single)
        q, k = _rotate(q, angles), _rotate(k, angles)
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        out.append((name, single, (s if mask is None else s + mask).softmax(-1)))
    return out


def test_flux_probabilities_equal_a_float64_recomputation_with_rope(zc):
    """Captured double- and single-block maps = softmax over all keys of (RoPE q)(RoPE k)^T, recomputed in
    float64 from the blocks' weights and the token positions; image rows x text columns; rows sum < 1."""
    model = flux_dev_two_singles()
    dm = model.model.diffusion_model
    tokens = 12
    cond = tm.flow_conditioning(2, tokens=tokens, guidance=3.5)
    pred, seen = dh.first_blocks_captured(zc, model, cond, features=lambda layers: _all(layers, "self"))
    grid = 8  # 16 x 16 latent, 2 x 2 patches
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    ids = torch.cat(
        (torch.zeros(tokens, 3), torch.stack((torch.zeros(grid * grid), rows.flatten(), cols.flatten()), -1))
    )
    angles = _rope_angles(ids, dm.params.axes_dim, dm.params.theta)
    for name, single, p in _first_blocks_probabilities(dm, seen, angles):
        expect = p[:, :, tokens:, :tokens]
        got = pred.probs[f"{name}.0.img2txt"]
        assert got.shape == (1, dm.num_heads, grid * grid, tokens) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expect, rtol=1e-4, atol=1e-6)
        share = got.sum(-1)
        assert (share < 1).all() and (share > 0).all()
        torch.testing.assert_close(share.double(), p[:, :, tokens:, :tokens].sum(-1), rtol=1e-4, atol=1e-6)
        # the block's image-token output on the patch grid (a single block's output also holds the text tokens)
        img = seen[name]["out"][:, tokens:] if single else seen[name]["out"]
        expect = img.transpose(1, 2).reshape(1, -1, grid, grid)
        assert torch.equal(pred.features[f"{name}.0.img"], expect)
        assert torch.equal(pred.features[f"{name}.0.img"][0, :, 2, 5], img[0, 2 * grid + 5])


def _sd3_qk(block, args):
    """q, k (B, H, L, d) of an SD3 joint block (context first) in float64 from its weights."""
    c = args["vec"].double()
    out = []
    for x, part in ((args["txt"].double(), block.context_block), (args["img"].double(), block.x_block)):
        mods = _lin(F.silu(c), part.adaLN_modulation[1])
        shift, scale = mods.chunk(mods.shape[-1] // x.shape[-1], -1)[:2]  # 2, 6 or 9 modulations
        qkv = _lin(_ln(x) * (1 + scale[:, None]) + shift[:, None], part.attn.qkv)
        out.append(_heads(qkv, part.attn.num_heads))
    return torch.cat((out[0][0], out[1][0]), 2), torch.cat((out[0][1], out[1][1]), 2)


@pytest.mark.parametrize("extra_attention", [False, True], ids=["sd3", "sd35-medium-like"])
def test_sd3_probabilities_equal_a_float64_recomputation(zc, extra_attention):
    """SD3 joint block; with SD3.5-medium's extra image-only attention in the block the maps still come from
    the joint attention (the first call), and the features are the block's image output."""
    model = sd3(depth=2)
    if extra_attention:
        import comfy.supported_models

        config = comfy.supported_models.SD3({**_SD3_CONFIG, "x_block_self_attn_layers": [1]})
        model = tm._dit_patcher(config, 5)
        with torch.inference_mode():
            model.model.diffusion_model.pos_embed.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
        assert model.model.diffusion_model.joint_blocks[1].x_block.x_block_self_attn
    model = model.clone()
    seen = {}
    model.set_model_patch_replace(_recording_patch(seen, 1), "dit", "double_block", 1)
    tokens = 10

    def body(guider, x, sigmas, extra_args):
        den = _den(zc, guider, extra_args)
        req = CR(probs=frozenset({"joint.1.img2txt"}), features=frozenset({"joint.1.img"}))
        return den.predict(x, sigmas[0], [guider.conds["positive"]], req)[0]

    pred = _inside_sampler(model, {"positive": tm.flow_conditioning(3, tokens=tokens)}, body)
    q, k = _sd3_qk(model.model.diffusion_model.joint_blocks[1], seen[1])
    p = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
    torch.testing.assert_close(pred.probs["joint.1.img2txt"].double(), p[:, :, tokens:, :tokens], rtol=1e-4, atol=1e-6)
    assert torch.equal(pred.features["joint.1.img"], seen[1]["out"].transpose(1, 2).reshape(1, -1, 8, 8))


# -- the chunked autograd function --------------------------------------------------------------------------


def _dense(q, k, image, text, mask=None):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s + mask
    return s.softmax(-1)[:, :, image, text]


@pytest.mark.parametrize("chunk", [(3, 4), (5, 1000), (1000, 7)], ids=["both", "queries", "keys"])
def test_text_probabilities_chunks_mask_and_gradcheck(chunk):
    """Chunked forward = dense softmax (float64, with an additive mask); gradients pass gradcheck (float64)
    and match the dense float64 gradient from float32 inputs."""
    gen = torch.Generator().manual_seed(0)
    b, heads, length, d = 2, 2, 17, 4
    q = torch.randn(b, heads, length, d, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, heads, length, d, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(length, length, generator=gen, dtype=torch.float64)
    image, text = slice(6, 15), slice(2, 6)
    ch = dc.Chunking(*chunk)
    got = dc.text_probabilities(q, k, image, text, mask, ch)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _dense(q, k, image, text, mask), rtol=1e-10, atol=1e-12)

    torch.autograd.gradcheck(
        lambda q, k: dc.TextProbabilities.apply(q[:, :, image], k, mask[image], text, d**-0.5, ch), (q, k)
    )
    # float32 (the model's case): the analytic gradient against the dense float64 one
    w = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    q32, k32 = (t.detach().float().requires_grad_(True) for t in (q, k))
    ga = torch.autograd.grad(
        (dc.text_probabilities(q32, k32, image, text, mask.float(), ch).double() * w).sum(), (q32, k32)
    )
    gd = torch.autograd.grad((_dense(q, k, image, text, mask) * w).sum(), (q, k))
    for a, e in zip(ga, gd):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5)


def test_text_probabilities_boolean_mask():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 1, 3, 9, 4, generator=gen)
    keep = torch.rand(9, 9, generator=gen) > 0.3
    keep.fill_diagonal_(True)
    got = dc.text_probabilities(q, k, slice(4, 9), slice(0, 4), keep, dc.Chunking(2, 3))
    additive = torch.zeros(9, 9).masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(got, _dense(q, k, slice(4, 9), slice(0, 4), additive), rtol=1e-5, atol=1e-6)


def test_bad_chunk_sizes():
    with pytest.raises(ValueError, match="chunk sizes must be >= 1"):
        dc.Chunking(0, 4)


# -- through the model -----------------------------------------------------------------------------------------


def _structure(value):
    """Nested dicts' keys, with the identity of every other value."""
    if isinstance(value, dict):
        return {k: _structure(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_structure(v) for v in value]
    return id(value)


@pytest.mark.parametrize("build", [flux, sd3], ids=["flux", "sd3"])
def test_chunked_equals_unchunked_and_rows_split_per_conditioning(zc, build):
    """Tiny chunks give the full-chunk maps; a batched pair of conds gives each cond its own maps/features."""

    def body(guider, x, sigmas, extra_args):
        den = _den(zc, guider, extra_args)
        layers = den.layers()
        req = CR(probs=_all(layers, "cross"), features=_all(layers, "self"))
        conds = [guider.conds["positive"], guider.conds["negative"]]
        options = extra_args["model_options"]
        before = _structure(options)
        plain = den.predict(x, sigmas[0], conds)
        whole = den.predict(x, sigmas[0], conds, req)
        den.chunking = dc.Chunking(5, 7)
        small = den.predict(x, sigmas[0], conds, req)
        alone = den.predict(x, sigmas[0], conds[1:], req)
        with den.autograd_session(), torch.enable_grad():  # a grad pass installs the Flux block patches too
            den.predict(x.clone().requires_grad_(True), sigmas[0].clone(), conds[:1], req)
        assert _structure(options) == before  # patches go on per-call copies only
        return plain, whole, small, alone

    conds = {"positive": tm.flow_conditioning(4, tokens=9), "negative": tm.flow_conditioning(5, tokens=9)}
    plain, whole, small, alone = _inside_sampler(build(), conds, body)
    for p, w, s in zip(plain, whole, small):
        assert torch.equal(p.eps, w.eps)  # capturing changes nothing in the prediction
        for name in w.probs:
            torch.testing.assert_close(s.probs[name], w.probs[name], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(whole[0].probs[next(iter(whole[0].probs))], whole[1].probs[next(iter(whole[0].probs))])
    for name in alone[0].probs:
        torch.testing.assert_close(whole[1].probs[name], alone[0].probs[name], rtol=1e-5, atol=1e-6)
    for name in alone[0].features:
        assert whole[1].features[name].shape[-2:] == (8, 8)
        torch.testing.assert_close(whole[1].features[name], alone[0].features[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", [flux, sd3], ids=["flux", "sd3"])
def test_gradient_agrees_with_finite_differences(zc, build):
    """d/dx of fixed linear read-outs of the maps, of the features and of eps, along a random direction, vs a
    central difference (each read-out on its own, so an error in one path cannot hide behind another)."""

    def body(guider, x, sigmas, extra_args):
        den = _den(zc, guider, extra_args)
        layers = den.layers()
        req = CR(probs=_all(layers, "cross"), features=_all(layers, "self"))
        cond = [guider.conds["positive"]]
        gen = torch.Generator().manual_seed(9)
        with torch.inference_mode(False):
            x, s = x.clone(), sigmas[1].clone()
            with torch.no_grad():
                (p,) = den.predict(x, s, cond, req)
            weights = {n: torch.randn(t.shape, generator=gen) for n, t in {**p.probs, **p.features}.items()}
            readouts = {
                "probs": lambda pred: sum((t.float() * weights[n]).sum() for n, t in pred.probs.items()),
                "features": lambda pred: sum((t.float() * weights[n]).sum() for n, t in pred.features.items()),
                "eps": lambda pred: pred.eps.square().sum(),
            }
            direction = torch.randn(x.shape, generator=gen)
            eps = 1e-4  # the tiny random models are far from linear at 1e-2
            out = {}
            for what, readout in readouts.items():
                with den.autograd_session(), torch.enable_grad():
                    xg = x.clone().requires_grad_(True)
                    (g,) = torch.autograd.grad(readout(den.predict(xg, s, cond, req)[0]), xg)
                with torch.no_grad():
                    up = readout(den.predict(x + eps * direction, s, cond, req)[0])
                    down = readout(den.predict(x - eps * direction, s, cond, req)[0])
                out[what] = float((g * direction).sum()), float((up - down) / (2 * eps))
            return out

    for what, (analytic, numeric) in _inside_sampler(build(), {"positive": tm.flow_conditioning(6)}, body).items():
        assert analytic != 0, what
        assert analytic == pytest.approx(numeric, rel=1e-2), what


@pytest.mark.parametrize("build", [flux, flux_dev, sd3], ids=["flux", "flux-dev", "sd3"])
@dh.each_term(16)
def test_one_guided_step_lowers_each_loss(zc, build, term):
    conds = {"positive": tm.flow_conditioning(7), "negative": tm.flow_conditioning(8)}
    dh.assert_one_step_lowers_the_loss(zc, build(), term, conds)


# -- the user's kernel and patches ------------------------------------------------------------------------------


def test_user_kernel_computes_the_output_in_no_grad_passes(zc):
    """A user attention override (a different kernel) still makes the attention output when we capture."""
    calls = []

    def user_kernel(func, *args, **kwargs):
        calls.append(func.__name__)
        return func(*args, **kwargs) * 0.5

    model = flux().clone()
    model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = user_kernel

    def body(guider, x, sigmas, extra_args):
        den = _den(zc, guider, extra_args)
        req = CR(probs=_all(den.layers(), "cross"))
        cond = [guider.conds["positive"]]
        n0 = len(calls)
        (with_user,) = den.predict(x, sigmas[0], cond, req)
        n1 = len(calls)
        options = dict(extra_args["model_options"])
        options["transformer_options"] = {
            k: v for k, v in options["transformer_options"].items() if k != "optimized_attention_override"
        }
        (without,) = zc.denoiser.ComfyDenoiser(guider.inner_model, options).predict(x, sigmas[0], cond, req)
        (plain,) = den.predict(x, sigmas[0], cond)
        return with_user, without, plain, n1 - n0

    with_user, without, plain, n = _inside_sampler(model, {"positive": tm.flow_conditioning(9)}, body)
    from comfy.ldm.modules import attention

    assert n == 2 and set(calls) == {attention.optimized_attention.__name__}
    assert torch.equal(with_user.eps, plain.eps) and not torch.allclose(with_user.eps, without.eps)


# -- the MODEL is left as it was --------------------------------------------------------------------------------


def _snapshot(model):
    tensors = {
        f"{m}.{n}": t for m, mod in model.model.named_modules() for n, t in mod._parameters.items() if t is not None
    }
    return tensors, {n: t.requires_grad for n, t in tensors.items()}, copy.deepcopy(model.model_options)


def _stock(model, pos, neg, lat):
    return h.ksampler(model, pos, neg, lat, steps=3, cfg=2.0)


@pytest.mark.parametrize("build", [flux_dev, sd3], ids=["flux-dev", "sd3"])
def test_guided_and_interrupted_runs_leave_the_model_as_it_was(zc, build):
    model = build()
    pos, neg, lat = tm.flow_conditioning(10, guidance=3.5), tm.flow_conditioning(11, guidance=3.5), tm.flow_latent(12)
    reference = _stock(model, pos, neg, lat)
    tensors, flags, options = _snapshot(model)

    def run(stop_at):
        term = dh.WatchingTerm(weight=1.0, model=model.model.diffusion_model, stop_at=stop_at)
        return dh.guided_run(zc, model, term, pos, neg, lat, sigmas=_sigmas(model, 3)), term.seen

    out, seen = run(-1)
    assert torch.isfinite(out).all() and seen == [False, False, False]
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run(1)
    after, after_flags, after_options = _snapshot(model)
    assert after.keys() == tensors.keys() and all(after[n] is tensors[n] for n in tensors)
    assert after_flags == flags and all(t.is_inference() for t in after.values())
    assert after_options == options
    assert torch.equal(_stock(model, pos, neg, lat), reference)


def test_unknown_layer_is_refused(zc):
    def body(guider, x, sigmas, extra_args):
        den = _den(zc, guider, extra_args)
        with pytest.raises(ValueError, match=r"unknown attention layers \['output.3.0.attn2'\]"):
            den.predict(x, sigmas[0], [guider.conds["positive"]], CR(probs=frozenset({"output.3.0.attn2"})))
        return True

    assert _inside_sampler(flux(), {"positive": tm.flow_conditioning(14)}, body)
