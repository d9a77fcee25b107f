"""Image files <-> float tensors <-> VAE latents.

Conventions: an image tensor is ``(B, 3, H, W)`` float32 in ``[0, 1]`` (RGB); a VAE latent is the
*scaled* latent ``z = (posterior - shift) * scaling_factor`` of shape ``(B, C, H/8, W/8)``, i.e. the VP
latent a diffusers UNet consumes at noise level 0. Scaling and shift come from the VAE's config.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .log import logger

POSTERIOR_MODES = ("mean", "sample")


class ImageSizeError(ValueError):
    """The image's size is not usable as it is (``strict`` size handling)."""


def load_image(path: str | os.PathLike) -> Tensor:
    """Read an image file into a ``(1, 3, H, W)`` float32 tensor in ``[0, 1]`` (alpha dropped, greyscale -> RGB).

    Raises ``FileNotFoundError`` when the file does not exist and ``ValueError`` when it is not a readable image.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image file not found: {p}")
    try:
        with Image.open(p) as im:
            im.load()
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot read {p} as an image: {exc}") from exc
    return pil_to_tensor(rgb)


def pil_to_tensor(image: Any) -> Tensor:
    """PIL image -> ``(1, 3, H, W)`` float32 in ``[0, 1]``."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_pil(image: Tensor) -> Any:
    """``(1, 3, H, W)`` or ``(3, H, W)`` tensor in ``[0, 1]`` -> PIL RGB image (values clamped, rounded)."""
    from PIL import Image

    if image.ndim == 4:
        if image.shape[0] != 1:
            raise ValueError(f"tensor_to_pil takes one image, got a batch of {image.shape[0]}")
        image = image[0]
    arr = (image.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, mode="RGB")


def save_image(image: Tensor, path: str | os.PathLike) -> Path:
    """Write one image tensor (see ``tensor_to_pil``) to ``path`` atomically: a temporary file in the same folder,
    then ``os.replace``; nothing half-written is left behind on failure. The format follows the extension.
    """
    from PIL import Image

    out = Path(path)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {out.parent}")
    ext = out.suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None:
        raise ValueError(f"unknown image extension {out.suffix!r} for {out}; use e.g. .png or .jpg")
    pil = tensor_to_pil(image)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            pil.save(fh, format=fmt)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out


def nearest_multiple(n: int, multiple: int = 8) -> int:
    """The multiple of ``multiple`` nearest to ``n`` (ties round up), at least ``multiple``."""
    return max(multiple, int((n + multiple / 2) // multiple) * multiple)


def resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize ``(B, C, H, W)`` to ``size = (H', W')`` (bicubic with antialiasing, clamped to [0, 1])."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image.float(), size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


def fit_to_multiple(image: Tensor, multiple: int = 8, strict: bool = False) -> tuple[Tensor, tuple[int, int]]:
    """Make H and W multiples of ``multiple`` (the VAE downsamples by 8).

    Returns ``(image, (H, W))`` where ``(H, W)`` is the *input* size, so the result can be resized back.
    An unfit size is resized to the nearest multiples with a logged warning, or, when ``strict``, raises
    ``ImageSizeError``.
    """
    h, w = int(image.shape[-2]), int(image.shape[-1])
    if h % multiple == 0 and w % multiple == 0:
        return image, (h, w)
    nh, nw = nearest_multiple(h, multiple), nearest_multiple(w, multiple)
    if strict:
        raise ImageSizeError(
            f"image size {w}x{h} (WxH) is not a multiple of {multiple}; resize it (e.g. to {nw}x{nh}) "
            "or drop the strict size option to let it be resized and restored automatically"
        )
    logger.warning(
        "image size %dx%d (WxH) is not a multiple of %d: working at %dx%d, the output is resized back to %dx%d",
        w,
        h,
        multiple,
        nw,
        nh,
        w,
        h,
    )
    return resize(image, (nh, nw)), (h, w)


def _vae_factors(vae: Any) -> tuple[float, float]:
    cfg = vae.config
    scale = getattr(cfg, "scaling_factor", None)
    if scale is None:
        raise ValueError("the VAE config has no scaling_factor")
    shift = getattr(cfg, "shift_factor", None) or 0.0
    return float(scale), float(shift)


def encode_latents(vae: Any, image: Tensor, posterior: str = "mean", seed: int | None = None) -> Tensor:
    """Encode a ``(B, 3, H, W)`` image in [0, 1] to the scaled latent ``(B, C, H/8, W/8)`` (float32).

    ``posterior`` "mean" (default, deterministic) takes the posterior mean; "sample" draws from it with
    a CPU generator seeded by ``seed`` (pix2pix-zero's choice). Runs without autograd on the VAE's device/dtype.
    """
    if posterior not in POSTERIOR_MODES:
        raise ValueError(f"posterior must be one of {POSTERIOR_MODES}, got {posterior!r}")
    scale, shift = _vae_factors(vae)
    param = next(vae.parameters())
    x = image.to(device=param.device, dtype=param.dtype) * 2.0 - 1.0
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        if posterior == "mean":
            z = dist.mean
        else:
            gen = torch.Generator(device="cpu").manual_seed(int(seed or 0))
            noise = torch.randn(dist.mean.shape, generator=gen, dtype=torch.float32).to(dist.mean)
            z = dist.mean + dist.std * noise
    return (z.float() - shift) * scale


def decode_latents(vae: Any, latent: Tensor) -> Tensor:
    """Decode a scaled latent ``(B, C, h, w)`` to an image ``(B, 3, 8h, 8w)`` float32 in [0, 1] (on the CPU)."""
    scale, shift = _vae_factors(vae)
    param = next(vae.parameters())
    with torch.no_grad():
        z = latent.to(device=param.device, dtype=param.dtype) / scale + shift
        img = vae.decode(z).sample
    return ((img.float() + 1.0) / 2.0).clamp(0, 1).cpu()
