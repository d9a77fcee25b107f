"""Write tiny diffusers models as one original-layout (LDM) Stable Diffusion checkpoint file, as
ComfyUI/models/checkpoints holds them: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE),
``cond_stage_model.transformer.*`` (SD1 CLIP) or ``conditioner.embedders.{0,1}.*`` (SDXL CLIP-L + OpenCLIP-G).

The key maps invert diffusers' single-file converters (``diffusers.loaders.single_file_utils``) for any number
of levels and layers per block; ``test_sd_models_single_file`` checks them by converting back with diffusers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

_RESNET = (  # diffusers -> LDM names inside a UNet resnet
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)


def _rename(rest: str, table) -> str:
    for new, old in table:
        if rest.startswith(new + ".") or rest == new:
            return old + rest[len(new) :]
    return rest


def unet_to_ldm(sd: dict, config: dict) -> dict:
    """Diffusers ``UNet2DConditionModel`` state dict -> ``model.diffusion_model.*`` keys."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if config.get("addition_embed_type") == "text_time":
        fixed.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    per = config["layers_per_block"] + 1
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if key in fixed:
            ldm = fixed[key]
        elif parts[0] == "down_blocks":
            b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                ldm = f"input_blocks.{1 + b * per + j}.0.{_rename(rest, _RESNET)}"
            elif kind == "attentions":
                ldm = f"input_blocks.{1 + b * per + j}.1.{rest}"
            else:  # downsamplers.0.conv.*
                ldm = f"input_blocks.{1 + b * per + per - 1}.0.op.{parts[-1]}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":
                ldm = f"middle_block.{2 * j}.{_rename(rest, _RESNET)}"
            else:
                ldm = f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                ldm = f"output_blocks.{b * per + j}.0.{_rename(rest, _RESNET)}"
            elif kind == "attentions":
                ldm = f"output_blocks.{b * per + j}.1.{rest}"
            else:  # upsamplers.0.conv.*: after the attention when the block has one
                has_attn = any(k.startswith(f"up_blocks.{b}.attentions.") for k in sd)
                ldm = f"output_blocks.{b * per + per - 1}.{2 if has_attn else 1}.conv.{parts[-1]}"
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
        out["model.diffusion_model." + ldm] = value
    return out


_VAE_ATTN = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)


def vae_to_ldm(sd: dict, config: dict) -> dict:
    """Diffusers ``AutoencoderKL`` state dict -> ``first_stage_model.*`` keys (attention weights as 1x1 convs)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n_up = len(config["up_block_types"])
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if key in fixed:
            ldm = fixed[key]
        elif parts[1] == "down_blocks":
            i, kind = int(parts[2]), parts[3]
            if kind == "resnets":
                rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
                ldm = f"encoder.down.{i}.block.{parts[4]}.{rest}"
            else:
                ldm = f"encoder.down.{i}.downsample.conv.{parts[-1]}"
        elif parts[1] == "up_blocks":
            i, kind = n_up - 1 - int(parts[2]), parts[3]
            if kind == "resnets":
                rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
                ldm = f"decoder.up.{i}.block.{parts[4]}.{rest}"
            else:
                ldm = f"decoder.up.{i}.upsample.conv.{parts[-1]}"
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            rest = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
            ldm = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{rest}"
        elif parts[1] == "mid_block":
            ldm = f"{parts[0]}.mid.attn_1.{_rename('.'.join(parts[4:]), _VAE_ATTN)}"
            if value.ndim == 2:
                value = value[:, :, None, None]
        else:
            raise KeyError(f"no LDM name for VAE key {key}")
        out["first_stage_model." + ldm] = value
    return out


def clip_to_ldm(sd: dict, prefix: str = "cond_stage_model.transformer.") -> dict:
    """transformers ``CLIPTextModel`` state dict -> ``<prefix>text_model.*`` (OpenAI CLIP-L layout)."""
    out = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        out[prefix + (key if key.startswith("text_model.") else "text_model." + key)] = value
    return out


def open_clip_to_ldm(sd: dict, prefix: str = "conditioner.embedders.1.model.") -> dict:
    """transformers ``CLIPTextModelWithProjection`` state dict -> OpenCLIP layout (SDXL's second encoder):
    fused ``in_proj`` attention, ``resblocks``, ``ln_final``, transposed ``text_projection``."""
    table = (
        ("layer_norm1", "ln_1"),
        ("layer_norm2", "ln_2"),
        ("mlp.fc1", "mlp.c_fc"),
        ("mlp.fc2", "mlp.c_proj"),
        ("self_attn.out_proj", "attn.out_proj"),
    )
    fixed = {
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    out = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        if key in fixed:
            out[prefix + fixed[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif key.startswith("text_model.encoder.layers."):
            parts = key.split(".")
            layer, rest = parts[3], ".".join(parts[4:])
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                if not rest.startswith("self_attn.q_proj."):
                    continue  # fused with q below
                kind = rest.split(".")[-1]
                base = f"text_model.encoder.layers.{layer}.self_attn."
                fused = torch.cat([sd[base + f"{p}_proj.{kind}"] for p in "qkv"], 0)
                out[prefix + f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = fused
            else:
                out[prefix + f"transformer.resblocks.{layer}.{_rename(rest, table)}"] = value
        else:
            raise KeyError(f"no OpenCLIP name for key {key}")
    return out


def write_checkpoint(
    path: str | os.PathLike, unet, vae, text_encoder, text_encoder_2=None, dtype: torch.dtype = torch.float32
) -> Path:
    """One LDM-layout checkpoint of the given models: ``.safetensors`` or ``.ckpt`` (by ``path``'s suffix);
    SDXL when ``text_encoder_2`` is given."""
    sd = unet_to_ldm(unet.state_dict(), dict(unet.config))
    sd.update(vae_to_ldm(vae.state_dict(), dict(vae.config)))
    if text_encoder_2 is None:
        sd.update(clip_to_ldm(text_encoder.state_dict()))
    else:
        sd.update(clip_to_ldm(text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
        sd.update(open_clip_to_ldm(text_encoder_2.state_dict()))
    sd = {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}
    path = Path(path)
    if path.suffix == ".ckpt":
        torch.save({"state_dict": sd}, path)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    return path
