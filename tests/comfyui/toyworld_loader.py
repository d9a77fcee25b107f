"""Test-only loader: the trained toy-world model (tests/data/toyworld/model, diffusers layout; docs/toyworld.md)
as ComfyUI objects (a ``ModelPatcher``, a ``comfy.sd.CLIP`` and a ``comfy.sd.VAE``) built from ComfyUI's own
classes, so the nodes can run on a model that has learned something.

ComfyUI detects no family in it (context 64, 32 channels, a 2x VAE), so the parts are built by hand:

- UNet: ComfyUI's SD1.5 class with the toy UNet's shape; the diffusers weights are renamed by ComfyUI's own
  ``comfy.utils.unet_to_diffusers`` map (what its diffusers-format loader uses); the latent format is SD1.5's
  with the toy VAE's ``scaling_factor``.
- CLIP: ``SD1ClipModel`` with the toy text encoder's config and an ``SDTokenizer`` over the toy vocabulary.
- VAE: ComfyUI's ``AutoencoderKL`` of the toy VAE's shape (2x, 4 latent channels), diffusers weights converted by
  ``comfy.sd.VAE`` itself.
- The toy model's GroupNorms have 16 groups; ComfyUI's SD modules hard-code 32, so every GroupNorm built here
  is set to 16 groups (the one change to ComfyUI's modules).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

MODEL = Path(
    os.environ.get("ZEROCON_TOYWORLD_MODEL", Path(__file__).resolve().parents[1] / "data" / "toyworld" / "model")
)
GROUPS = 16
CLIP_VOCAB = 49408  # ComfyUI's CLIPEmbeddings size, whatever the config says


def _json(part: str) -> dict:
    return json.loads((MODEL / part / "config.json").read_text())


def _weights(part: str, name: str) -> dict:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(MODEL / part / name)).items()}


def _groups(module: torch.nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.num_groups = GROUPS


def _shift_up(key: str, shift: int) -> str:
    prefix = "decoder.up_blocks."
    if not key.startswith(prefix):
        return key
    index, rest = key[len(prefix) :].split(".", 1)
    return f"{prefix}{int(index) + shift}.{rest}"


def unet_config() -> dict:
    """ComfyUI's UNet config of the toy UNet (3 levels 32/64/64, attention at the first two, 4 heads)."""
    cfg = _json("unet")
    depth = [1 if "CrossAttn" in b else 0 for b in cfg["down_block_types"]]
    return {
        "use_checkpoint": False,
        "image_size": cfg["sample_size"],
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_channels"],
        "model_channels": cfg["block_out_channels"][0],
        "channel_mult": [c // cfg["block_out_channels"][0] for c in cfg["block_out_channels"]],
        "num_res_blocks": [cfg["layers_per_block"]] * len(depth),
        "transformer_depth": depth,
        # ComfyUI lists the output depths last output block first (it pops them from the end)
        "transformer_depth_output": [d for d in depth for _ in range(cfg["layers_per_block"] + 1)],
        "transformer_depth_middle": 1,
        "use_spatial_transformer": True,
        "legacy": False,
        "context_dim": cfg["cross_attention_dim"],
        "use_linear_in_transformer": bool(cfg.get("use_linear_projection", False)),
        "adm_in_channels": None,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
        "num_heads": cfg["attention_head_dim"],
        "num_head_channels": -1,
        "dtype": torch.float32,
    }


def model():
    """The toy UNet as a ``ModelPatcher`` (EPS, SD1.x schedule, the toy latent scale)."""
    import comfy.latent_formats
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    uc = unet_config()
    config = comfy.supported_models.SD15(dict(uc))
    config.unet_config["num_heads"] = uc["num_heads"]
    config.unet_config["num_head_channels"] = -1
    scale = _json("vae")["scaling_factor"]
    # SD1.5's latent format (the pack tells families by its type) with the toy VAE's scale
    fmt = comfy.latent_formats.SD15()
    fmt.scale_factor = scale
    config.latent_format = (
        fmt
        if not isinstance(config.latent_format, type)
        else type("ToyWorldLatent", (comfy.latent_formats.SD15,), {"scale_factor": scale})
    )
    keys = comfy.utils.unet_to_diffusers(config.unet_config)
    sd = _weights("unet", "diffusion_pytorch_model.safetensors")
    ldm = {"model.diffusion_model." + keys[k]: v for k, v in sd.items() if k in keys}
    missing = sorted(set(sd) - set(keys))
    if missing:
        raise KeyError(f"toy UNet weights without a ComfyUI name: {missing[:5]}")
    with torch.inference_mode():
        base = config.get_model({})
        _groups(base.diffusion_model)
        base.load_model_weights(ldm, "model.diffusion_model.")
        base.eval()
        return comfy.model_patcher.ModelPatcher(
            base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
        )


class _Target:
    def __init__(self, clip_cls, tokenizer_cls):
        self.params = {}
        self.clip = clip_cls
        self.tokenizer = tokenizer_cls


def clip():
    """The toy text encoder and tokenizer as a ``comfy.sd.CLIP``."""
    import comfy.sd
    import comfy.sd1_clip

    cfg = _json("text_encoder")
    text = {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")}
    text.update(projection_dim=cfg["hidden_size"], hidden_act=cfg["hidden_act"], vocab_size=cfg["vocab_size"])
    text.update(max_position_embeddings=cfg["max_position_embeddings"], layer_norm_eps=cfg["layer_norm_eps"])
    tok = functools.partial(
        comfy.sd1_clip.SDTokenizer, tokenizer_path=str(MODEL / "tokenizer"), embedding_size=cfg["hidden_size"]
    )
    tokenizer = functools.partial(comfy.sd1_clip.SD1Tokenizer, tokenizer=tok)
    target = _Target(comfy.sd1_clip.SD1ClipModel, tokenizer)
    with torch.inference_mode():
        c = comfy.sd.CLIP(target, model_options={"clip_l_model_config": text, "dtype": torch.float32})
        sd = _weights("text_encoder", "model.safetensors")
        sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}
        emb = "text_model.embeddings.token_embedding.weight"  # ComfyUI's CLIP has 49408 token rows: pad ours
        sd[emb] = torch.cat([sd[emb], sd[emb].new_zeros(CLIP_VOCAB - sd[emb].shape[0], sd[emb].shape[1])])
        missing, unexpected = c.load_sd(sd)
    missing = [k for k in missing if k != "text_projection.weight"]  # pooled output: SD1.x does not use it
    if missing or unexpected:
        raise KeyError(f"toy text encoder does not load: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return c


def vae():
    """The toy VAE as a ``comfy.sd.VAE`` (2x down / up, 4 latent channels)."""
    import comfy.sd
    from comfy import diffusers_convert

    cfg = _json("vae")
    ch = cfg["block_out_channels"]
    config = {
        "params": {
            "embed_dim": cfg["latent_channels"],
            "ddconfig": {
                "double_z": True,
                "z_channels": cfg["latent_channels"],
                "resolution": cfg["sample_size"],
                "in_channels": cfg["in_channels"],
                "out_ch": cfg["out_channels"],
                "ch": ch[0],
                "ch_mult": [c // ch[0] for c in ch],
                "num_res_blocks": cfg["layers_per_block"],
                "attn_resolutions": [],
                "dropout": 0.0,
            },
        }
    }
    # comfy's diffusers converter maps decoder up_blocks.i to up.(3 - i) (SD's 4 levels): shift ours to match
    shift = 4 - len(ch)
    sd = {_shift_up(k, shift): v for k, v in _weights("vae", "diffusion_pytorch_model.safetensors").items()}
    sd = diffusers_convert.convert_vae_state_dict(sd)  # comfy.sd.VAE would not (it looks for up_blocks.0)
    with torch.inference_mode():
        v = comfy.sd.VAE(sd=sd, config=config)
    _groups(v.first_stage_model)
    v.downscale_ratio = v.upscale_ratio = 2 ** (len(ch) - 1)
    return v
