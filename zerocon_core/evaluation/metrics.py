"""Edit metrics: is the edit applied (CLIP), is the structure kept (DINO), is the background unchanged.

All functions take images ``(B, 3, H, W)`` in [0, 1] and return one value per image, shape ``(B,)``.
They are deterministic and batched; pixel metrics run in float32, or float64 when an input is float64.
A source batch of 1 is broadcast against an edited batch of B (one source, several edits).

**Edit applied (CLIP).** ``CLIP_MODEL_ID`` = ``openai/clip-vit-large-patch14``, the backbone PIE-Bench
scores with (torchmetrics ``CLIPScore``), loaded only from a local folder (transformers ``save_pretrained``
layout). ``clip_score`` is torchmetrics' convention, ``100 * max(cos(image, text), 0)``;
``clip_accuracy`` is pix2pix-zero's CLIP-Acc per image: 1 when the edited image is more similar to the
target text than to the source text, else 0 (ties count as 0). Image preprocessing follows CLIP's
processor (short side to the crop size, bicubic; centre crop; CLIP mean/std), done in torch (no torchvision).
Any CLIPModel folder works (``openai/clip-vit-base-patch16`` is about 4x cheaper), but scores are only
comparable between runs with the same backbone.

**Structure kept (DINO).** ``structure_distance`` is PIE-Bench's "Structure Distance" (= DiffuseIT's
ℓ_ssim, Splice's global self-similarity loss): the mean squared difference between the cosine
self-similarity matrices of last-block DINO ViT-B/8 keys of source and edit, **[CLS] row and column
included** (785 x 785 at 224 px), as PIE-Bench computes it. PIE-Bench reports it x 10^3; here it is raw.
PIE-Bench's code feeds 0..255 pixel values into the ImageNet normalisation (its images are never divided
by 255); ``pixel_scale=255`` reproduces that, the default 1 is the model's proper input (DiffuseIT's).
Numbers are comparable only within one harness: re-run baselines here rather than quoting tables.

**Background unchanged.** ``mask`` (optional) marks the edited region with values > 0; the background
is ``mask == 0``. Without a mask the whole image is the background.

- ``background_mse``: mean of squared differences over background pixels and channels;
- ``background_psnr``: ``10 log10(1 / mse)`` (data range 1; ``inf`` for identical backgrounds);
- ``background_ssim``: SSIM (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range
  1) computed per channel with *valid* windows (the map is ``(H-10, W-10)``, as the reference MATLAB
  code and torchmetrics, which crops the padded border); masked SSIM is the mean of the map over window
  centres in the background.

PIE-Bench instead multiplies both images by the background mask and scores the whole frame, so its
masked MSE is ours times the background fraction ``f`` (PSNR_PIE = PSNR_ours - 10 log10 f), and its SSIM
counts the zeroed region as perfectly matching. An empty background gives NaN (logged), as PIE-Bench's
"nan". ``piebench_background_metrics`` computes PIE-Bench's convention (for its table, ``piebench.py``);
``clip_edited_region`` is its "Edited" CLIP similarity: the CLIP score of the edited image with every pixel
outside the edit mask set to black.

An edited image of another size than its source is resized (bilinear, antialiased) to the source's size
with a warning; a mask of another size than the source is an error.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common.loaded_model import OnModelDevice
from ..common.log import logger
from ..common.model_folders import WEIGHTS, ModelFolder, check_model_folder
from ..diffuseit.dino import dino_features, key_self_similarity

__all__ = [
    "CLIP_FOLDER",
    "CLIP_MODEL_ID",
    "METRIC_NAMES",
    "ClipMetric",
    "align_pair",
    "background_mse",
    "background_psnr",
    "background_ssim",
    "check_clip_folder",
    "clip_accuracy",
    "clip_edited_region",
    "clip_image_embeds",
    "clip_score",
    "clip_similarity",
    "clip_text_embeds",
    "edit_metrics",
    "load_clip_metric",
    "piebench_background_metrics",
    "prepare_mask",
    "ssim_map",
    "structure_distance",
]

CLIP_MODEL_ID = "openai/clip-vit-large-patch14"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: The per-image metrics ``edit_metrics`` returns, in column order.
METRIC_NAMES = (
    "clip_score",
    "clip_score_source",
    "clip_accuracy",
    "structure_distance",
    "bg_psnr",
    "bg_ssim",
    "bg_mse",
)

CLIP_FOLDER = ModelFolder(
    kind="CLIP metric model",
    model_id=CLIP_MODEL_ID,
    required=(("config.json",), WEIGHTS, ("tokenizer.json", "vocab.json")),
    saved_by="CLIPModel and CLIPProcessor",
)


# ---------------------------------------------------------------------------------------------------------
# Input handling


def _check_images(x: Tensor, what: str) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{what} must be a (B, 3, H, W) image tensor in [0, 1], got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{what} must be a float tensor in [0, 1], got {x.dtype}")


def _compute_dtype(*xs: Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def align_pair(source: Tensor, edited: Tensor) -> tuple[Tensor, Tensor]:
    """Check and align ``source`` and ``edited`` ``(B, 3, H, W)``: common float dtype (fp32, or fp64 if either
    is), source's device, batch 1 broadcast, ``edited`` resized to the source's size (with a warning)."""
    _check_images(source, "source")
    _check_images(edited, "edited")
    dtype = _compute_dtype(source, edited)
    source = source.to(dtype)
    edited = edited.to(device=source.device, dtype=dtype)
    if source.shape[0] != edited.shape[0]:
        if source.shape[0] == 1:
            source = source.expand(edited.shape[0], -1, -1, -1)
        elif edited.shape[0] == 1:
            edited = edited.expand(source.shape[0], -1, -1, -1)
        else:
            raise ValueError(f"batch sizes differ: source {source.shape[0]}, edited {edited.shape[0]}")
    if source.shape[-2:] != edited.shape[-2:]:
        logger.warning(
            "edited image is %dx%d but the source is %dx%d: resizing the edited image to the source's size",
            edited.shape[-1],
            edited.shape[-2],
            source.shape[-1],
            source.shape[-2],
        )
        edited = F.interpolate(
            edited, size=tuple(source.shape[-2:]), mode="bilinear", align_corners=False, antialias=True
        )
    return source, edited


def prepare_mask(mask: Tensor | None, source: Tensor) -> Tensor | None:
    """Edit mask ``(H, W)``, ``(B, H, W)`` or ``(B, 1, H, W)`` (> 0 = edited) -> boolean *background*
    ``(B or 1, 1, H, W)`` on the source's device. Raises ``ValueError`` when its size is not the source's."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a tensor, got {type(mask).__name__}")
    m = mask
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    elif not (m.ndim == 4 and m.shape[1] == 1):
        raise ValueError(f"mask must be shaped (H, W), (B, H, W) or (B, 1, H, W), got {tuple(mask.shape)}")
    if tuple(m.shape[-2:]) != tuple(source.shape[-2:]):
        raise ValueError(
            f"mask is {m.shape[-1]}x{m.shape[-2]} but the source image is {source.shape[-1]}x{source.shape[-2]}: "
            "the mask must have the source image's size"
        )
    if m.shape[0] not in (1, source.shape[0]):
        raise ValueError(f"mask batch {m.shape[0]} does not match the image batch {source.shape[0]}")
    return (m == 0).to(source.device)


def _masked_mean(values: Tensor, background: Tensor | None, what: str) -> Tensor:
    """Mean of ``values`` ``(B, C, H, W)`` per image over positions where ``background`` ``(B|1, 1, H, W)`` is True."""
    if background is None:
        return values.mean(dim=(1, 2, 3))
    w = background.to(values.dtype).expand(values.shape[0], 1, *values.shape[-2:])
    count = w.sum(dim=(1, 2, 3)) * values.shape[1]
    total = (values * w).sum(dim=(1, 2, 3))
    out = total / count.clamp_min(1)
    empty = count == 0
    if bool(empty.any()):
        logger.warning(
            "%s: the mask leaves no background in image(s) %s; their value is NaN",
            what,
            empty.nonzero().flatten().tolist(),
        )
        out = torch.where(empty, torch.full_like(out, float("nan")), out)
    return out


# ---------------------------------------------------------------------------------------------------------
# Background fidelity


def background_mse(source: Tensor, edited: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error over the background (``mask == 0``; the whole image without a mask): ``(B,)``."""
    source, edited = align_pair(source, edited)
    return _masked_mean((source - edited) ** 2, prepare_mask(mask, source), "background MSE")


def background_psnr(source: Tensor, edited: Tensor, mask: Tensor | None = None) -> Tensor:
    """PSNR in dB over the background, data range 1: ``10 log10(1 / mse)``; ``inf`` when identical. ``(B,)``."""
    mse = background_mse(source, edited, mask)
    return 10.0 * torch.log10(1.0 / mse)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device) -> Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_map(
    x: Tensor,
    y: Tensor,
    window: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    data_range: float = 1.0,
) -> Tensor:
    """SSIM map of ``x``, ``y`` ``(B, C, H, W)`` per channel, valid windows only: ``(B, C, H-window+1, W-window+1)``.

    Gaussian-weighted local statistics (separable window, weights sum to 1), biased variances, Wang et al.'s
    constants ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``.
    """
    if x.shape[-1] < window or x.shape[-2] < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window} pixels, got {x.shape[-1]}x{x.shape[-2]}")
    c = x.shape[1]
    g = _gaussian_window(window, sigma, x.dtype, x.device)
    gh = g.view(1, 1, 1, window).expand(c, 1, 1, window)
    gv = g.view(1, 1, window, 1).expand(c, 1, window, 1)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(t, gh, groups=c), gv, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))


def background_ssim(
    source: Tensor, edited: Tensor, mask: Tensor | None = None, window: int = 11, sigma: float = 1.5
) -> Tensor:
    """Mean SSIM over the background (window centres with ``mask == 0``), all channels: ``(B,)``."""
    source, edited = align_pair(source, edited)
    background = prepare_mask(mask, source)
    smap = ssim_map(source, edited, window, sigma)
    if background is not None:
        pad = (window - 1) // 2
        h, w = smap.shape[-2:]
        background = background[..., pad : pad + h, pad : pad + w]
    return _masked_mean(smap, background, "background SSIM")


def piebench_background_metrics(source: Tensor, edited: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """PIE-Bench's background ("unedit part") MSE, PSNR and SSIM: both images are multiplied by the background
    indicator (``mask == 0``) and the *whole frame* is scored (torchmetrics' ``MeanSquaredError``,
    ``PeakSignalNoiseRatio(data_range=1)``, ``StructuralSimilarityIndexMeasure(data_range=1)``, whose map is
    the valid-window map of ``ssim_map``). Raw values ``(B,)`` keyed ``mse``, ``psnr``, ``ssim``; NaN where
    the mask leaves no background (PIE-Bench's "nan")."""
    source, edited = align_pair(source, edited)
    background = prepare_mask(mask, source)
    if background is None:
        raise ValueError("piebench_background_metrics needs a mask")
    keep = background.to(source.dtype)
    s, e = source * keep, edited * keep
    mse = ((s - e) ** 2).mean(dim=(1, 2, 3))
    ssim = ssim_map(s, e).mean(dim=(1, 2, 3))
    empty = keep.expand(source.shape[0], 1, *source.shape[-2:]).sum(dim=(1, 2, 3)) == 0
    out = {"mse": mse, "psnr": 10.0 * torch.log10(1.0 / mse), "ssim": ssim}
    if bool(empty.any()):
        logger.warning("PIE-Bench background metrics: the mask leaves no background; the values are NaN")
        out = {k: torch.where(empty, torch.full_like(v, float("nan")), v) for k, v in out.items()}
    return {k: v.cpu() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------
# Structure (DINO)


def structure_distance(dino: Any, source: Tensor, edited: Tensor, pixel_scale: float = 1.0) -> Tensor:
    """PIE-Bench structure distance: MSE between DINO last-block key self-similarities (with [CLS]). ``(B,)``.

    ``dino``: a transformers ``ViTModel`` (``dino.load_dino``). Runs without autograd; source and edit go
    through DINO in one batch. ``pixel_scale`` multiplies the [0, 1] pixels first (255 = PIE-Bench's code).
    """
    source, edited = align_pair(source, edited)
    b = source.shape[0]
    with torch.no_grad():
        feats = dino_features(dino, torch.cat([source, edited]) * pixel_scale)
        sim = key_self_similarity(feats.keys.to(_compute_dtype(source)))
    return ((sim[:b] - sim[b:]) ** 2).mean(dim=(1, 2))


# ---------------------------------------------------------------------------------------------------------
# CLIP


@dataclass
class ClipMetric(OnModelDevice):
    """A loaded CLIP for scoring: ``CLIPModel``, its tokenizer, and the image preprocessing settings
    (``resize``: short side in px, ``crop``: centre crop (h, w), ``mean``/``std``: per-channel)."""

    model: Any
    tokenizer: Any
    resize: int
    crop: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    folder: str = ""


def check_clip_folder(folder: str | os.PathLike, model_id: str | None = None) -> None:
    """Raise ``FileNotFoundError`` naming ``folder`` and the model id (default: ``CLIP_MODEL_ID``) when the
    folder is missing or incomplete."""
    check_model_folder(folder, CLIP_FOLDER, model_id)


def _hw(value: Any, default: int) -> tuple[int, int]:
    if value is None:
        return default, default
    if isinstance(value, int):
        return value, value
    if "height" in value:
        return int(value["height"]), int(value["width"])
    edge = value.get("shortest_edge", default)
    return int(edge), int(edge)


def load_clip_metric(
    folder: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> ClipMetric:
    """Load ``CLIPModel`` + tokenizer from a local folder (``local_files_only``), eval mode, frozen.

    Preprocessing settings come from the folder's ``preprocessor_config.json`` when present, else from the
    vision config's image size with OpenAI CLIP's mean/std.
    """
    folder = os.fspath(folder)
    check_clip_folder(folder)
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder, local_files_only=True)
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    size = int(model.config.vision_config.image_size)
    pre: dict[str, Any] = {}
    pre_path = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(pre_path):
        with open(pre_path, encoding="utf-8") as f:
            pre = json.load(f)
    crop = _hw(pre.get("crop_size"), size) if pre.get("do_center_crop", True) else (size, size)
    resize = min(_hw(pre.get("size"), size))
    mean = tuple(float(v) for v in pre.get("image_mean", CLIP_MEAN))
    std = tuple(float(v) for v in pre.get("image_std", CLIP_STD))
    logger.info("loaded CLIP metric model from %s (%s, %s)", folder, device, dtype)
    return ClipMetric(model=model, tokenizer=tokenizer, resize=resize, crop=crop, mean=mean, std=std, folder=folder)


def _features(out: Any) -> Tensor:
    """transformers 4 returns the projected embeddings; 5 returns an output whose ``pooler_output`` they are."""
    return out if isinstance(out, Tensor) else out.pooler_output


def _clip_preprocess(clip: ClipMetric, images: Tensor) -> Tensor:
    h, w = images.shape[-2:]
    scale = clip.resize / min(h, w)
    # transformers' CLIPImageProcessor: short side -> ``resize``, long side truncated (int), then centre crop
    nh, nw = (clip.resize, int(w * scale)) if h <= w else (int(h * scale), clip.resize)
    nh, nw = max(clip.crop[0], nh), max(clip.crop[1], nw)
    x = images
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (nh - clip.crop[0]) // 2, (nw - clip.crop[1]) // 2
    x = x[..., top : top + clip.crop[0], left : left + clip.crop[1]]
    mean = torch.tensor(clip.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(clip.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def clip_image_embeds(clip: ClipMetric, images: Tensor) -> Tensor:
    """Unit-norm CLIP image embeddings ``(B, P)`` (fp32) of ``images`` ``(B, 3, H, W)`` in [0, 1]."""
    _check_images(images, "images")
    with torch.no_grad():
        x = _clip_preprocess(clip, images.to(device=clip.device, dtype=torch.float32)).to(clip.dtype)
        emb = _features(clip.model.get_image_features(pixel_values=x)).float()
    return F.normalize(emb, dim=-1)


def clip_text_embeds(clip: ClipMetric, texts: Sequence[str]) -> Tensor:
    """Unit-norm CLIP text embeddings ``(N, P)`` (fp32); texts longer than the context are truncated."""
    texts = [str(t) for t in texts]
    max_len = int(clip.model.config.text_config.max_position_embeddings)
    tok = clip.tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    with torch.no_grad():
        emb = _features(
            clip.model.get_text_features(
                input_ids=tok["input_ids"].to(clip.device), attention_mask=tok["attention_mask"].to(clip.device)
            )
        ).float()
    return F.normalize(emb, dim=-1)


def _texts(texts: str | Sequence[str], b: int, what: str) -> list[str]:
    if isinstance(texts, str):
        return [texts] * b
    texts = list(texts)
    if len(texts) == 1:
        return texts * b
    if len(texts) != b:
        raise ValueError(f"{what}: {len(texts)} texts for {b} images (give one text, or one per image)")
    return texts


def clip_similarity(clip: ClipMetric, images: Tensor, texts: str | Sequence[str]) -> Tensor:
    """Cosine similarity of each image with its text (one text for all, or one per image): ``(B,)`` fp32."""
    img = clip_image_embeds(clip, images)
    txt = clip_text_embeds(clip, _texts(texts, img.shape[0], "clip_similarity"))
    return (img * txt).sum(-1).cpu()


def clip_score(clip: ClipMetric, images: Tensor, texts: str | Sequence[str]) -> Tensor:
    """CLIP score, torchmetrics' convention: ``100 * max(cos(image, text), 0)``. ``(B,)`` fp32."""
    return 100.0 * clip_similarity(clip, images, texts).clamp_min(0)


def clip_edited_region(clip: ClipMetric, images: Tensor, texts: str | Sequence[str], mask: Tensor) -> Tensor:
    """PIE-Bench's "Edited" CLIP similarity: ``clip_score`` of ``images`` with every pixel outside the edit
    region (``mask > 0``) set to 0 (black). ``(B,)`` fp32; NaN where the mask is empty (PIE-Bench's "nan")."""
    _check_images(images, "images")
    background = prepare_mask(mask, images)
    if background is None:
        raise ValueError("clip_edited_region needs a mask")
    region = (~background).to(images.dtype)
    score = clip_score(clip, images * region, texts)
    empty = region.expand(images.shape[0], 1, *images.shape[-2:]).sum(dim=(1, 2, 3)).cpu() == 0
    return torch.where(empty, torch.full_like(score, float("nan")), score)


def clip_accuracy(
    clip: ClipMetric, images: Tensor, source_texts: str | Sequence[str], target_texts: str | Sequence[str]
) -> Tensor:
    """1.0 where ``cos(image, target) > cos(image, source)``, else 0.0 (pix2pix-zero's CLIP-Acc per image). ``(B,)``."""
    img = clip_image_embeds(clip, images)
    b = img.shape[0]
    src = clip_text_embeds(clip, _texts(source_texts, b, "clip_accuracy source"))
    tgt = clip_text_embeds(clip, _texts(target_texts, b, "clip_accuracy target"))
    return ((img * tgt).sum(-1) > (img * src).sum(-1)).float().cpu()


# ---------------------------------------------------------------------------------------------------------
# All at once


def edit_metrics(
    source: Tensor,
    edited: Tensor,
    source_text: str | Sequence[str] = "",
    target_text: str | Sequence[str] = "",
    mask: Tensor | None = None,
    clip: ClipMetric | None = None,
    dino: Any = None,
) -> dict[str, Tensor]:
    """Every metric in ``METRIC_NAMES`` per image, as CPU tensors ``(B,)``.

    CLIP metrics are NaN without ``clip``, the structure distance is NaN without ``dino``.
    ``clip_score`` scores the edited image against the target text, ``clip_score_source`` against the source text.
    """
    source, edited = align_pair(source, edited)
    b = source.shape[0]
    nan = torch.full((b,), math.nan, dtype=source.dtype)
    out: dict[str, Tensor] = {}
    if clip is not None:
        img = clip_image_embeds(clip, edited)
        src = clip_text_embeds(clip, _texts(source_text, b, "source text"))
        tgt = clip_text_embeds(clip, _texts(target_text, b, "target text"))
        cos_t, cos_s = (img * tgt).sum(-1).cpu(), (img * src).sum(-1).cpu()
        out["clip_score"] = 100.0 * cos_t.clamp_min(0)
        out["clip_score_source"] = 100.0 * cos_s.clamp_min(0)
        out["clip_accuracy"] = (cos_t > cos_s).float()
    else:
        out["clip_score"] = out["clip_score_source"] = out["clip_accuracy"] = nan
    out["structure_distance"] = structure_distance(dino, source, edited).cpu() if dino is not None else nan
    out["bg_mse"] = background_mse(source, edited, mask).cpu()
    out["bg_psnr"] = 10.0 * torch.log10(1.0 / out["bg_mse"])
    out["bg_ssim"] = background_ssim(source, edited, mask).cpu()
    return {k: out[k] for k in METRIC_NAMES}
