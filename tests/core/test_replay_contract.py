"""Record and replay rely only on the ``Denoiser`` contract (probs ``(B, heads, HW, T)``, features ``(B, C, H, W)``),
not on a UNet: a toy denoiser with a flow-like velocity output, one joint block and a non-square latent replays
exactly like the lockstep sampler pinned to its inverted trajectory."""

from __future__ import annotations

import contextlib

import torch

from zerocon_core.method.denoiser import LayerInfo, Prediction
from zerocon_core.method.guidance import CrossAttentionGuidance, PatchNCEGuidance
from zerocon_core.method.inversion import ddim_invert
from zerocon_core.method.losses import PatchSamples
from zerocon_core.method.replay import RecordSettings
from zerocon_core.method.sampler import SamplerSettings, guided_ddim_sample

from .test_sampler_replay import Pinned

C, HEADS, T, D = 6, 2, 5, 4


class Toy:
    """Not a UNet: one 1x1 "image" projection, a joint-attention-like block (cross probabilities over T text
    tokens, a self feature map) and an output read from both. Float64, differentiable in ``x``."""

    prediction_type = "eps"

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.w_in = torch.randn(C, 4, generator=g, dtype=torch.float64) / 2
        self.w_q = torch.randn(C, C, generator=g, dtype=torch.float64) / C**0.5
        self.w_k = torch.randn(D, C, generator=g, dtype=torch.float64) / D**0.5
        self.w_out = torch.randn(4, C, generator=g, dtype=torch.float64) / C**0.5
        self.sigma_table = torch.linspace(0.03, 14.6, 1000, dtype=torch.float64)

    def layers(self):
        return [LayerInfo("joint.0.txt", "cross", "down", 0), LayerInfo("joint.0.img", "self", "up", 0)]

    def autograd_session(self):
        return contextlib.nullcontext()

    def predict(self, x, sigma, conds, capture=None):
        b, _, h, w = x.shape
        out = []
        for cond in conds:
            feat = torch.tanh(torch.einsum("ci,bihw->bchw", self.w_in, x) / (1 + sigma))  # (B, C, H, W)
            q = torch.einsum("dc,bchw->bhwd", self.w_q, feat).reshape(b, h * w, HEADS, C // HEADS).transpose(1, 2)
            k = (cond @ self.w_k).reshape(1, T, HEADS, C // HEADS).transpose(1, 2)
            probs = (q @ k.transpose(-1, -2)).softmax(-1)  # (B, heads, HW, T)
            mixed = feat + probs.mean(dim=(1, 3)).reshape(b, 1, h, w)
            eps = torch.einsum("oc,bchw->bohw", self.w_out, mixed)
            want = capture or None
            out.append(
                Prediction(
                    eps,
                    {"joint.0.txt": probs} if want and "joint.0.txt" in want.probs else {},
                    {"joint.0.img": feat} if want and "joint.0.img" in want.features else {},
                )
            )
        return out


def test_replay_needs_only_the_denoiser_contract():
    den = Toy()
    sigmas = torch.tensor([1.0, 0.7, 0.4, 0.2, 0.0], dtype=torch.float64)  # a flow-like grid down to 0
    inv_sigmas = torch.tensor([1e-4, 0.2, 0.4, 0.7, 1.0], dtype=torch.float64)
    x0 = torch.randn(1, 4, 6, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    src = torch.randn(1, T, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    edit = src + 0.5 * torch.randn(1, T, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    terms = (
        CrossAttentionGuidance(weight=2.0, layers="all"),
        PatchNCEGuidance(weight=1.0, layers="all", num_patches=7),
    )
    inv = ddim_invert(den, x0, inv_sigmas, src, record=RecordSettings(terms, dtype="float64"))
    assert sorted(inv.record.captures) == [1, 2, 3]
    assert isinstance(inv.record.captures[1].features["joint.0.img"], PatchSamples)
    kw = dict(source_cond=src, edit_cond=edit, guidance=terms)
    replay = guided_ddim_sample(den, inv.latent, sigmas, settings=SamplerSettings(), inversion=inv, **kw)
    assert replay.reference_mode == "inverted" and replay.replayed == [1, 2, 3], replay.notes
    pinned = Pinned(den, inv)
    lockstep = guided_ddim_sample(
        pinned, inv.latent, sigmas, settings=SamplerSettings(reference="resampled"), inversion=inv, **kw
    )
    assert pinned.reference_forwards == 4
    torch.testing.assert_close(replay.latent, lockstep.latent, rtol=0, atol=1e-6)
    plain = guided_ddim_sample(
        den, inv.latent, sigmas, settings=SamplerSettings(), inversion=inv, **{**kw, "guidance": ()}
    )
    assert float((replay.latent - plain.latent).abs().max()) > 1e-3  # the guidance did something
