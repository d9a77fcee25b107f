"""ComfyUI benchmark: one guided step vs one stock KSampler CFG step, and the memory guidance adds.

Runs inside ComfyUI's environment, on ONE model in ONE process: a randomly initialised full-size SD1.5
UNet built from ComfyUI's own classes (as a checkpoint loader would build it: under inference mode).

    COMFYUI_PATH=~/ComfyUI <comfy-python> bench/bench_comfyui.py --size 256 --steps 10        # CPU
    COMFYUI_PATH=~/ComfyUI <comfy-python> bench/bench_comfyui.py --gpu --size 512 --steps 50  # GPU
    ... --gpu --family sdxl --size 1024 --steps 50

Per-step times come from ComfyUI's own progress hook (one tick per sampling step). Memory: peak RSS above
the post-load baseline on CPU (sampled every 5 ms), peak allocated VRAM on GPU. Writes bench/out/*.json.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import COMFYUI, REPO, write_json  # noqa: E402, F401  (REPO, COMFYUI: used by the other benches)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Peak:
    """Peak memory (MB) above the value at entry: RSS sampled on CPU, max_memory_allocated on CUDA."""

    def __init__(self, cuda: bool):
        self.cuda, self.peak, self.base = cuda, 0.0, 0.0

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            self.base = _rss_mb()
            self._stop = False
            self._t = threading.Thread(target=self._watch, daemon=True)
            self._t.start()
        return self

    def _watch(self):
        while not self._stop:
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.005)

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop = True
            self._t.join()
            self.peak = max(self.peak, _rss_mb())
        self.added = self.peak - self.base


class StepClock:
    """(wall, process CPU) stamps of ComfyUI's progress-bar ticks (one per sampling step)."""

    def __init__(self):
        self.stamps: list[tuple[float, float]] = []

    @staticmethod
    def now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def hook(self, value, total, preview, node_id=None):
        self.stamps.append(self.now())

    def per_step(self, start: tuple[float, float]) -> list[tuple[float, float]]:
        """(wall, CPU) seconds of each step."""
        ts = [start] + self.stamps
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(ts, ts[1:])]


#: Full-size UNet configs as ComfyUI's checkpoint loader reads them, with the context and pooled widths.
UNETS = {
    "sd15": (
        {
            "use_checkpoint": False,
            "image_size": 32,
            "out_channels": 4,
            "use_spatial_transformer": True,
            "legacy": False,
            "adm_in_channels": None,
            "in_channels": 4,
            "model_channels": 320,
            "num_res_blocks": [2, 2, 2, 2],
            "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
            "channel_mult": [1, 2, 4, 4],
            "transformer_depth_middle": 1,
            "use_linear_in_transformer": False,
            "context_dim": 768,
            "num_heads": 8,
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            "use_temporal_attention": False,
            "use_temporal_resblock": False,
        },
        768,
        None,
    ),
    "sdxl": (
        {
            "use_checkpoint": False,
            "image_size": 32,
            "out_channels": 4,
            "use_spatial_transformer": True,
            "legacy": False,
            "num_classes": "sequential",
            "adm_in_channels": 2816,
            "in_channels": 4,
            "model_channels": 320,
            "num_res_blocks": [2, 2, 2],
            "transformer_depth": [0, 0, 2, 2, 10, 10],
            "channel_mult": [1, 2, 4],
            "transformer_depth_middle": 10,
            "use_linear_in_transformer": True,
            "context_dim": 2048,
            "num_head_channels": 64,
            "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
            "use_temporal_attention": False,
            "use_temporal_resblock": False,
        },
        2048,
        1280,
    ),
}


def randomize(module, seed: int) -> None:
    """Seeded random weights: matrices ~ N(0, 1 / fan-in), vectors 1 (weights) or 0 (biases) + N(0, 0.02^2)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            p.copy_((torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5).to(p.dtype))
        else:
            p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.02 * torch.randn(p.shape, generator=gen).to(p.dtype))


def build_model(family: str, seed: int, dtype=None, compute_dtype="auto"):
    """A random full-size ``family`` UNet as ComfyUI's checkpoint loader builds it: ``(ModelPatcher, context
    width, pooled width)``. ``dtype``: the weights' dtype (default: ComfyUI's ``unet_dtype()``, i.e. its
    ``--fp16-unet`` / ``--bf16-unet`` flags); ``compute_dtype``: the per-layer cast dtype (``comfy.ops``
    manual cast), None for none, "auto" for ComfyUI's choice on its device. The same seed gives the same
    weights, rounded to ``dtype``."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    cfg, ctx, pooled = UNETS["sd15" if family == "sd15" else "sdxl"]
    config = (comfy.supported_models.SD15 if family == "sd15" else comfy.supported_models.SDXL)(copy.deepcopy(cfg))
    dtype = mm.unet_dtype() if dtype is None else dtype
    if compute_dtype == "auto":
        compute_dtype = mm.unet_manual_cast(dtype, mm.get_torch_device())
    config.set_inference_dtype(dtype, compute_dtype)
    with torch.inference_mode():
        base = config.get_model({})
        randomize(base.diffusion_model, seed)
        base.eval()
        patcher = comfy.model_patcher.ModelPatcher(
            base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
        )
    return patcher, ctx, pooled


def load_pack():
    """The pack's sampling and guidance node modules, loaded as ComfyUI loads the pack."""
    return common.load_pack("nodes.sampling_nodes", "nodes.guidance_nodes")


def run_node(cls, **kw):
    out = cls.execute(**kw)
    return tuple(out.result) if hasattr(out, "result") else tuple(out)


def guidance_chain(guidance, xa: float, nce: float):
    """Cross-attention (all layers) + PatchNCE (up blocks, 256 patches, tau 0.07, sizes 1,2) through the guidance
    nodes (``guidance``: the pack's ``nodes.classes.guidance_nodes``), as the shipped workflows chain them."""
    (g,) = run_node(guidance.ZeroConCrossAttentionGuidance, weight=xa, layers="all", start=0.0, end=1.0)
    (g,) = run_node(
        guidance.ZeroConPatchNCEGuidance,
        weight=nce,
        layers="up",
        patches=256,
        tau=0.07,
        patch_sizes="1,2",
        start=0.0,
        end=1.0,
        previous=g,
    )
    return g


def random_conds(ctx: int, pooled: int | None, seeds=(1, 2, 3)) -> list:
    """One random 77-token conditioning per seed, ``ctx`` wide (with a pooled output when ``pooled``)."""
    import torch

    conds = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        extra = {"pooled_output": torch.randn(1, pooled, generator=g)} if pooled else {}
        conds.append([[torch.randn(1, 77, ctx, generator=g), extra]])
    return conds


def timed(clock: StepClock, cuda: bool, fn):
    """``(fn(), total seconds, per-step (wall, CPU) seconds, Peak)``."""
    clock.stamps.clear()
    with Peak(cuda) as pk:
        start = StepClock.now()
        out = fn()
        total = time.perf_counter() - start[0]
    return out, total, clock.per_step(start), pk


def inversion_node(sampling, model, latent, source, steps: int):
    """The pack's regularised DDIM inversion node, as the shipped workflows set it."""
    return run_node(
        sampling.ZeroConDDIMInversion,
        model=model,
        latent=latent,
        conditioning=source,
        steps=steps,
        cfg=1.0,
        regularize=True,
        lambda_ac=20.0,
        lambda_kl=20.0,
        reg_outer=5,
        reg_rolls=5,
        seed=0,
    )


def guided_node(sampling, model, inversion, edited, cfg: float, guidance):
    """The pack's guided sampler node (raw step mode, edit branch)."""
    return run_node(
        sampling.ZeroConGuidedSampler,
        model=model,
        inversion=inversion,
        edited=edited,
        cfg=cfg,
        step_mode="raw",
        step_size=0.02,
        branches="edit",
        seed=0,
        guidance=guidance,
    )


def run_three(args: argparse.Namespace, model, conds: list, latent: dict, cuda: bool, pack: tuple) -> dict:
    """A stock KSampler run, our inversion and our guided sampler (``pack``: the pack's sampling and guidance
    node modules), each timed: ``{name: (total, per-step seconds, Peak)}``."""
    import comfy.utils
    import torch

    import nodes as comfy_nodes

    sampling, guidance = pack
    source, edited, negative = conds
    clock = StepClock()
    comfy.utils.set_progress_bar_global_hook(clock.hook)
    with torch.inference_mode():
        # warm-up: loads the model onto the device, so loading is not timed
        comfy_nodes.common_ksampler(model, 0, 1, args.cfg, "ddim", "ddim_uniform", edited, negative, latent)
        stock = timed(
            clock,
            cuda,
            lambda: comfy_nodes.common_ksampler(
                model, 0, args.steps, args.cfg, "ddim", "ddim_uniform", edited, negative, latent
            ),
        )
        inv = timed(clock, cuda, lambda: inversion_node(sampling, model, latent, source, args.steps))
        g = guidance_chain(guidance, args.xa, args.nce)
        inversion = inv[0][1]
        guided = timed(clock, cuda, lambda: guided_node(sampling, model, inversion, edited, args.cfg, g))
    return {"stock": stock[1:], "inversion": inv[1:], "guided": guided[1:]}


def summarise(res: dict, runs: dict) -> dict:
    """Add the totals, median steps (the first step left out), peaks and the guided / stock ratios to ``res``."""
    med = statistics.median
    (t_stock, steps_stock, pk_stock), (t_inv, _, pk_inv) = runs["stock"], runs["inversion"]
    t_guided, steps_guided, pk_guided = runs["guided"]
    res.update(
        {
            "stock_total_s": t_stock,
            "stock_step_s": med(w for w, _ in steps_stock[1:] or steps_stock),
            "stock_step_cpu_s": med(c for _, c in steps_stock[1:] or steps_stock),
            "inversion_total_s": t_inv,
            "guided_total_s": t_guided,
            "guided_step_s": med(w for w, _ in steps_guided[1:] or steps_guided),
            "guided_step_cpu_s": med(c for _, c in steps_guided[1:] or steps_guided),
            "edit_total_s": t_inv + t_guided,
            "stock_peak_added_mb": pk_stock.added,
            "inversion_peak_added_mb": pk_inv.added,
            "guided_peak_added_mb": pk_guided.added,
            "guided_peak_mb": pk_guided.peak,
            "guidance_added_mb": pk_guided.added - pk_stock.added,
        }
    )
    res["guided_over_stock_step"] = res["guided_step_s"] / res["stock_step_s"]
    res["guided_over_stock_step_cpu"] = res["guided_step_cpu_s"] / res["stock_step_cpu_s"]
    return res


def report(args: argparse.Namespace, res: dict, cuda: bool, path: Path) -> str:
    unit = "VRAM allocated" if cuda else "RSS"
    lines = [
        f"ComfyUI {args.family} {args.size}px, {args.steps} steps, {res['device']} {res['dtype']}, {args.threads} threads",
        f"stock KSampler (ddim, cfg {args.cfg}): {res['stock_total_s']:.2f} s, {res['stock_step_s']:.3f} s/step "
        f"({res['stock_step_cpu_s']:.3f} s CPU), "
        f"peak {unit} +{res['stock_peak_added_mb']:.0f} MB",
        f"ZeroCon inversion (regularised):      {res['inversion_total_s']:.2f} s, "
        f"peak +{res['inversion_peak_added_mb']:.0f} MB",
        f"ZeroCon guided sampler (xa+PatchNCE): {res['guided_total_s']:.2f} s, {res['guided_step_s']:.3f} s/step "
        f"({res['guided_step_cpu_s']:.3f} s CPU), "
        f"peak {unit} +{res['guided_peak_added_mb']:.0f} MB",
        f"whole edit (inversion + guided): {res['edit_total_s']:.2f} s",
        f"guided step / stock step = {res['guided_over_stock_step']:.2f} x wall, "
        f"{res['guided_over_stock_step_cpu']:.2f} x CPU (target <= 2.5); "
        f"memory added by guidance = {res['guidance_added_mb']:.0f} MB",
        f"wrote {path}",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["sd15", "sdxl"], default="sd15")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--xa", type=float, default=0.1)
    ap.add_argument("--nce", type=float, default=0.5)
    ap.add_argument("--gpu", action="store_true", help="use the GPU (default: --cpu)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "out"))
    args = ap.parse_args(argv)

    sys.path.insert(0, str(COMFYUI))
    from comfy.cli_args import args as cargs

    cargs.cpu = not args.gpu
    import torch

    torch.set_num_threads(args.threads)
    import comfy.model_management as mm
    import comfy.utils  # noqa: F401  (ComfyUI's modules first, then the pack, as ComfyUI loads them)

    import nodes  # noqa: F401

    pack = load_pack()
    t0 = time.perf_counter()
    model, ctx, pooled = build_model(args.family, 0)
    build_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(1)
    latent = {"samples": torch.randn(1, 4, args.size // 8, args.size // 8, generator=gen)}
    cuda = args.gpu and torch.cuda.is_available()
    res: dict = {
        "family": args.family,
        "size": args.size,
        "steps": args.steps,
        "device": str(mm.get_torch_device()),
        "dtype": str(mm.unet_dtype()),
        "threads": args.threads,
        "build_s": build_s,
    }
    summarise(res, run_three(args, model, random_conds(ctx, pooled), latent, cuda, pack))
    path = write_json(Path(args.out) / f"bench_comfyui_{args.family}_{args.size}_{'gpu' if cuda else 'cpu'}.json", res)
    sys.stdout.write(report(args, res, cuda, path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
