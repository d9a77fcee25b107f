"""Guidance and regularisation losses: pure tensor functions, computed in float32 (or the input's
dtype when that is float64, so tests can check them in double precision).

Sources: pix2pix-zero (cross-attention loss, auto-correlation and KL noise regularisers), CUT (PatchNCE).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _f(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.float()


def cross_attention_loss(edit: Mapping[str, Tensor], ref: Mapping[str, Tensor]) -> Tensor:
    """pix2pix-zero's cross-attention loss, summed over layers.

    Each map is ``(B, heads, HW, T)``; per layer: squared difference summed over space and tokens, averaged
    over batch and heads. The reference side is detached. Raises ``ValueError`` when layers or shapes differ.
    """
    if set(edit) != set(ref):
        raise ValueError(f"cross-attention layers differ: {sorted(set(edit) ^ set(ref))}")
    if not edit:
        raise ValueError("cross-attention loss needs at least one layer")
    total = None
    for name, m_edit in edit.items():
        m_ref = ref[name]
        if m_edit.shape != m_ref.shape:
            raise ValueError(
                f"cross-attention maps of layer {name} differ in shape: edit {tuple(m_edit.shape)} vs "
                f"reference {tuple(m_ref.shape)} (different prompt lengths or latent sizes?)"
            )
        d = _f(m_edit) - _f(m_ref).detach()
        term = d.pow(2).sum(dim=(-2, -1)).mean()
        total = term if total is None else total + term
    return total


def sample_patch_indices(num_locations: int, num_patches: int, generator: torch.Generator | None, device) -> Tensor:
    """``min(num_patches, num_locations)`` distinct locations out of ``num_locations`` (a random permutation's head)."""
    perm = torch.randperm(num_locations, generator=generator, device="cpu")
    return perm[: min(num_patches, num_locations)].to(device)


def patch_locations(seed: int, step: int, layer: str, patch_size: int, num_locations: int, num_patches: int) -> Tensor:
    """PatchNCE's sample locations for one (sampling step, layer, patch size): ``sample_patch_indices`` (int64, CPU;
    row-major positions of the p x p pooled map) from a generator seeded by a hash of ``(seed, step, layer,
    patch_size)`` alone. A pure function of those keys (not of what was drawn before), so DDIM inversion can
    record exactly the positions the sampler will compare at that step, and replay and lockstep agree."""
    key = f"{int(seed)}/{int(step)}/{layer}/{int(patch_size)}".encode()
    digest = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)
    return sample_patch_indices(num_locations, num_patches, torch.Generator().manual_seed(digest), "cpu")


def pooled_size(shape: Sequence[int], patch_size: int) -> int:
    """Number of locations of a ``(B, C, H, W)`` map after p x p average pooling (stride p, no padding)."""
    return (int(shape[-2]) // patch_size) * (int(shape[-1]) // patch_size)


def pooled_patches(fmap: Tensor, patch_size: int, indices: Tensor) -> Tensor:
    """``(B, C, S)``: the p x p average-pooled ``fmap`` (B, C, H, W) at the flat positions ``indices`` (S,).
    Pooling comes first: a sampled patch is the mean of its p x p block of the full map."""
    pooled = fmap if patch_size == 1 else F.avg_pool2d(fmap, patch_size)
    return pooled.flatten(2)[:, :, indices.to(fmap.device)]


@dataclass(frozen=True)
class PatchSamples:
    """A ``(B, C, H, W)`` feature map reduced to what PatchNCE compares (what the inversion records).

    ``shape``: the full map's shape. ``values[(patch_size, seed, num_patches)]``: ``(B, C, S)``, the map's
    ``pooled_patches`` at ``patch_locations(seed, step, layer, patch_size, ...)`` of the step it was taken for.
    """

    shape: tuple[int, ...]
    values: dict[tuple[int, int, int], Tensor]

    def to(self, **kwargs) -> PatchSamples:
        return PatchSamples(self.shape, {k: v.to(**kwargs) for k, v in self.values.items()})

    def detach(self) -> PatchSamples:
        return PatchSamples(self.shape, {k: v.detach() for k, v in self.values.items()})

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.values.values())

    def merge(self, other: PatchSamples) -> PatchSamples:
        if self.shape != other.shape:
            raise ValueError(f"PatchNCE samples of maps of different shapes: {self.shape} vs {other.shape}")
        return PatchSamples(self.shape, {**self.values, **other.values})


def patch_samples(
    fmap: Tensor, layer: str, step: int, patch_sizes: Sequence[int], num_patches: int, seed: int
) -> PatchSamples:
    """The ``PatchSamples`` of ``fmap`` (B, C, H, W) that ``multi_patch_nce_loss`` with these settings compares
    at ``step`` (patch sizes leaving fewer than 2 locations are left out, as the loss skips them)."""
    values = {}
    for p in patch_sizes:
        p = int(p)
        n = pooled_size(fmap.shape, p)
        if n >= 2:
            idx = patch_locations(seed, step, layer, p, n, num_patches)
            values[(p, int(seed), int(num_patches))] = pooled_patches(fmap, p, idx)
    return PatchSamples(tuple(fmap.shape), values)


def patch_nce(query: Tensor, key: Tensor, tau: float = 0.07) -> Tensor:
    """CUT's PatchNCE on sampled patches: ``query`` and ``key`` are ``(B, C, S)``, patch ``s`` of the query is
    matched with patch ``s`` of the key. The key side is detached (CUT orientation: query = edited, key = source).
    Vectors are L2-normalised over channels; no MLP head. For each patch the positive is the key at the same
    location and the negatives are the keys at the other sampled locations of the same image (the diagonal of
    the negative block is masked with -10 before dividing by ``tau``, as CUT does). Returns the mean
    cross-entropy; about ln(S) at chance."""
    if query.shape != key.shape:
        raise ValueError(f"PatchNCE samples differ in shape: {tuple(query.shape)} vs {tuple(key.shape)}")
    b, _, s = query.shape
    q = F.normalize(_f(query).transpose(1, 2), dim=-1)  # (B, S, C)
    k = F.normalize(_f(key).detach().transpose(1, 2), dim=-1)
    l_pos = (q * k).sum(-1, keepdim=True)  # (B, S, 1)
    l_neg = torch.bmm(q, k.transpose(1, 2))  # (B, S, S)
    eye = torch.eye(s, dtype=torch.bool, device=q.device)[None]
    l_neg = l_neg.masked_fill(eye, -10.0)
    logits = torch.cat([l_pos, l_neg], dim=-1) / tau  # (B, S, 1 + S)
    target = torch.zeros(b * s, dtype=torch.long, device=q.device)
    return F.cross_entropy(logits.reshape(b * s, 1 + s), target)


def patch_nce_loss(query: Tensor, key: Tensor, indices: Tensor, tau: float = 0.07) -> Tensor:
    """CUT's PatchNCE for one layer: ``patch_nce`` of the ``(B, C, H, W)`` maps ``query`` and ``key`` at the same
    flat ``indices``. Returns the mean cross-entropy; about ln(S) at chance for S patches."""
    if query.shape != key.shape:
        raise ValueError(f"PatchNCE features differ in shape: {tuple(query.shape)} vs {tuple(key.shape)}")
    return patch_nce(pooled_patches(query, 1, indices), pooled_patches(key, 1, indices), tau)


def multi_patch_nce_loss(
    edit: Mapping[str, Tensor],
    ref: Mapping[str, Tensor | PatchSamples],
    patch_sizes: Sequence[int] = (1, 2),
    num_patches: int = 256,
    tau: float = 0.07,
    seed: int = 0,
    step: int = 0,
) -> Tensor:
    """PatchNCE summed over layers and patch sizes (size p = p x p average pooling first).

    Locations: ``patch_locations(seed, step, layer, p, ...)``, shared by query and key. ``ref`` maps a layer to
    its full ``(B, C, H, W)`` map or to the ``PatchSamples`` recorded for these settings at this step (the
    inversion's record). Sizes leaving fewer than 2 locations are skipped. Our choice for pix2pix-zeroCon (the
    paper does not say; docs/method.md §6).
    """
    if set(edit) != set(ref):
        raise ValueError(f"PatchNCE layers differ: {sorted(set(edit) ^ set(ref))}")
    if not edit:
        raise ValueError("PatchNCE loss needs at least one layer")
    if not patch_sizes or any(int(p) < 1 for p in patch_sizes):
        raise ValueError(f"patch sizes must be integers >= 1, got {list(patch_sizes)}")
    total = None
    for name, f_edit in edit.items():
        f_ref = ref[name]
        ref_shape = f_ref.shape if isinstance(f_ref, PatchSamples) else tuple(f_ref.shape)
        if tuple(f_edit.shape) != tuple(ref_shape):
            raise ValueError(f"PatchNCE features differ in shape: {tuple(f_edit.shape)} vs {tuple(ref_shape)}")
        for p in patch_sizes:
            p = int(p)
            n = pooled_size(f_edit.shape, p)
            if n < 2:
                continue  # one location: no negatives, nothing to contrast
            idx = patch_locations(seed, step, name, p, n, num_patches)
            if isinstance(f_ref, PatchSamples):
                k = f_ref.values.get((p, int(seed), int(num_patches)))
                if k is None:
                    raise ValueError(
                        f"PatchNCE: the recorded reference of layer {name} lacks patch size {p} (seed {seed}, "
                        f"{num_patches} patches): it was recorded for other PatchNCE settings"
                    )
            else:
                k = pooled_patches(f_ref, p, idx)
            term = patch_nce(pooled_patches(f_edit, p, idx), k, tau)
            total = term if total is None else total + term
    if total is None:
        raise ValueError("PatchNCE: every layer is too small for the chosen patch sizes")
    return total


def auto_corr_loss(eps: Tensor, generator: torch.Generator | None = None, min_size: int = 8) -> Tensor:
    """pix2pix-zero's auto-correlation regulariser on predicted noise ``eps`` (B, C, H, W), summed over batch.

    Per image and channel, over a pyramid of 2x2 average pools until the shorter side is ``min_size`` or
    less: at each level a shift d drawn uniformly from [1, side/2) with side the shorter side (never 0: the
    fix of pix2pix-zero commit ec33392; diffusers draws from [0, H/2) and stops on H alone), shared by the
    images of the batch, and the terms ``mean(n * roll(n, d, H))^2 + mean(n * roll(n, d, W))^2``. Rolls
    are circular.
    """
    total = eps.new_zeros(())
    x = _f(eps)
    b, c = x.shape[:2]
    for ch in range(c):
        noise = x[:, ch : ch + 1]
        while True:
            side = min(noise.shape[-2], noise.shape[-1])
            hi = max(side // 2, 2)
            d = int(torch.randint(1, hi, (1,), generator=generator))
            for dim in (-2, -1):
                corr = (noise * torch.roll(noise, shifts=d, dims=dim)).mean(dim=(1, 2, 3))  # per image
                total = total + corr.pow(2).sum()
            if side <= min_size:
                break
            noise = F.avg_pool2d(noise, kernel_size=2)
    return total


def kl_loss(eps: Tensor) -> Tensor:
    """pix2pix-zero's KL term per image, summed over batch: var + mean^2 - 1 - log(var + 1e-7) (unbiased var).

    Per image on purpose: diffusers' pipeline takes one mean and variance over the whole batch (same at batch 1).
    """
    x = _f(eps).flatten(1)
    var = x.var(dim=1)
    mu = x.mean(dim=1)
    return (var + mu.pow(2) - 1 - torch.log(var + 1e-7)).sum()


def chance_patch_nce(num_patches: int) -> float:
    """ln(S): the PatchNCE value at chance with S sampled patches."""
    return math.log(num_patches)
