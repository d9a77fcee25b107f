"""Tiny random vision models for tests (no hub, no weights): a DINO-layout ``ViTModel`` and a full ``CLIPModel``.

- :func:`tiny_dino` / :func:`tiny_dino_folder`: ViT with patch 8 at 224 px (785 tokens, like
  ``facebook/dino-vitb8``) but 32 wide, 4 heads, 2 blocks.
- :func:`tiny_clip_metric_folder`: a random ``CLIPModel`` (text + vision, 32 px images) saved with a
  character-level CLIP tokenizer (``tiny_text.write_clip_tokenizer``) and a ``preprocessor_config.json``.
- :func:`write_images`: a few small PNGs for manifests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .tiny_text import TINY_TOWER, load_clip_tokenizer, write_clip_tokenizer


def tiny_dino_config(image_size: int = 224, hidden: int = 32, heads: int = 4, layers: int = 2) -> dict:
    """``ViTConfig`` keywords of DINO ViT-B/8's layout (patch 8, 224 px: 785 tokens) at a tiny width."""
    return dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        image_size=image_size,
        patch_size=8,
        layer_norm_eps=1e-6,
    )


def tiny_dino(seed: int = 0, image_size: int = 224, hidden: int = 32, heads: int = 4, layers: int = 2):
    """A seeded random ``ViTModel`` (no pooler) of :func:`tiny_dino_config`, eval mode, fp32."""
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(**tiny_dino_config(image_size, hidden, heads, layers))
    torch.manual_seed(seed)
    return ViTModel(cfg, add_pooling_layer=False).eval().requires_grad_(False)


def tiny_dino_folder(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Save :func:`tiny_dino` to ``folder`` (transformers ``save_pretrained`` layout); returns the folder."""
    folder = Path(folder)
    tiny_dino(seed).save_pretrained(os.fspath(folder))
    return folder


def tiny_clip_metric(folder: str | os.PathLike, seed: int = 0, image_size: int = 32):
    """``(model, tokenizer)``: a random tiny ``CLIPModel`` and a tokenizer written to ``folder``."""
    from transformers import CLIPConfig, CLIPModel

    tok = load_clip_tokenizer(write_clip_tokenizer(folder))
    text = dict(
        vocab_size=len(tok),
        **TINY_TOWER,
        max_position_embeddings=77,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        **TINY_TOWER,
        image_size=image_size,
        patch_size=8,
    )
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    torch.manual_seed(seed)
    return CLIPModel(cfg).eval(), tok


def tiny_clip_metric_folder(folder: str | os.PathLike, seed: int = 0, image_size: int = 32) -> Path:
    """Save a tiny random CLIP (model, tokenizer, preprocessor config) to ``folder``; returns the folder."""
    folder = Path(folder)
    model, tok = tiny_clip_metric(folder, seed, image_size)
    model.save_pretrained(os.fspath(folder))
    tok.save_pretrained(os.fspath(folder))
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "crop_size": {"height": image_size, "width": image_size},
                "do_center_crop": True,
                "size": {"shortest_edge": image_size},
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "image_processor_type": "CLIPImageProcessor",
            }
        )
    )
    return folder


def random_image(seed: int, height: int = 32, width: int = 32, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A smooth-ish random ``(1, 3, H, W)`` image in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, max(2, height // 8), max(2, width // 8), generator=g, dtype=torch.float64)
    img = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
    img = (img + 0.1 * torch.rand(1, 3, height, width, generator=g, dtype=torch.float64)).clamp(0, 1)
    return img.to(dtype)


def write_png(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write ``(1, 3, H, W)`` in [0, 1] (or a ``(H, W)`` mask) as an 8-bit PNG."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if image.ndim == 2:
        arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(arr).save(path)
    else:
        arr = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(np.ascontiguousarray(arr)).save(path)
    return path
