"""Calibrate the PatchNCE guidance weight against the cross-attention guidance (run by hand).

During a guided edit, at every step, measure the RMS of the gradients w.r.t. the VP latent of the
cross-attention loss L_xa and of the PatchNCE loss L_nce (each with weight 1), while the edit itself is
guided with the defaults. The PatchNCE weight that makes both terms pull equally hard is
``w_nce = w_xa * rms(grad L_xa) / rms(grad L_nce)``; its median over steps is reported and saved.

    python bench/calibrate_patchnce.py                        # random full-size SD1.5 UNet, CPU, 256 px
    python bench/calibrate_patchnce.py --model DIR --size 512 # a real SD folder (diffusers layout), on GPU

With random weights the figure only checks the pipeline and the order of magnitude; re-run it with real
weights on a GPU before changing the shipped default.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import calibration_parser, equal_pull, grad_record, probe_lines, random_edit, write_json  # noqa: E402

from zerocon_core.diffusers_host.denoiser import DiffusersDenoiser  # noqa: E402
from zerocon_core.method.guidance import CrossAttentionGuidance, GuidanceTerm, PatchNCEGuidance, StepContext  # noqa: E402
from zerocon_core.method.inversion import ddim_invert  # noqa: E402
from zerocon_core.method.sampler import SamplerSettings, guided_ddim_sample  # noqa: E402
from zerocon_core.method.schedule import ddim_sigmas, inversion_sigmas  # noqa: E402


@dataclass(frozen=True)
class Probe(GuidanceTerm):
    """Guides with ``xa`` + ``nce`` and records, per step, the gradient RMS of each loss at weight 1."""

    xa: CrossAttentionGuidance = field(default_factory=CrossAttentionGuidance)
    nce: PatchNCEGuidance = field(default_factory=PatchNCEGuidance)
    records: list = field(default_factory=list, compare=False)

    def request(self, layers):
        return self.xa.request(layers) | self.nce.request(layers)

    def loss(self, ctx: StepContext, request):
        l_xa = self.xa.loss(ctx, self.xa_req)
        l_nce = self.nce.loss(ctx, self.nce_req)
        scale = float(1 + ctx.sigma**2) ** 0.5  # d/dz = sqrt(1 + sigma^2) d/dx
        self.records.append(grad_record(ctx, (l_xa, l_nce), scale))
        return self.xa.weight * l_xa + self.nce.weight * l_nce


def build(model: str | None, device: str, dtype: torch.dtype, seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    if model:
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", local_files_only=True)
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_pretrained(model, subfolder="scheduler", local_files_only=True)
        den = DiffusersDenoiser(unet, scheduler_config=sched, device=device, dtype=dtype)
    else:
        from bench_engine import SD15_UNET

        unet = UNet2DConditionModel(**SD15_UNET).eval()
        den = DiffusersDenoiser(unet, device=device, dtype=dtype)
    return den


def probe_edit(den, args: argparse.Namespace) -> Probe:
    """Run one guided edit of a random latent with the probe; returns it with its per-step records."""
    latent, src, edit = random_edit(args.seed, args.size, args.device)
    sig = ddim_sigmas(den.sigma_table, args.steps, final="zero")
    inv = ddim_invert(den, latent, inversion_sigmas(sig), src, keep_trajectory=False)
    probe = Probe()
    layers = den.layers()
    object.__setattr__(probe, "xa_req", probe.xa.request(layers))
    object.__setattr__(probe, "nce_req", probe.nce.request(layers))
    guided_ddim_sample(
        den,
        inv.latent,
        sig.to(latent.device),
        source_cond=src,
        edit_cond=edit,
        guidance=[probe],
        settings=SamplerSettings(step_mode="raw"),  # the raw defaults, as when the figure was measured
    )
    return probe


def main(argv: list[str] | None = None) -> int:
    ap = calibration_parser(__doc__, 10, "calibrate_patchnce.json")
    ap.add_argument("--model", help="diffusers SD folder (default: random full-size SD1.5 UNet)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    t0 = time.perf_counter()
    probe = probe_edit(build(args.model, args.device, dtype, args.seed), args)
    ratio, w_nce = equal_pull(probe.records, probe.xa.weight)
    result = {
        "model": args.model or "random SD1.5 UNet (diffusers config)",
        "size": args.size,
        "steps": args.steps,
        "device": args.device,
        "dtype": str(dtype),
        "xa_weight": probe.xa.weight,
        "current_nce_default": PatchNCEGuidance().weight,
        "per_step": probe.records,
        "median_ratio_xa_over_nce": ratio,
        "equal_pull_nce_weight": w_nce,
        "seconds": time.perf_counter() - t0,
    }
    write_json(args.out, result)
    sys.stdout.write("\n".join(probe_lines(result, args.out)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
