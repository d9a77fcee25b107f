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
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMFYUI = Path(os.environ.get("COMFYUI_PATH", str(Path.home() / "ComfyUI"))).expanduser().resolve()
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=512, help="text tokens (Flux-dev: 512 T5 tokens)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "calibrate_patchnce_dit.json"))
    args = ap.parse_args(argv)

    sys.path.insert(0, str(COMFYUI))
    from comfy.cli_args import args as cargs

    cargs.cpu = True
    import torch

    torch.set_num_threads(args.threads)
    import comfy.samplers
    from bench_dit import CONTEXT, POOLED, build_model

    sys.path.insert(0, str(REPO / "tests" / "comfyui"))
    from conftest import pack_module

    den_mod = pack_module("nodes.families.comfy_denoiser")
    guidance = pack_module("zerocon_core.method.guidance")
    sampler = pack_module("zerocon_core.method.sampler")

    @dataclass(frozen=True)
    class Probe(guidance.GuidanceTerm):
        """Guides with ``xa`` + ``nce`` and records, per step, the gradient RMS of each loss at weight 1."""

        xa: object = field(default_factory=lambda: guidance.CrossAttentionGuidance(layers="auto"))
        nce: object = field(default_factory=lambda: guidance.PatchNCEGuidance(layers="auto"))
        records: list = field(default_factory=list, compare=False)

        def request(self, layers):
            return self.xa.request(layers) | self.nce.request(layers)

        def loss(self, ctx, request):
            l_xa = self.xa.loss(ctx, self.xa_req)
            l_nce = self.nce.loss(ctx, self.nce_req)
            g_xa, g_nce = (torch.autograd.grad(v, ctx.x, retain_graph=True)[0] for v in (l_xa, l_nce))
            rms = [float(g.pow(2).mean().sqrt()) for g in (g_xa, g_nce)]
            self.records.append(
                {
                    "step": ctx.step,
                    "sigma": float(ctx.sigma),
                    "loss_xa": float(l_xa.detach()),
                    "loss_nce": float(l_nce.detach()),
                    "rms_grad_xa": rms[0],
                    "rms_grad_nce": rms[1],
                }
            )
            return self.xa.weight * l_xa + self.nce.weight * l_nce

    t0 = time.perf_counter()
    model = build_model(args.double, args.single, 0)
    gen = torch.Generator().manual_seed(1)

    def cond(seed, base=None):
        g = torch.Generator().manual_seed(seed)
        c = torch.randn(1, args.tokens, CONTEXT, generator=g)
        if base is not None:  # the edit: the source's prompt, partly changed
            c = base + 0.3 * c
        return [[c, {"pooled_output": torch.randn(1, POOLED, generator=g), "guidance": 3.5}]]

    source = cond(2)
    edited = cond(3, source[0][0])
    h = args.size // 8
    latent = torch.randn(1, 16, h, h, generator=gen)
    probe = Probe()
    found = {}

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

    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({"positive": source, "negative": edited})
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", args.steps)
    with torch.inference_mode():
        noise = torch.randn(latent.shape, generator=gen)
        guider.sample(noise, latent, comfy.samplers.KSAMPLER(function), sigmas)

    ratios = [r["rms_grad_xa"] / max(r["rms_grad_nce"], 1e-30) for r in probe.records]
    w_nce = probe.xa.weight * statistics.median(ratios)
    result = {
        "model": f"random Flux-shaped DiT, {args.double} double + {args.single} single blocks, width 3072",
        "layers": found["layers"],
        "size": args.size,
        "steps": args.steps,
        "text_tokens": args.tokens,
        "xa_weight": probe.xa.weight,
        "current_nce_default": probe.nce.weight,
        "per_step": probe.records,
        "median_ratio_xa_over_nce": statistics.median(ratios),
        "equal_pull_nce_weight": w_nce,
        "seconds": time.perf_counter() - t0,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    lines = [f"{result['model']}, {args.size}px, {args.steps} steps; layers {found['layers']}"]
    lines.append(f"{'step':>4} {'sigma':>8} {'L_xa':>10} {'L_nce':>8} {'rms dL_xa':>10} {'rms dL_nce':>10}")
    for r in probe.records:
        lines.append(
            f"{r['step']:>4} {r['sigma']:8.3f} {r['loss_xa']:10.4g} {r['loss_nce']:8.4f} "
            f"{r['rms_grad_xa']:10.3g} {r['rms_grad_nce']:10.3g}"
        )
    lines.append(
        f"median rms ratio xa/nce = {result['median_ratio_xa_over_nce']:.4g}; PatchNCE weight for equal "
        f"pull with xa weight {probe.xa.weight}: {w_nce:.4g} (shipped default {result['current_nce_default']})"
    )
    lines.append(f"wrote {args.out} in {result['seconds']:.0f} s")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
