"""What the saved-activation copies cost on Flux: bytes copied per guided forward and the forward + backward time.

ComfyUI's Flux blocks add to their activations in place, so a guided (grad-enabled) forward saves copies of the
activations autograd keeps (``nodes.families.comfy_denoiser._saved_tensor_copies``). This script builds a randomly
initialised Flux-shaped network from ComfyUI's classes (width, depths and latent size on the command line), and
in ONE process measures:

- the bytes autograd saves for the backward pass, and how many of them the hook copies (those requiring grad);
- the time of a no-grad forward, and of a forward + backward to the latent with the copies (median of N).

    COMFYUI_PATH=~/ComfyUI <comfy-python> bench/bench_flow_copies.py --hidden 256 --double 2 --single 4 --latent 32

CPU time is reported next to wall time (the machine is shared). Writes bench/out/flow_copies.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT_DIR, REPO, start_comfyui, write_json  # noqa: E402


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--latent", type=int, default=32, help="latent side (16 channels); pixels = 8 x this")
    ap.add_argument("--tokens", type=int, default=64, help="text tokens")
    ap.add_argument("--repeats", type=int, default=3)
    return ap.parse_args()


def build_net(args: argparse.Namespace):
    """The random Flux-shaped network (the test builder's weight init), with plain (non-inference) copies of
    the weights, as the autograd session provides them."""
    import comfy.supported_models
    import torch

    sys.path.insert(0, str(REPO / "tests" / "comfyui"))
    import tiny_models  # noqa: E402  (the test builder's weight init)

    head = args.hidden // args.heads
    axes = [head - 2 * (head // 3 // 2 * 2), head // 3 // 2 * 2, head // 3 // 2 * 2]
    cfg = {
        "image_model": "flux",
        "in_channels": 16,
        "patch_size": 2,
        "out_channels": 16,
        "vec_in_dim": 64,
        "context_in_dim": 128,
        "hidden_size": args.hidden,
        "mlp_ratio": 4.0,
        "num_heads": args.heads,
        "depth": args.double,
        "depth_single_blocks": args.single,
        "axes_dim": axes,
        "theta": 10000,
        "qkv_bias": True,
        "guidance_embed": False,
    }
    with torch.inference_mode():
        base = comfy.supported_models.Flux(tiny_models.flux_params_compat(cfg)).get_model({})
        tiny_models._init_(base.diffusion_model, 0)
    net = base.diffusion_model
    with torch.no_grad():
        for mod in net.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None:
                    mod._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
    return net


def median_times(fn, repeats: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of ``repeats`` calls of ``fn``."""
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


class SavedBytes:
    """A ``saved_tensors_hooks`` pack function: counts the bytes autograd saves, copies those requiring grad."""

    def __init__(self) -> None:
        self.counts = {"all": 0, "copied": 0}

    def __call__(self, tensor):
        n = tensor.numel() * tensor.element_size()
        self.counts["all"] += n
        if tensor.requires_grad:
            self.counts["copied"] += n
            return tensor.clone()
        return tensor


def guided_pass(net, inputs: tuple, pack: SavedBytes) -> None:
    """Forward with grad (saved tensors through ``pack``) and backward to the latent, as the pack's guided
    passes run (nodes/grad_paths.torch_paths): where ComfyUI has the switch, its model code takes the torch
    paths (newer versions' comfy-kitchen RoPE has no backward)."""
    import comfy.model_management as mm
    import torch

    x, t, ctx, y = inputs
    training = getattr(mm, "in_training", None)
    if training is not None:
        mm.in_training = True
    try:
        xg = x.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
            out = net(xg, t, ctx, y)
        torch.autograd.grad(out.pow(2).sum(), xg)
    finally:
        if training is not None:
            mm.in_training = training


def main() -> None:
    args = parse()
    start_comfyui(1)
    import torch

    net = build_net(args)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, args.latent, args.latent, generator=gen)
    ctx = torch.randn(1, args.tokens, 128, generator=gen)
    y = torch.randn(1, 64, generator=gen)
    inputs = (x, torch.tensor([0.6]), ctx, y)

    def plain():
        with torch.no_grad():
            net(*inputs)

    pack = SavedBytes()
    guided_pass(net, inputs, pack)  # warm-up, and one forward's byte counts
    per_forward = dict(pack.counts)
    result = {
        "config": vars(args),
        "saved_bytes_per_forward_MiB": per_forward["all"] / 2**20,
        "copied_bytes_per_forward_MiB": per_forward["copied"] / 2**20,
        "copied_fraction": per_forward["copied"] / max(per_forward["all"], 1),
        "plain_forward_s": dict(zip(("wall", "cpu"), median_times(plain, args.repeats))),
        "guided_forward_backward_s": dict(
            zip(("wall", "cpu"), median_times(lambda: guided_pass(net, inputs, pack), args.repeats))
        ),
    }
    result["guided_over_plain_wall"] = result["guided_forward_backward_s"]["wall"] / result["plain_forward_s"]["wall"]
    write_json(OUT_DIR / "flow_copies.json", result, indent=1)
    sys.stdout.write(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
