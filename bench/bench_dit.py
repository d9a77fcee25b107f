"""ComfyUI benchmark on an MM-DiT family: one guided step vs one stock step, and capture memory per block.

Runs inside ComfyUI's environment, in ONE process, on CPU: a model of ``--family`` (``dit_families.py``: Flux.1-dev
by default, Chroma, Flux.2 Klein 4B, Qwen-Image, Z-Image) built from ComfyUI's own classes at full width
(Flux.1: hidden 3072, 24 heads of 128, T5 context 4096 wide, 512 text tokens, RoPE axes 16/56/56) with few
blocks (default 1 + 1), random weights (under inference mode, as a loader builds it), 512 px (Flux.1: a 64 x 64
latent, 32 x 32 = 1024 image tokens).

    COMFYUI_PATH=~/ComfyUI <comfy-python> bench/bench_dit.py                 # 512 px, cfg 1, 2 threads
    COMFYUI_PATH=~/ComfyUI <comfy-python> bench/bench_dit.py --cfg 3.5 --double 2 --single 2
    COMFYUI_PATH=~/ComfyUI <comfy-python> bench/bench_dit.py --cfg 3.5 --reference inverted  # replayed reference
    COMFYUI_PATH=~/ComfyUI <comfy-python> bench/bench_dit.py --family flux2 --size 1024     # Flux.2 Klein at 1024 px

Measured (wall and process CPU time, one process, the same model and latent):

- stock: one ``euler`` step of ComfyUI's KSampler (median of the steps after the first);
- guided: one step of the engine's ``guided_ddim_sample`` through ``ComfyDenoiser`` with the default
  CrossAttentionGuidance + PatchNCEGuidance (layers "auto"), split into its forwards (reference capture,
  guided forward (+ backward, not in the list), the step's CFG pair); ``--reference resampled``: the
  reference branch run live; ``inverted``: replayed from a 2-step inversion's record (the second step);
- capture memory of one guided block: the ``TextProbabilities`` forward and backward on that block's q / k
  shapes, peak bytes allocated (PyTorch profiler memory events, CPU) at this size, next to the formula
  ``dit_capture.capture_bytes`` at this size and at 1024 px, and next to a dense softmax over all keys.

Writes bench/out/bench_dit_<size>_<reference>.json (Flux.1) or bench_dit_<family>_<size>_<reference>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, pack_loader, start_comfyui, write_json  # noqa: E402
from dit_families import FAMILIES, DitFamily  # noqa: E402


def build_model(family: DitFamily, blocks: tuple[int, int], seed: int):
    """``family``'s MODEL with ``blocks``, seeded random weights (matrices ~ 1/sqrt(fan-in), norms ~ 1)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    config = getattr(comfy.supported_models, family.config_class)(family.config(blocks))
    config.set_inference_dtype(torch.float32, None)
    with torch.inference_mode():
        base = config.get_model({})
        gen = torch.Generator().manual_seed(seed)
        for name, p in base.diffusion_model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            else:  # norm weights / QK-norm scales about 1, biases about 0
                one = name.endswith(("weight", "scale"))
                p.copy_((1.0 if one else 0.0) + 0.02 * torch.randn(p.shape, generator=gen))
        base.eval()
        return comfy.model_patcher.ModelPatcher(
            base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
        )


class Clock:
    """(wall, process CPU) seconds."""

    @staticmethod
    def now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    @staticmethod
    def since(start: tuple[float, float]) -> tuple[float, float]:
        w, c = Clock.now()
        return w - start[0], c - start[1]


class StepClock:
    """(wall, CPU) stamps of ComfyUI's progress-bar ticks (one per sampling step)."""

    def __init__(self):
        self.stamps: list[tuple[float, float]] = []

    def hook(self, value, total, preview, node_id=None):
        self.stamps.append(Clock.now())

    def per_step(self, start) -> list[tuple[float, float]]:
        ts = [start] + self.stamps
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(ts, ts[1:])]


class TimedDenoiser:
    """Forwards ``predict`` to a ComfyDenoiser and logs (what, wall, CPU) per call."""

    def __init__(self, den):
        self.den, self.calls = den, []

    def __getattr__(self, name):
        return getattr(self.den, name)

    def predict(self, x, sigma, conds, capture=None):
        import torch

        start = Clock.now()
        out = self.den.predict(x, sigma, conds, capture)
        what = f"{'grad ' if torch.is_grad_enabled() else ''}{'capture ' if capture else ''}B={len(conds)}"
        self.calls.append((what, *Clock.since(start)))
        return out


def peak_allocated(fn) -> int:
    """Peak bytes allocated (CPU) above the start while ``fn`` runs, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        ((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
    )
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak


def capture_memory(dc, fam: DitFamily, size: int, chunk) -> dict:
    """Measured peak of one block's probability capture (forward; backward) at ``size`` px vs the formulas."""
    import torch

    n, heads, tokens = (size // fam.px_per_token) ** 2, fam.heads, fam.text_tokens
    total = n + tokens
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, total, fam.head_dim, generator=gen).requires_grad_(True)
    k = torch.randn(1, heads, total, fam.head_dim, generator=gen).requires_grad_(True)
    image, text = slice(tokens, total), slice(0, tokens)
    held = {}

    def forward():
        held["p"] = dc.text_probabilities(q, k, image, text, None, chunk)

    fwd = peak_allocated(forward)
    grad = torch.randn(held["p"].shape, generator=gen)

    def backward():
        torch.autograd.grad(held["p"], (q, k), grad)

    bwd = peak_allocated(backward)
    held.clear()

    def dense():
        s = (q @ k.transpose(-1, -2) / fam.head_dim**0.5).softmax(-1)
        held["p"] = s[:, :, image, text]

    dense_fwd = peak_allocated(dense)
    held.clear()
    return {
        "image_tokens": n,
        "text_tokens": tokens,
        "measured_forward_mb": fwd / 2**20,
        "measured_backward_mb": bwd / 2**20,
        "formula_forward_mb": dc.capture_bytes(1, heads, n, tokens, total, chunk) / 2**20,
        "formula_backward_mb": dc.capture_bytes(1, heads, n, tokens, total, chunk, backward=True, head_dim=fam.head_dim)
        / 2**20,
        "dense_softmax_forward_mb": dense_fwd / 2**20,
    }


def parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="flux", help="the network (dit_families.py)")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--double", type=int, default=1, help="blocks of the first stack (double-stream / main layers)")
    ap.add_argument("--single", type=int, default=1, help="blocks of the second stack (single-stream / refiners)")
    ap.add_argument(
        "--cfg", type=float, default=None, help="CFG of both samplers (default: the family's; Flux-dev 1, distilled)"
    )
    ap.add_argument(
        "--reference",
        choices=["resampled", "inverted"],
        default="resampled",
        help="resampled: one step with the live reference branch; inverted: a 2-step inversion records the "
        "captures and the second guided step (replayed reference) is timed",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "out"))
    return ap.parse_args(argv)


def load_modules() -> dict:
    """ComfyUI's sampler modules, then the pack's modules this bench drives (loaded from this checkout)."""
    import comfy.samplers  # noqa: F401
    import comfy.utils  # noqa: F401
    from bench_comfyui import Peak  # noqa: F401

    import nodes  # noqa: F401

    pack_module = pack_loader()
    names = {
        "dc": "nodes.glue.dit_capture",
        "den_mod": "nodes.families.comfy_denoiser",
        "guidance": "zerocon_core.method.guidance",
        "sampler": "zerocon_core.method.sampler",
        "inversion": "zerocon_core.method.inversion",
        "replay": "zerocon_core.method.replay",
    }
    return {k: pack_module(v) for k, v in names.items()}


def random_conds(fam: DitFamily) -> list:
    """``source``, ``edited``, ``negative`` conditionings of ``fam``: random text tokens, its pooled output and
    distilled guidance where it has them."""
    import torch

    conds = []
    for seed in (2, 3, 4):
        g = torch.Generator().manual_seed(seed)
        extra = {"pooled_output": None if fam.pooled is None else torch.randn(1, fam.pooled, generator=g)}
        if fam.guidance is not None:
            extra["guidance"] = fam.guidance
        conds.append([[torch.randn(1, fam.text_tokens, fam.context, generator=g), extra]])
    return conds


def time_stock(args: argparse.Namespace, model, conds: list, latent: dict) -> dict:
    """ComfyUI's KSampler, euler, 3 steps; the steps after the first are timed."""
    import comfy.utils
    import torch
    from bench_comfyui import Peak

    import nodes as comfy_nodes

    _, edited, negative = conds
    clock = StepClock()
    comfy.utils.set_progress_bar_global_hook(clock.hook)
    with torch.inference_mode():
        clock.stamps.clear()
        with Peak(False) as pk_stock:
            t0 = Clock.now()
            comfy_nodes.common_ksampler(model, 0, 3, args.cfg, "euler", "simple", edited, negative, latent)
        stock_steps = clock.per_step(t0)[1:]
    return {
        "stock_step_wall_s": statistics.median(s[0] for s in stock_steps),
        "stock_step_cpu_s": statistics.median(s[1] for s in stock_steps),
        "stock_peak_rss_added_mb": pk_stock.added,
    }


def _guided_inverted(m: dict, den, x, sigmas, run: tuple) -> dict:
    """Invert 2 steps with a record, sample 2 steps; the second step's time, forwards and peak."""
    from bench_comfyui import Peak

    src, edit, terms, settings = run
    inv = m["inversion"].ddim_invert(
        den, x.clone(), sigmas.flip(0).clone(), src, record=m["replay"].RecordSettings(guidance=terms)
    )
    stamps = []
    den.calls.clear()
    with Peak(False) as pk:
        m["sampler"].guided_ddim_sample(
            den, inv.latent, sigmas.clone(), source_cond=src, edit_cond=edit, guidance=terms,
            settings=settings, inversion=inv,
            callback=lambda *a: stamps.append((*Clock.now(), len(den.calls))),
        )  # fmt: skip
    return {
        "total": (stamps[1][0] - stamps[0][0], stamps[1][1] - stamps[0][1]),
        "calls": den.calls[stamps[0][2] : stamps[1][2]],  # the second step's calls
        "peak": pk.added,
    }


def _guided_resampled(m: dict, den, x, sigmas, run: tuple) -> dict:
    """One guided step with the live reference, twice: the first warms up (allocator, autograd), the second
    is timed."""
    from bench_comfyui import Peak

    src, edit, terms, settings = run
    for _ in range(2):
        den.calls.clear()
        t0 = Clock.now()
        with Peak(False) as pk:
            m["sampler"].guided_ddim_sample(
                den, x.clone(), sigmas[:2].clone(), source_cond=src, edit_cond=edit, guidance=terms,
                settings=settings,
            )  # fmt: skip
        total = Clock.since(t0)
    return {"total": total, "calls": list(den.calls), "peak": pk.added}


def time_guided(args: argparse.Namespace, model, m: dict, conds: list, latent: dict, gen) -> dict:
    """One guided step through ``ComfyDenoiser`` inside ComfyUI's sampler (a KSAMPLER function); ``gen``
    draws the noise."""
    import comfy.samplers
    import torch

    terms = (m["guidance"].CrossAttentionGuidance(layers="auto"), m["guidance"].PatchNCEGuidance(layers="auto"))
    found = {}

    def function(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        guider = model_k.inner_model
        den = TimedDenoiser(m["den_mod"].ComfyDenoiser(guider.inner_model, extra_args["model_options"]))
        found["layers"] = sorted(terms[0].request(den.layers()).probs | terms[1].request(den.layers()).features)
        settings = m["sampler"].SamplerSettings(cfg=args.cfg, step_mode="normalized", reference=args.reference)
        run = (guider.conds["positive"], guider.conds["negative"], terms, settings)
        with torch.inference_mode(False):
            step = _guided_inverted if args.reference == "inverted" else _guided_resampled
            found.update(step(m, den, x, sigmas, run))
        return x

    source, edited, _ = conds
    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({"positive": source, "negative": edited})
    levels = 3 if args.reference == "inverted" else 2
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 28)[10 : 10 + levels]
    with torch.inference_mode():
        guider.sample(torch.randn(latent["samples"].shape, generator=gen), latent["samples"],
                      comfy.samplers.KSAMPLER(function), sigmas)  # fmt: skip
    wall, cpu = found["total"]
    return {
        "guided_layers": found["layers"],
        "guided_step_wall_s": wall,
        "guided_step_cpu_s": cpu,
        "guided_forwards": [{"what": w, "wall_s": a, "cpu_s": b} for w, a, b in found["calls"]],
        "guided_peak_rss_added_mb": found["peak"],
    }


def capture_figures(dc, fam: DitFamily, size: int) -> dict:
    """Measured capture memory at ``size`` and the formula's at 1024 px."""
    chunk = dc.Chunking()
    n1024, heads, tokens = (1024 // fam.px_per_token) ** 2, fam.heads, fam.text_tokens
    total = n1024 + tokens
    return {
        "chunk": [chunk.queries, chunk.keys],
        "capture_memory": capture_memory(dc, fam, size, chunk),
        "capture_memory_1024_formula_mb": {
            "forward": dc.capture_bytes(1, heads, n1024, tokens, total, chunk) / 2**20,
            "backward": dc.capture_bytes(1, heads, n1024, tokens, total, chunk, backward=True, head_dim=fam.head_dim)
            / 2**20,
            "dense_softmax_all_keys": 4 * heads * total**2 / 2**20,
        },
    }


def report(args: argparse.Namespace, res: dict, path: Path) -> str:
    fam = FAMILIES[args.family]
    cm, c1024 = res["capture_memory"], res["capture_memory_1024_formula_mb"]
    lines = [
        f"{fam.name} ({args.double} + {args.single} blocks, {fam.heads} heads of {fam.head_dim}, "
        f"{fam.text_tokens} text tokens), "
        f"{args.size}px, CPU, {args.threads} threads, cfg {args.cfg}, reference {args.reference}; "
        f"guided layers {res['guided_layers']}",
        f"stock euler step:  {res['stock_step_wall_s']:.2f} s wall, {res['stock_step_cpu_s']:.2f} s CPU",
        f"guided step:       {res['guided_step_wall_s']:.2f} s wall, {res['guided_step_cpu_s']:.2f} s CPU",
    ]
    for c in res["guided_forwards"]:
        lines.append(f"  predict {c['what']:<16} {c['wall_s']:.2f} s wall, {c['cpu_s']:.2f} s CPU")
    lines += [
        f"guided / stock = {res['guided_over_stock_wall']:.2f} (wall), {res['guided_over_stock_cpu']:.2f} (CPU) "
        "(target <= 2.5)",
        f"capture memory per guided block at {args.size}px ({cm['image_tokens']} image x {cm['text_tokens']} text tokens): "
        f"measured {cm['measured_forward_mb']:.1f} MB forward, {cm['measured_backward_mb']:.1f} MB backward "
        f"(formula {cm['formula_forward_mb']:.1f} / {cm['formula_backward_mb']:.1f}); "
        f"dense softmax {cm['dense_softmax_forward_mb']:.1f} MB",
        f"at 1024px (formula): {c1024['forward']:.1f} MB forward, {c1024['backward']:.1f} MB backward "
        f"(a dense joint-attention matrix alone: {c1024['dense_softmax_all_keys']:.0f} MB)",
        f"wrote {path}",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse(argv)
    fam = FAMILIES[args.family]
    args.cfg = fam.cfg if args.cfg is None else args.cfg
    start_comfyui(args.threads)
    import torch

    m = load_modules()
    res: dict = {"family": args.family, "size": args.size, "double": args.double, "single": args.single}
    res.update(cfg=args.cfg, reference=args.reference, threads=args.threads)
    start = Clock.now()
    model = build_model(fam, (args.double, args.single), 0)
    res["build_s"] = Clock.since(start)[0]
    conds = random_conds(fam)
    gen = torch.Generator().manual_seed(1)
    latent = {"samples": torch.randn(fam.latent(args.size), generator=gen)}
    res.update(time_stock(args, model, conds, latent))
    res.update(time_guided(args, model, m, conds, latent, gen))
    res["guided_over_stock_wall"] = res["guided_step_wall_s"] / res["stock_step_wall_s"]
    res["guided_over_stock_cpu"] = res["guided_step_cpu_s"] / res["stock_step_cpu_s"]
    res.update(capture_figures(m["dc"], fam, args.size))
    name = "bench_dit" if args.family == "flux" else f"bench_dit_{args.family}"
    path = write_json(Path(args.out) / f"{name}_{args.size}_{args.reference}.json", res)
    sys.stdout.write(report(args, res, path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
