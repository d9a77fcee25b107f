"""Calibrate the PatchNCE guidance weight against the cross-attention guidance on an MM-DiT (run by hand).

The DiT counterpart of ``bench/calibrate_patchnce.py``: during a guided edit (inside ComfyUI's sampler,
through ``ComfyDenoiser``), at every step, measure the RMS of the gradients w.r.t. the latent of the
cross-attention loss L_xa (text-image maps of the default double-stream / joint blocks) and of the PatchNCE
loss L_nce (image-token outputs of the default blocks), each with weight 1, while the edit is guided with
the defaults. The PatchNCE weight that makes both pull equally hard is
``w_nce = w_xa * rms(grad L_xa) / rms(grad L_nce)``; its median over steps is reported and saved.

    COMFYUI_PATH=~/ComfyUI <comfy-python> bench/calibrate_patchnce_dit.py                 # Flux-shaped, 256 px
    COMFYUI_PATH=~/ComfyUI <comfy-python> bench/calibrate_patchnce_dit.py --double 4 --single 8 --steps 8

The model is Flux-shaped at full width (bench_dit.py) with RANDOM weights and few blocks: the figure checks
the pipeline and the order of magnitude only; re-run it on real Flux / SD3.5 weights on a GPU before
changing a shipped default.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    calibration_parser,
    equal_pull,
    grad_record,
    pack_loader,
    probe_lines,
    start_comfyui,
    write_json,
)


def probe_class(guidance):
    """A guidance term (of the pack loaded through ComfyUI) that guides with ``xa`` + ``nce`` and records,
    per step, the gradient RMS of each loss at weight 1."""

    @dataclass(frozen=True)
    class Probe(guidance.GuidanceTerm):
        xa: object = field(default_factory=lambda: guidance.CrossAttentionGuidance(layers="auto"))
        nce: object = field(default_factory=lambda: guidance.PatchNCEGuidance(layers="auto"))
        records: list = field(default_factory=list, compare=False)

        def request(self, layers):
            return self.xa.request(layers) | self.nce.request(layers)

        def loss(self, ctx, request):
            l_xa = self.xa.loss(ctx, self.xa_req)
            l_nce = self.nce.loss(ctx, self.nce_req)
            self.records.append(grad_record(ctx, (l_xa, l_nce)))
            return self.xa.weight * l_xa + self.nce.weight * l_nce

    return Probe


def random_conds(tokens: int):
    """Flux-style ``(source, edited)`` conditionings: random text tokens, the edit partly changed."""
    import torch
    from bench_dit import CONTEXT, POOLED

    def cond(seed, base=None):
        g = torch.Generator().manual_seed(seed)
        c = torch.randn(1, tokens, CONTEXT, generator=g)
        if base is not None:  # the edit: the source's prompt, partly changed
            c = base + 0.3 * c
        return [[c, {"pooled_output": torch.randn(1, POOLED, generator=g), "guidance": 3.5}]]

    source = cond(2)
    return source, cond(3, source[0][0])


def probe_sampler(pack_module, probe, found: dict):
    """A KSAMPLER function that runs our guided sampler with ``probe`` through ``ComfyDenoiser``."""
    import torch

    den_mod = pack_module("nodes.families.comfy_denoiser")
    sampler = pack_module("zerocon_core.method.sampler")

    def function(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        guider = model_k.inner_model
        den = den_mod.ComfyDenoiser(guider.inner_model, extra_args["model_options"])
        layers = den.layers()
        object.__setattr__(probe, "xa_req", probe.xa.request(layers))
        object.__setattr__(probe, "nce_req", probe.nce.request(layers))
        found["layers"] = sorted(probe.xa_req.probs | probe.nce_req.features)
        settings = sampler.SamplerSettings(cfg=1.0, step_mode="normalized", reference="resampled")
        with torch.inference_mode(False):
            sampler.guided_ddim_sample(
                den,
                x.clone(),
                sigmas.clone(),
                source_cond=guider.conds["positive"],
                edit_cond=guider.conds["negative"],
                guidance=[probe],
                settings=settings,
            )
        return x

    return function


def run_probe(args: argparse.Namespace, pack_module):
    """One guided edit of a random latent on the random Flux-shaped model; ``(probe, layers)``."""
    import comfy.samplers
    import torch
    from bench_dit import build_model

    probe = probe_class(pack_module("zerocon_core.method.guidance"))()
    model = build_model(args.double, args.single, 0)
    gen = torch.Generator().manual_seed(1)
    source, edited = random_conds(args.tokens)
    h = args.size // 8
    latent = torch.randn(1, 16, h, h, generator=gen)
    found: dict = {}
    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({"positive": source, "negative": edited})
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", args.steps)
    with torch.inference_mode():
        noise = torch.randn(latent.shape, generator=gen)
        guider.sample(noise, latent, comfy.samplers.KSAMPLER(probe_sampler(pack_module, probe, found)), sigmas)
    return probe, found["layers"]


def main(argv: list[str] | None = None) -> int:
    ap = calibration_parser(__doc__, 6, "calibrate_patchnce_dit.json")
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=512, help="text tokens (Flux-dev: 512 T5 tokens)")
    args = ap.parse_args(argv)
    start_comfyui(args.threads)
    import bench_dit  # noqa: F401
    import comfy.samplers  # noqa: F401  (imported before the clock starts, as the whole setup)

    pack_module = pack_loader()
    t0 = time.perf_counter()
    probe, layers = run_probe(args, pack_module)
    ratio, w_nce = equal_pull(probe.records, probe.xa.weight)
    result = {
        "model": f"random Flux-shaped DiT, {args.double} double + {args.single} single blocks, width 3072",
        "layers": layers,
        "size": args.size,
        "steps": args.steps,
        "text_tokens": args.tokens,
        "xa_weight": probe.xa.weight,
        "current_nce_default": probe.nce.weight,
        "per_step": probe.records,
        "median_ratio_xa_over_nce": ratio,
        "equal_pull_nce_weight": w_nce,
        "seconds": time.perf_counter() - t0,
    }
    write_json(args.out, result)
    lines = [f"{result['model']}, {args.size}px, {args.steps} steps; layers {layers}"]
    sys.stdout.write("\n".join(lines + probe_lines(result, args.out)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
