"""DiffuseIT's losses (Kwon & Ye, ICLR 2023) as pure functions of DINO tokens and images (docs/method.md §8).

They follow the official code (``cyclomon/DiffuseIT``): structure from DINO ViT-B/8 last-block *keys*, their
cosine self-similarity (``ℓ_ssim``) and a patch-contrastive loss against the source's keys (``ℓ_cont``);
style from the [CLS] token (``cls_loss``) and a weak pixel MSE; the semantic divergence ``ℓ_sem``; the
range loss ``ℓ_rng``. The guidance terms that evaluate them on the decoded prediction are in ``diffuseit``.

Images are ``(B, 3, H, W)`` in [0, 1]; pixel losses are computed in DiffuseIT's [-1, 1] units
(``2 * image - 1``) so that its weights keep their meaning. Every loss is per image and **summed over the
batch** (DiffuseIT sums ℓ_ssim, ℓ_sem, the [CLS] and range losses over the batch and averages ℓ_cont and the
pixel MSE; all agree at its batch size of 1; summing everywhere keeps each image's update independent of the
batch size: our choice). Reference sides (source keys, target [CLS], ...) are detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .dino import key_self_similarity

__all__ = [
    "TAU",
    "broadcast_batch",
    "check_images",
    "cls_loss",
    "key_contrastive_loss",
    "pixel_mse_loss",
    "range_loss",
    "resize_to",
    "self_similarity_loss",
    "semantic_divergence_loss",
]

#: DiffuseIT's InfoNCE temperature for ``ℓ_cont``.
TAU = 0.07


def _f(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.float()


def broadcast_batch(target: Tensor, batch: int, what: str) -> Tensor:
    """``target`` with a leading batch of 1 (broadcast) or ``batch``; a clear ``ValueError`` otherwise."""
    if target.shape[0] not in (1, batch):
        raise ValueError(
            f"batch mismatch: {batch} image(s) to guide but the {what} has batch {target.shape[0]}; "
            f"give one {what} (shared by the batch) or {batch} (one per image)"
        )
    return target.expand(batch, *target.shape[1:]) if target.shape[0] == 1 else target


def _check_tokens(keys: Tensor, source_keys: Tensor) -> None:
    if keys.ndim != 3 or source_keys.ndim != 3:
        raise ValueError(f"keys must be (B, tokens, D), got {tuple(keys.shape)} and {tuple(source_keys.shape)}")
    if keys.shape[1:] != source_keys.shape[1:]:
        raise ValueError(
            f"DINO keys differ in tokens/width: {tuple(keys.shape[1:])} vs source {tuple(source_keys.shape[1:])} "
            "(images of different aspect ratios give different patch grids)"
        )


def self_similarity_loss(keys: Tensor, source_keys: Tensor) -> Tensor:
    """DiffuseIT's ``ℓ_ssim`` (``calculate_global_ssim_loss``): per image, the mean over all token pairs of
    ``(S(keys) - S(source))²`` with ``S`` the cosine self-similarity ``(T, T)`` ([CLS] included); summed over
    the batch. ``keys`` ``(B, T, D)``; ``source_keys`` ``(1 or B, T, D)``, detached. 0 for identical keys.
    """
    _check_tokens(keys, source_keys)
    src = broadcast_batch(source_keys, keys.shape[0], "source").detach()
    s = key_self_similarity(_f(keys))
    t = key_self_similarity(_f(src))
    return (s - t).pow(2).mean(dim=(-2, -1)).sum()


def key_contrastive_loss(keys: Tensor, source_keys: Tensor, tau: float = TAU) -> Tensor:
    """DiffuseIT's ``ℓ_cont`` (``contra_loss.PatchLoss``): InfoNCE over all tokens.

    For token ``a`` of the output, the positive logit is ``cos(q_a, k_a)`` with the source's token at the same
    place and the negatives are ``cos(q_a, k_b)``, ``b != a``, over the source's other tokens ([CLS]
    included); logits / ``tau``; cross-entropy with the positive as target, averaged over tokens; summed over
    the batch. About ``ln(T)`` at chance (6.67 for 785 tokens). The source side is detached.
    """
    if tau <= 0:
        raise ValueError(f"the contrastive temperature must be > 0, got {tau}")
    _check_tokens(keys, source_keys)
    b, t, _ = keys.shape
    q = F.normalize(_f(keys), dim=-1, eps=1e-12)
    k = F.normalize(_f(broadcast_batch(source_keys, b, "source")).detach(), dim=-1, eps=1e-12)
    sim = torch.bmm(q, k.transpose(1, 2))  # (B, T, T): sim[a, b] = cos(q_a, k_b)
    l_pos = sim.diagonal(dim1=1, dim2=2).unsqueeze(-1)  # (B, T, 1)
    eye = torch.eye(t, dtype=torch.bool, device=q.device)[None]
    l_neg = sim.masked_fill(eye, -10.0)  # DiffuseIT/CUT mask the diagonal before dividing by tau
    logits = torch.cat([l_pos, l_neg], dim=-1) / tau  # (B, T, 1 + T)
    target = torch.zeros(b * t, dtype=torch.long, device=q.device)
    per_token = F.cross_entropy(logits.reshape(b * t, 1 + t), target, reduction="none")
    return per_token.reshape(b, t).mean(dim=1).sum()


def cls_loss(cls: Tensor, target_cls: Tensor) -> Tensor:
    """DiffuseIT's [CLS] style loss (``calculate_target_loss``): ``mean_d (cls - target)²`` per image, summed.

    ``cls`` ``(B, D)``; ``target_cls`` ``(1 or B, D)``, detached (the reference image's [CLS]).
    """
    if cls.ndim != 2 or target_cls.ndim != 2 or cls.shape[1] != target_cls.shape[1]:
        raise ValueError(
            f"[CLS] tokens must be (B, D) of the same width, got {tuple(cls.shape)} and {tuple(target_cls.shape)}"
        )
    tgt = broadcast_batch(target_cls, cls.shape[0], "reference").detach()
    return (_f(cls) - _f(tgt)).pow(2).mean(dim=1).sum()


def semantic_divergence_loss(cls: Tensor, prev_cls: Tensor) -> Tensor:
    """DiffuseIT's ``ℓ_sem`` (``calculate_dir_cls_loss``): ``-mean_d (cls - prev)²`` per image, summed.

    ``prev_cls`` ``(1 or B, D)``: the previous guidance call's [CLS] (the source's at the first call), detached.
    Minimising it pushes the [CLS] *away* from where it was.
    """
    if cls.ndim != 2 or prev_cls.ndim != 2 or cls.shape[1] != prev_cls.shape[1]:
        raise ValueError(
            f"[CLS] tokens must be (B, D) of the same width, got {tuple(cls.shape)} and {tuple(prev_cls.shape)}"
        )
    prev = broadcast_batch(prev_cls, cls.shape[0], "previous [CLS]").detach()
    return -(_f(cls) - _f(prev)).pow(2).mean(dim=1).sum()


def resize_to(images: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def check_images(images: Tensor, what: str) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"the {what} must be images shaped (B, 3, H, W) in [0, 1], got {shape}")
    if not torch.isfinite(images).all():
        raise ValueError(f"the {what} contains NaN or Inf")


def pixel_mse_loss(images: Tensor, target: Tensor) -> Tensor:
    """DiffuseIT's weak pixel MSE toward the style image: per image ``mean((x - y)²)`` in [-1, 1] units
    (``x = 2 * image - 1``), summed over the batch. ``target`` ``(1 or B, 3, H', W')`` in [0, 1] is resized
    (bilinear, antialiased) to the images' size and detached.
    """
    check_images(images, "images")
    check_images(target, "reference")
    tgt = broadcast_batch(resize_to(_f(target.detach()), tuple(images.shape[-2:])), images.shape[0], "reference")
    return (2.0 * (_f(images) - tgt)).pow(2).mean(dim=(1, 2, 3)).sum()


def range_loss(images: Tensor) -> Tensor:
    """DiffuseIT's ``ℓ_rng``: per image ``mean((x - clamp(x, -1, 1))²)`` with ``x = 2 * image - 1``, summed."""
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    x = 2.0 * _f(images) - 1.0
    return (x - x.clamp(-1.0, 1.0)).pow(2).mean(dim=(1, 2, 3)).sum()
