"""DINO ViT features (DiffuseIT's structure/style features; PIE-Bench's structure metric).

The model is a transformers ``ViTModel`` in ``save_pretrained`` layout of ``facebook/dino-vitb8`` (ViT-B/8,
12 blocks, 12 heads, 768 dims), loaded only from a local folder: nothing is downloaded here, and
transformers is imported lazily.

What DiffuseIT / Splice / PIE-Bench take from it (docs/method.md §8):

- preprocessing: short side to 224 px (long side capped at 480, aspect kept; torchvision's
  ``Resize(224, max_size=480)``), bilinear with antialiasing, then ImageNet normalisation;
- **keys**: the key projection of the last block (index 11), heads concatenated per token, [CLS] row
  included: ``(B, 1 + h*w, 768)``, 785 tokens at 224 x 224;
- **[CLS]**: token 0 of the last block's output, *before* the final LayerNorm.

Inputs whose resized size is not 224 x 224 (non-square images) use transformers' position-embedding
interpolation, which is close to but not bit-identical with the original DINO hub code's; square inputs
(PIE-Bench's 512 x 512) need none.

Nothing here disables autograd: gradients flow to the input images when the caller enables them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common.log import logger
from ..common.model_folders import WEIGHTS, ModelFolder, check_model_folder

__all__ = [
    "DINO_FOLDER",
    "DINO_MODEL_ID",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DinoFeatures",
    "check_dino_folder",
    "dino_features",
    "dino_keys",
    "dino_resize_shape",
    "key_self_similarity",
    "load_dino",
    "preprocess_dino",
]

DINO_MODEL_ID = "facebook/dino-vitb8"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_SIZE = 224
DINO_MAX_SIZE = 480

DINO_FOLDER = ModelFolder(
    kind="DINO ViT model", model_id=DINO_MODEL_ID, required=(("config.json",), WEIGHTS), saved_by="ViTModel"
)


def check_dino_folder(folder: str | os.PathLike, model_id: str | None = None) -> None:
    """Raise ``FileNotFoundError`` naming ``folder`` and the model id (default: ``DINO_MODEL_ID``) when the
    folder is missing or incomplete."""
    check_model_folder(folder, DINO_FOLDER, model_id)


def load_dino(folder: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """Load a DINO ``ViTModel`` (no pooler) from a local folder (``local_files_only``), eval mode, frozen."""
    folder = os.fspath(folder)
    check_dino_folder(folder)
    from transformers import ViTModel

    model = ViTModel.from_pretrained(folder, add_pooling_layer=False, local_files_only=True)
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    logger.info("loaded DINO ViT from %s (%s, %s)", folder, device, dtype)
    return model


def dino_resize_shape(
    height: int, width: int, size: int = DINO_SIZE, max_size: int | None = DINO_MAX_SIZE
) -> tuple[int, int]:
    """torchvision ``Resize(size, max_size)`` output shape: short side -> ``size``, long side capped at ``max_size``."""
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = size, int(size * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_short, new_long) if height <= width else (new_long, new_short)


def preprocess_dino(images: Tensor, size: int = DINO_SIZE, max_size: int | None = DINO_MAX_SIZE) -> Tensor:
    """``(B, 3, H, W)`` in [0, 1] -> resized (bilinear, antialias) and ImageNet-normalised ``(B, 3, h, w)``."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"DINO expects images shaped (B, 3, H, W), got {tuple(images.shape)}")
    h, w = dino_resize_shape(images.shape[-2], images.shape[-1], size, max_size)
    x = images
    if (h, w) != tuple(images.shape[-2:]):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def _last_layer(model: Any) -> Any:
    """The last transformer block of a transformers ViTModel (v5 ``model.layers``; v4 ``model.encoder.layer``)."""
    layers = getattr(model, "layers", None)
    if layers is None:
        encoder = getattr(model, "encoder", None)
        layers = getattr(encoder, "layer", None)
    if layers is None or len(layers) == 0:
        raise TypeError(f"not a transformers ViTModel (no transformer blocks found): {type(model).__name__}")
    return layers[-1]


def _key_projection(layer: Any) -> torch.nn.Module:
    """The key ``nn.Linear`` of a ViT block (v5 ``attention.k_proj``; v4 ``attention.attention.key``)."""
    attn = layer.attention
    for path in (("k_proj",), ("attention", "key"), ("key",)):
        mod = attn
        for name in path:
            mod = getattr(mod, name, None)
            if mod is None:
                break
        if isinstance(mod, torch.nn.Linear):
            return mod
    raise TypeError(f"cannot find the key projection in {type(layer).__name__}")


@dataclass
class DinoFeatures:
    """``keys``: last-block keys, heads concatenated, [CLS] first, ``(B, 1 + h*w, D)``.
    ``cls``: last-block output token 0 before the final LayerNorm, ``(B, D)``. ``grid``: the patch grid (h, w)."""

    keys: Tensor
    cls: Tensor
    grid: tuple[int, int]


def dino_features(
    model: Any, images: Tensor, size: int = DINO_SIZE, max_size: int | None = DINO_MAX_SIZE
) -> DinoFeatures:
    """Last-block keys and [CLS] of ``images`` ``(B, 3, H, W)`` in [0, 1] (any size; resized as DiffuseIT does).

    The input is cast to the model's dtype and device; the outputs are in the model's dtype. Hooks are
    removed before returning, also on error.
    """
    param = next(model.parameters())
    x = preprocess_dino(images.to(device=param.device, dtype=param.dtype), size, max_size)
    captured: dict[str, Tensor] = {}

    def on_key(_mod, _inp, out):
        captured["keys"] = out

    def on_block(_mod, _inp, out):
        captured["block"] = out[0] if isinstance(out, (tuple, list)) else out

    layer = _last_layer(model)
    handles = [_key_projection(layer).register_forward_hook(on_key), layer.register_forward_hook(on_block)]
    try:
        cfg_size = getattr(model.config, "image_size", None)
        model(pixel_values=x, interpolate_pos_encoding=tuple(x.shape[-2:]) != (cfg_size, cfg_size))
    finally:
        for h in handles:
            h.remove()
    patch = int(getattr(model.config, "patch_size", 8))
    grid = (x.shape[-2] // patch, x.shape[-1] // patch)
    keys = captured["keys"]
    if keys.shape[1] != 1 + grid[0] * grid[1]:
        raise RuntimeError(f"unexpected DINO token count {keys.shape[1]} for a {grid} patch grid")
    return DinoFeatures(keys=keys, cls=captured["block"][:, 0], grid=grid)


def dino_keys(model: Any, images: Tensor) -> Tensor:
    """Last-block DINO keys ``(B, tokens, D)`` of ``images`` ``(B, 3, H, W)`` in [0, 1] ([CLS] row first)."""
    return dino_features(model, images).keys


def key_self_similarity(keys: Tensor, eps: float = 1e-8) -> Tensor:
    """Cosine self-similarity of tokens: ``(B, T, D)`` -> ``(B, T, T)``, computed in at least fp32.

    As Splice/DiffuseIT/PIE-Bench's ``attn_cosine_sim``: ``k_a . k_b / max(|k_a| |k_b|, eps)``.
    """
    k = keys.float() if keys.dtype in (torch.float16, torch.bfloat16) else keys
    norm = k.norm(dim=-1, keepdim=True)
    return (k @ k.transpose(-1, -2)) / (norm @ norm.transpose(-1, -2)).clamp_min(eps)
