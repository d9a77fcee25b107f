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
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMFYUI = Path(os.environ.get("COMFYUI_PATH", str(Path.home() / "ComfyUI"))).expanduser().resolve()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--latent", type=int, default=32, help="latent side (16 channels); pixels = 8 x this")
    ap.add_argument("--tokens", type=int, default=64, help="text tokens")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    sys.path.insert(0, str(COMFYUI))
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True
    import torch

    torch.set_num_threads(1)
    import comfy.supported_models

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
    # plain (non-inference) copies of the weights, as the autograd session provides them
    with torch.no_grad():
        for mod in net.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None:
                    mod._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, args.latent, args.latent, generator=gen)
    ctx = torch.randn(1, args.tokens, 128, generator=gen)
    y = torch.randn(1, 64, generator=gen)
    t = torch.tensor([0.6])

    def timed(fn):
        walls, cpus = [], []
        for _ in range(args.repeats):
            w, c = time.perf_counter(), time.process_time()
            fn()
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
        return statistics.median(walls), statistics.median(cpus)

    def plain():
        with torch.no_grad():
            net(x, t, ctx, y)

    saved = {"all": 0, "copied": 0}

    def pack(tensor):
        n = tensor.numel() * tensor.element_size()
        saved["all"] += n
        if tensor.requires_grad:
            saved["copied"] += n
            return tensor.clone()
        return tensor

    import comfy.model_management as mm

    def guided():
        # as the pack's guided passes run (nodes/grad_paths.torch_paths): where ComfyUI has the switch, its model
        # code takes the torch paths (newer versions' comfy-kitchen RoPE has no backward)
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

    guided()  # warm-up, and one forward's byte counts
    per_forward = dict(saved)
    result = {
        "config": vars(args),
        "saved_bytes_per_forward_MiB": per_forward["all"] / 2**20,
        "copied_bytes_per_forward_MiB": per_forward["copied"] / 2**20,
        "copied_fraction": per_forward["copied"] / max(per_forward["all"], 1),
        "plain_forward_s": dict(zip(("wall", "cpu"), timed(plain))),
        "guided_forward_backward_s": dict(zip(("wall", "cpu"), timed(guided))),
    }
    result["guided_over_plain_wall"] = result["guided_forward_backward_s"]["wall"] / result["plain_forward_s"]["wall"]
    out = REPO / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "flow_copies.json").write_text(json.dumps(result, indent=1))
    sys.stdout.write(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
