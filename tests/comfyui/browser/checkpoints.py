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

# SD3 / SD3.5 (MMDiT): ComfyUI's detection ties the width to the depth (64 per joint block, as many heads as
# blocks), so 2 joint blocks make a 128-wide, 2-head MMDiT (≈ 2M parameters); patch 2, 16 latent channels,
# a 64 x 64 patch position table (latents up to 128 x 128, 1024 px), pooled 2048 (CLIP-L + CLIP-G widths) and a
# 4096-wide context projected to 128. The checkpoint carries CLIP-L alone (``text_encoders.clip_l.``), which
# ComfyUI's SD3 text encoder accepts (CLIP-G and T5 absent: zeros in their places).
SD3_DEPTH = 2
SD3_UNET = {
    "in_channels": 16,
    "pos_embed_scaling_factor": None,
    "patch_size": 2,
    "depth": SD3_DEPTH,
    "num_patches": 64 * 64,
    "pos_embed_max_size": 64,
    "adm_in_channels": 2048,
    "context_embedder_config": {
        "target": "torch.nn.Linear",
        "params": {"in_features": 4096, "out_features": 64 * SD3_DEPTH},
    },
}

EXPECTED_CLASS = {"sd15": "SD15", "sdxl": "SDXL", "sd3": "SD3"}
# The file names ComfyUI's own default graph and templates use (the workflows name them too).
FILE_NAMES = {
    "sd15": "v1-5-pruned-emaonly-fp16.safetensors",
    "sdxl": "sd_xl_base_1.0.safetensors",
    "sd3": "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors",  # ours holds CLIP-L alone (above)
}
# Tiny transformers models (save_pretrained folders) under the names the workflows' loaders default to.
TINY_FOLDERS = {
    "blip": "blip/blip-image-captioning-base",
    "dino": "dino/dino-vitb8",
    "clip_metric": "clip_metric/clip-vit-large-patch14",
}


def _vae_ddconfig(z_channels: int) -> dict:
    """The SD VAE's ``ddconfig`` (fixed by ComfyUI's VAE loader) with ``z_channels`` latent channels."""
    return {
        "double_z": True,
        "z_channels": z_channels,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 128,
        "ch_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [],
        "dropout": 0.0,
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
    """tiny_models' seeded random parameters (the tests' own rule), and the position ids a CLIP's buffers need."""
    import torch

    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/comfyui
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from tiny_models import _init_ as init_parameters

    with torch.no_grad():
        init_parameters(module, seed)
        for name, b in module.named_buffers():
            if name.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1]).expand_as(b))


def _state_dict_for_saving(base, clip_sd: dict, vae_sd: dict) -> dict:
    """``BaseModel.state_dict_for_saving``: up to 0.3.x it reads the UNet itself; later versions (0.33) take the
    UNet's state dict as their first argument (without it the file would have no UNet). Told from the signature."""
    import inspect

    if "unet_state_dict" in inspect.signature(base.state_dict_for_saving).parameters:
        return base.state_dict_for_saving(base.diffusion_model.state_dict(), clip_sd, vae_sd)
    return base.state_dict_for_saving(clip_sd, vae_sd)


def build(kind: str, path: str, seed: int = 0) -> dict:
    """Write the ``kind`` ("sd15" / "sdxl") checkpoint to ``path``; returns what ComfyUI detects on reload."""
    import comfy.model_management as mm
    import comfy.sd
    import comfy.supported_models as sm
    import comfy.utils
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config_cls = {"sd15": sm.SD15, "sdxl": sm.SDXL, "sd3": sm.SD3}[kind]
    unet = dict(SD3_UNET) if kind == "sd3" else _common(SD15_UNET if kind == "sd15" else SDXL_UNET)
    t0 = time.time()
    with torch.inference_mode(False):
        cfg = config_cls(dict(unet))
        cfg.set_inference_dtype(torch.float16, None)
        base = cfg.get_model({})
        _init_(base.diffusion_model, seed)
        if kind == "sd3":
            import comfy.text_encoders.sd3_clip as sd3_clip
            from comfy import supported_models_base

            target = supported_models_base.ClipTarget(
                sd3_clip.SD3Tokenizer, sd3_clip.sd3_clip(clip_l=True, clip_g=False, t5=False)
            )
        else:
            target = cfg.clip_target()
        clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float16})
        _init_(clip.cond_stage_model, seed + 1)
        ddconfig = _vae_ddconfig(16 if kind == "sd3" else 4)
        vae_model = AutoencoderKL(ddconfig=ddconfig, embed_dim=ddconfig["z_channels"])
        _init_(vae_model, seed + 2)
        sd = _state_dict_for_saving(base, clip.get_sd(), dict(vae_model.state_dict()))
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


# Flux-dev: ComfyUI's detection hard-codes the width (3072, 24 heads, 4096-wide context, RoPE axes 16/56/56) and
# counts the blocks, so 1 double + 1 single block is the smallest Flux it loads (≈ 0.5B parameters, stored in
# fp16: ≈ 1 GB). Flux ships as four files for the stock loaders: the diffusion model (Load Diffusion Model),
# the 16-channel VAE (Load VAE) and CLIP-L + T5-XXL (DualCLIPLoader, type flux). T5-XXL cannot shrink (its
# detection reads block 23): random weights stored in fp8 (e4m3fn) as users' t5xxl_fp8_e4m3fn file is, 4.7 GB,
# generated tensor by tensor so the 19 GB of fp32 weights never exist at once.
FLUX_DIT = {
    "image_model": "flux",
    "in_channels": 16,
    "patch_size": 2,
    "out_channels": 16,
    "vec_in_dim": 768,
    "context_in_dim": 4096,
    "hidden_size": 3072,
    "mlp_ratio": 4.0,
    "num_heads": 24,
    "depth": 1,
    "depth_single_blocks": 1,
    "axes_dim": [16, 56, 56],
    "theta": 10000,
    "qkv_bias": True,
    "guidance_embed": True,
}
#: file -> ComfyUI models folder, for the Flux kind (the names ComfyUI's Flux examples use)
FLUX_FILES = {
    "flux1-dev.safetensors": "diffusion_models",
    "ae.safetensors": "vae",
    "clip_l.safetensors": "text_encoders",
    "t5xxl_fp8_e4m3fn.safetensors": "text_encoders",
}


def _random_state_dict(module, seed: int, dtype) -> dict:
    """Seeded random weights for every parameter / buffer shape of ``module`` (which may live on "meta"),
    scaled like ``_init_``, cast to ``dtype`` one tensor at a time."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in list(module.named_parameters()) + list(module.named_buffers()):
        if p.ndim >= 2:
            t = torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5
        elif name.endswith("weight") or name.endswith("scale"):
            t = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        else:
            t = 0.02 * torch.randn(p.shape, generator=gen)
        out[name] = t.to(dtype).contiguous()
    return out


def build_flux(out: str, seed: int = 0) -> dict:
    """Write the four Flux-dev files into ``out``; returns what the stock loaders detect on reload."""
    import json as _json

    import comfy.sd
    import comfy.supported_models as sm
    import comfy.text_encoders.t5 as t5
    import comfy.utils
    import torch
    from comfy.ldm.flux.model import FluxParams
    from comfy.ldm.models.autoencoder import AutoencoderKL

    dit_config = dict(FLUX_DIT)
    if "txt_ids_dims" in FluxParams.__dataclass_fields__:  # required from 0.33 on (Flux-1: no text-position axes)
        dit_config["txt_ids_dims"] = []
    t0 = time.time()
    with torch.inference_mode(False):
        cfg = sm.Flux(dit_config)
        cfg.set_inference_dtype(torch.float16, None)
        with torch.device("meta"):
            dit = cfg.get_model({}).diffusion_model
        comfy.utils.save_torch_file(
            _random_state_dict(dit, seed, torch.float16), os.path.join(out, "flux1-dev.safetensors")
        )
        del dit
        ddconfig = _vae_ddconfig(16)
        vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=16)
        _init_(vae, seed + 2)
        vae_sd = {k: v.detach().to(torch.float16).contiguous() for k, v in vae.state_dict().items()}
        comfy.utils.save_torch_file(vae_sd, os.path.join(out, "ae.safetensors"))
        del vae, vae_sd
        import comfy.sd1_clip

        clip_l = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, dtype=torch.float16)
        _init_(clip_l, seed + 1)
        clip_sd = {k: v.detach().to(torch.float16).contiguous() for k, v in clip_l.transformer.state_dict().items()}
        comfy.utils.save_torch_file(clip_sd, os.path.join(out, "clip_l.safetensors"))
        del clip_l, clip_sd
        t5_config = _json.load(open(os.path.join(os.path.dirname(t5.__file__), "t5_config_xxl.json")))
        with torch.device("meta"):
            t5_model = t5.T5(t5_config, torch.float32, "meta", torch.nn)
        comfy.utils.save_torch_file(
            _random_state_dict(t5_model, seed + 3, torch.float8_e4m3fn),
            os.path.join(out, "t5xxl_fp8_e4m3fn.safetensors"),
        )
        del t5_model
    built = time.time() - t0

    import comfy.sd as sd_mod

    model = sd_mod.load_diffusion_model(os.path.join(out, "flux1-dev.safetensors"))
    clip = sd_mod.load_clip(
        [os.path.join(out, "clip_l.safetensors"), os.path.join(out, "t5xxl_fp8_e4m3fn.safetensors")],
        clip_type=sd_mod.CLIPType.FLUX,
    )
    info = {
        "kind": "flux",
        "files": {name: os.path.getsize(os.path.join(out, name)) for name in FLUX_FILES},
        "detected": type(model.model.model_config).__name__,
        "guidance_embed": model.model.model_config.unet_config.get("guidance_embed"),
        "clip": type(clip.cond_stage_model).__name__,
        "seconds": round(built, 1),
    }
    del model, clip
    if info["detected"] != "Flux":
        raise RuntimeError(f"Flux files: ComfyUI detected {info['detected']}: {info}")
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
    ap.add_argument("kinds", nargs="+", choices=sorted(FILE_NAMES) + ["flux", "tiny"])
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
        elif kind == "flux":
            infos[kind] = build_flux(a.out)
        else:
            infos[kind] = build(kind, os.path.join(a.out, FILE_NAMES[kind]))
        print(json.dumps(infos[kind]), flush=True)
    with open(os.path.join(a.out, f"info-{'-'.join(a.kinds)}.json"), "w") as f:
        json.dump(infos, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
