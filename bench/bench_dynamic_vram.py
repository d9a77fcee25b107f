"""GPU check: the ZeroCon nodes under ComfyUI's Dynamic VRAM (``ModelPatcherDynamic`` + comfy-aimdo, the default on
NVIDIA from ComfyUI 0.33), which ComfyUI never builds on a CPU.

Writes a random-weight full-size SD1.5 UNet in **fp32** and loads it with ComfyUI's own loader computing in **fp16**
(the checkpoint dtype wider than the compute dtype, where a weight replaced without its ``_model_dtype`` marker
overruns its cast slot: "Buffer too small"), enables Dynamic VRAM the way ComfyUI's main.py does, then runs DDIM
Inversion, the Guided Sampler (cross-attention + PatchNCE) and a stock KSampler on it, and a gradient through a
dynamically loaded VAE's decode (what DiffuseIT does at every step).

    COMFYUI_PATH=~/ComfyUI-0.33.0 <comfy-python> bench/bench_dynamic_vram.py --size 512 --steps 10
    ... --no-dynamic        # the same on the legacy ModelPatcher, for comparison
    ... --cpu --size 64 --steps 2   # the script's own dry run on a CPU (no Dynamic VRAM there)

Prints one line per stage (ok / the error), whether Dynamic VRAM was active, the guided step / stock step time
ratio, peak VRAM per stage, the device the VAE decoded on, and whether the stock KSampler gives the same latent
before and after the guided run. Exit code 0 only if every stage passed. Writes bench/out/dynamic_vram.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import COMFYUI, REPO, write_json  # noqa: E402


def enable_dynamic_vram() -> bool:
    """Dynamic VRAM on, as ComfyUI's main.py switches it on; False where this ComfyUI or machine has none."""
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher

    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        return False
    import comfy_aimdo.control

    devices = mm.get_all_torch_devices()
    try:
        ok = comfy_aimdo.control.init_devices((d.index, 0) for d in devices)
    except TypeError:
        ok = comfy_aimdo.control.init_devices(d.index for d in devices)
    if ok:
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
    return bool(ok)


def write_fp32_unet(path: Path) -> None:
    """A random full-size SD1.5 UNet saved in fp32 under ComfyUI's diffusion-model keys."""
    import comfy.utils
    import torch
    from bench_comfyui import build_model

    model, _, _ = build_model("sd15", 0, dtype=torch.float32, compute_dtype=None)
    sd = {k: v.detach().float().contiguous() for k, v in model.model.diffusion_model.state_dict().items()}
    comfy.utils.save_torch_file(sd, str(path))


def run(node_cls, **inputs):
    """A V3 node's ``execute`` as ComfyUI calls it (under inference mode); its outputs as a tuple."""
    import torch
    from bench_comfyui import run_node

    with torch.inference_mode():
        return run_node(node_cls, **inputs)


def stage(report: dict, name: str, fn):
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        out = fn()
        report[name] = {"ok": True, "s": round(time.perf_counter() - t0, 3)}
    except Exception as exc:  # noqa: BLE001 - a check reports every failure
        report[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]}
        out = None
    if cuda:
        report[name]["peak_vram_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    sys.stdout.write(f"{name}: {'ok' if report[name]['ok'] else report[name]['error']}\n")
    sys.stdout.flush()
    return out


def vae_gradient(report: dict) -> None:
    """A gradient through a dynamically loaded VAE's decode (DiffuseIT's decoder); notes where it decoded."""
    import torch

    sys.path.insert(0, str(REPO / "tests" / "comfyui"))
    import tiny_clip  # a small SD-layout VAE from ComfyUI's own classes

    from_pack = sys.modules[str(REPO).replace(".", "_x_")]
    dn = importlib.import_module(f"{from_pack.__name__}.nodes.diffuseit_nodes")
    import comfy.latent_formats

    vae = tiny_clip.vae(0)
    decoder = dn.VAEDecoder(vae, comfy.latent_formats.SD15(), "SD1.5")
    seen = []
    real = vae.first_stage_model.decode
    vae.first_stage_model.decode = lambda z, *a, **k: (seen.append(str(z.device)), real(z, *a, **k))[1]
    session = dn.make_session(decoder, None)
    with session(), torch.enable_grad():
        z = torch.randn(1, 4, 16, 16, device=vae.device).requires_grad_(True)
        (grad,) = torch.autograd.grad(decoder(z).mean(), z)
    report["vae_decode_device"], report["vae_device"] = seen[-1], str(vae.device)
    assert torch.isfinite(grad).all()


def load_fp16_model():
    """The random fp32 SD1.5 UNet written to a file and loaded by ComfyUI's loader computing in fp16."""
    import comfy.sd
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sd15_fp32.safetensors"
        write_fp32_unet(path)
        return comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float16})


def run_stages(args: argparse.Namespace, model, pack: tuple, report: dict) -> None:
    """Stock KSampler, guidance chain, inversion, guided sampler, stock KSampler again, VAE gradient."""
    import torch
    from bench_comfyui import guidance_chain

    import nodes as comfy_nodes

    sampling, guidance = pack
    gen = torch.Generator().manual_seed(1)
    source, edited = ([[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(s)), {}]] for s in (1, 2))
    latent = {"samples": torch.randn(1, 4, args.size // 8, args.size // 8, generator=gen)}
    stock = comfy_nodes.KSampler()

    def ksampler():
        (out,) = stock.sample(model, 3, args.steps, 5.0, "ddim", "ddim_uniform", edited, source, latent, 1.0)
        return out["samples"].clone()

    def chain():
        with torch.inference_mode():
            return guidance_chain(guidance, 1.0, 1.0)

    stock_before = stage(report, "stock_ksampler_before", ksampler)
    terms = stage(report, "guidance_chain", chain)
    inv = stage(
        report,
        "ddim_inversion",
        lambda: run(
            sampling.ZeroConDDIMInversion, model=model, latent=latent, conditioning=source, steps=args.steps, cfg=1.0, regularize=False,
            lambda_ac=20.0, lambda_kl=20.0, reg_outer=1, reg_rolls=2, seed=0, guidance=terms,
        ),
    )  # fmt: skip
    t0 = time.perf_counter()
    stage(
        report,
        "guided_sampler",
        lambda: run(
            sampling.ZeroConGuidedSampler, model=model, inversion=inv[1], edited=edited, cfg=5.0, branches="edit",
            step_mode="auto", step_size=0.02, seed=0, guidance=terms,
        ) if inv else None,
    )  # fmt: skip
    guided_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    stock_after = stage(report, "stock_ksampler_after", ksampler)
    stock_s = time.perf_counter() - t0
    report["guided_over_stock_time"] = round(guided_s / max(stock_s, 1e-9), 2)
    if stock_before is not None and stock_after is not None:
        report["stock_bit_identical_after"] = bool(torch.equal(stock_before, stock_after))
    stage(report, "vae_decode_gradient", lambda: vae_gradient(report))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-dynamic", action="store_true", help="keep ComfyUI's legacy ModelPatcher")
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU (no Dynamic VRAM there)")
    ap.add_argument("--out", default=str(REPO / "bench" / "out"))
    args = ap.parse_args(argv)

    sys.path.insert(0, str(COMFYUI))
    from bench_comfyui import load_pack
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = args.cpu
    import torch

    if not args.cpu and not torch.cuda.is_available():
        sys.stderr.write("no CUDA device: Dynamic VRAM exists only on a GPU (--cpu for a dry run)\n")
        return 2
    import comfy.model_management as mm
    import comfy.sd  # noqa: F401

    import nodes  # noqa: F401

    report: dict = {"comfyui": str(COMFYUI), "size": args.size, "steps": args.steps}
    report["dynamic_vram"] = False if args.no_dynamic or args.cpu else enable_dynamic_vram()
    pack = load_pack()
    model = load_fp16_model()
    report["patcher"] = type(model).__name__
    run_stages(args, model, pack, report)
    mm.unload_all_models()
    if torch.cuda.is_available():
        report["vram_after_unload_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
    write_json(Path(args.out) / "dynamic_vram.json", report)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    stages = [v for v in report.values() if isinstance(v, dict)]
    return 0 if all(s["ok"] for s in stages) and report.get("stock_bit_identical_after", False) else 1


if __name__ == "__main__":
    raise SystemExit(main())
