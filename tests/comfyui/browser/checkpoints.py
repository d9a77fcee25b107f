"""Random-weight checkpoints that ComfyUI's stock CheckpointLoaderSimple loads and detects as SD1.5 / SDXL.

Run as a script inside ComfyUI's environment (the browser test does, in a subprocess, so the memory is
given back before the server starts)::

    <comfy-python> tests/comfyui/browser/checkpoints.py --comfyui ~/ComfyUI --out DIR sd15 sdxl

ComfyUI picks the model family from the UNet state dict (``comfy/model_detection.py::detect_unet_config``,
then the first class of ``comfy/supported_models.py::models`` whose ``unet_config`` entries all match).
Only the entries listed in that class's ``unet_config`` must match; the rest (number of levels, channel
multipliers, res blocks per level, output / middle transformer depths) is read from the state dict. So:

- **SD1.5** (``SD15.unet_config``: context_dim 768, model_channels 320, no linear projections, no ADM):
  320 channels, 2 levels with channel_mult [1, 1], 1 res block and 1 transformer block each, middle depth 1
  (≈ 37M UNet parameters instead of 860M).
- **SDXL** (``SDXL.unet_config``: model_channels 320, transformer_depth [0, 0, 2, 2, 10, 10], context 2048,
  ADM 2816, linear projections): the per-input-block depths are fixed, so 3 levels x 2 res blocks with
  2 and 10 transformer blocks, but channel_mult [1, 1, 1] keeps every level 320 wide, and the output and
  middle depths are 1 (≈ 140M UNet parameters instead of 2.6B). It is detected as ``SDXL`` itself, not as
  a distilled variant (SSD-1B, Vega, KOALA), and sampled through ``model_base.SDXL``.
- The text encoders and the VAE cannot shrink: ComfyUI builds them from fixed configs (CLIP-L, OpenCLIP
  bigG, the SD VAE) and a state dict of another shape does not load. They are random too; stored in fp16.

Weights are seeded random normals (``comfy.ops`` leaves parameters uninitialised). After writing, the
file is loaded back with ``comfy.sd.load_checkpoint_guess_config`` and the detected class is checked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

SD15_UNET = {
    "model_channels": 320,
    "channel_mult": [1, 1],
    "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 768,
    "use_linear_in_transformer": False,
    "adm_in_channels": None,
}

SDXL_UNET = {
    "model_channels": 320,
    "channel_mult": [1, 1, 1],
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 2048,
    "use_linear_in_transformer": True,
    "adm_in_channels": 2816,
    "num_classes": "sequential",
}

EXPECTED_CLASS = {"sd15": "SD15", "sdxl": "SDXL"}
# The file names ComfyUI's own default graph and templates use (the workflows name them too).
FILE_NAMES = {"sd15": "v1-5-pruned-emaonly-fp16.safetensors", "sdxl": "sd_xl_base_1.0.safetensors"}
# Tiny transformers models (save_pretrained folders) under the names the workflows' loaders default to.
TINY_FOLDERS = {
    "blip": "blip/blip-image-captioning-base",
    "dino": "dino/dino-vitb8",
    "clip_metric": "clip_metric/clip-vit-large-patch14",
}


def _common(cfg: dict) -> dict:
    out = {
        "use_checkpoint": False,
        "image_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "use_spatial_transformer": True,
        "legacy": False,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }
    out.update(cfg)
    return out


def _init_(module, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
            elif name.endswith("weight"):  # norms
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        for name, b in module.named_buffers():
            if name.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1]).expand_as(b))


def build(kind: str, path: str, seed: int = 0) -> dict:
    """Write the ``kind`` ("sd15" / "sdxl") checkpoint to ``path``; returns what ComfyUI detects on reload."""
    import comfy.model_management as mm
    import comfy.sd
    import comfy.supported_models as sm
    import comfy.utils
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config_cls = {"sd15": sm.SD15, "sdxl": sm.SDXL}[kind]
    unet = _common(SD15_UNET if kind == "sd15" else SDXL_UNET)
    t0 = time.time()
    with torch.inference_mode(False):
        cfg = config_cls(dict(unet))
        cfg.set_inference_dtype(torch.float16, None)
        base = cfg.get_model({})
        _init_(base.diffusion_model, seed)
        clip = comfy.sd.CLIP(cfg.clip_target(), model_options={"dtype": torch.float16})
        _init_(clip.cond_stage_model, seed + 1)
        ddconfig = {
            "double_z": True,
            "z_channels": 4,
            "resolution": 256,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 128,
            "ch_mult": [1, 2, 4, 4],
            "num_res_blocks": 2,
            "attn_resolutions": [],
            "dropout": 0.0,
        }
        vae_model = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
        _init_(vae_model, seed + 2)
        sd = base.state_dict_for_saving(clip.get_sd(), {k: v for k, v in vae_model.state_dict().items()})
        sd = {
            k: v.detach().to(torch.float16).contiguous() if v.is_floating_point() else v.contiguous()
            for k, v in sd.items()
        }
    n_unet = sum(v.numel() for k, v in sd.items() if k.startswith("model.diffusion_model."))
    n_all = sum(v.numel() for v in sd.values())
    del base, clip, vae_model
    tmp = path + ".part"
    comfy.utils.save_torch_file(sd, tmp)
    del sd
    os.replace(tmp, path)
    built = time.time() - t0

    # Load it back the way CheckpointLoaderSimple does and check the detected family.
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)
    detected = type(model.model.model_config).__name__
    uc = model.model.model_config.unet_config
    info = {
        "kind": kind,
        "file": os.path.basename(path),
        "bytes": os.path.getsize(path),
        "unet_parameters": n_unet,
        "parameters": n_all,
        "detected": detected,
        "unet_config": {
            k: uc.get(k)
            for k in (
                "model_channels",
                "channel_mult",
                "num_res_blocks",
                "transformer_depth",
                "transformer_depth_output",
                "transformer_depth_middle",
                "context_dim",
                "adm_in_channels",
                "num_head_channels",
                "num_heads",
            )
        },
        "clip": type(clip.cond_stage_model).__name__ if clip is not None else None,
        "vae": vae is not None,
        "seconds": round(built, 1),
    }
    del model, clip, vae
    mm.soft_empty_cache()
    if detected != EXPECTED_CLASS[kind]:
        raise RuntimeError(f"{path}: ComfyUI detected {detected}, expected {EXPECTED_CLASS[kind]}: {info}")
    return info


def build_tiny(out: str) -> dict:
    """Tiny random BLIP / DINO / CLIP-metric folders (the builders of the pack's other tests) under ``out``."""
    repo = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
    sys.path.insert(0, os.path.join(repo, "tests", "comfyui"))
    sys.path.insert(0, repo)
    from tiny_clip import save_blip

    from tests.core.tiny_vision import tiny_clip_metric_folder, tiny_dino_folder

    folders = {k: os.path.join(out, v) for k, v in TINY_FOLDERS.items()}
    save_blip(folders["blip"], mode="words")  # never emits an end token: captions are never empty
    tiny_dino_folder(folders["dino"])
    tiny_clip_metric_folder(folders["clip_metric"])
    return folders


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfyui", required=True, help="ComfyUI checkout")
    ap.add_argument("--out", required=True, help="folder for the .safetensors files (and info.json)")
    ap.add_argument("kinds", nargs="+", choices=sorted(FILE_NAMES) + ["tiny"])
    a = ap.parse_args(argv)
    sys.path.insert(0, os.path.abspath(a.comfyui))
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True
    import torch

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    os.makedirs(a.out, exist_ok=True)
    infos = {}
    for kind in a.kinds:
        if kind == "tiny":
            infos[kind] = build_tiny(a.out)
        else:
            infos[kind] = build(kind, os.path.join(a.out, FILE_NAMES[kind]))
        print(json.dumps(infos[kind]), flush=True)
    with open(os.path.join(a.out, f"info-{'-'.join(a.kinds)}.json"), "w") as f:
        json.dump(infos, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
