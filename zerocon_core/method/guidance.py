"""Guidance terms: a loss on what the edit branch produced, a weight and an active step window.

A term says which layers it needs (``request``), given the denoiser's layer list, and computes its loss
from a ``StepContext``. Terms compose as a tuple (a ZEROCON_GUIDANCE link carries one); the sampler sums
``weight * loss`` of the terms active at a step and takes one gradient step on the latent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from .denoiser import CaptureRequest, LayerInfo, Prediction, parse_layer_spec, select_layers
from .losses import PatchSamples, cross_attention_loss, multi_patch_nce_loss, patch_samples


@dataclass
class StepContext:
    """What a term sees at one guided step.

    ``x`` is the edit latent in sigma space (requires grad), ``eps`` its prediction under the edit
    conditioning (differentiable), ``edit``/``ref`` the captures of the edit branch (differentiable) and of
    the reference branch (detached; None when no active term requested captures, so the reference branch
    did not run; replayed from the inversion's record, a feature layer read only by terms with a
    ``samples_key`` holds ``losses.PatchSamples`` instead of the map). ``step`` counts from 0; ``sigma`` is
    a 0-d tensor. ``sigma_next``: the level the step goes down to (0-d; None if the host does not say). ``state``: scratch space shared by the terms for one
    sampling run (created empty per run; terms key their entries by themselves).
    """

    step: int
    num_steps: int
    sigma: Tensor
    x: Tensor
    eps: Tensor
    edit: Prediction
    ref: Prediction | None
    generator: torch.Generator
    sigma_next: Tensor | None = None
    state: dict = field(default_factory=dict)

    @property
    def x0(self) -> Tensor:
        """Predicted clean latent (sigma space = unscaled latent), differentiable w.r.t. ``x``."""
        return self.x - self.sigma * self.eps


@dataclass(frozen=True)
class GuidanceTerm:
    """Base class. ``weight`` scales the loss; the term is active for steps with ``start <= i/N < end``."""

    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.start < self.end <= 1.0):
            raise ValueError(f"guidance window must satisfy 0 <= start < end <= 1, got [{self.start}, {self.end}]")

    def active(self, step: int, num_steps: int) -> bool:
        frac = step / max(num_steps, 1)
        return self.weight != 0.0 and self.start <= frac < self.end

    def request(self, layers: Sequence[LayerInfo]) -> CaptureRequest:
        return CaptureRequest()

    def loss(self, ctx: StepContext, request: CaptureRequest) -> Tensor:
        raise NotImplementedError

    @property
    def samples_key(self) -> tuple | None:
        """None (the default): the term reads its reference feature maps whole. Otherwise the key of the
        ``PatchSamples`` it reads (``reference_samples``): terms with equal keys read the same samples."""
        return None

    def reference_samples(self, layer: str, fmap: Tensor, step: int) -> PatchSamples | None:
        """What this term reads of the reference feature map ``fmap`` (B, C, H, W) of ``layer`` at sampling
        ``step`` (what the inversion records for it): None, the default, means the whole map."""
        return None


@dataclass(frozen=True)
class CrossAttentionGuidance(GuidanceTerm):
    """pix2pix-zero's cross-attention loss on ``attn2`` probabilities of the layers in ``layers``.

    Default weight 0.1 = pix2pix-zero's ``xa_guidance`` for real images with SD1.x (use <= 0.01 for
    v-prediction models). ``layers``: "all" (the paper's choice) or a spec like "up" / "down,up:1,2".
    """

    weight: float = 0.1
    layers: str = "all"

    def request(self, layers: Sequence[LayerInfo]) -> CaptureRequest:
        blocks, levels = parse_layer_spec(self.layers)
        return CaptureRequest(probs=frozenset(select_layers(layers, "cross", blocks, levels)))

    def loss(self, ctx: StepContext, request: CaptureRequest) -> Tensor:
        names = sorted(request.probs)
        return cross_attention_loss({n: ctx.edit.probs[n] for n in names}, {n: ctx.ref.probs[n] for n in names})


@dataclass(frozen=True)
class PatchNCEGuidance(GuidanceTerm):
    """Patch-wise contrastive (CUT PatchNCE) loss between edit and reference self-attention outputs.

    Our defaults for pix2pix-zeroCon (the paper is silent; docs/method.md §6): up-block ``attn1``
    outputs, patch sizes {1, 2}, 256 shared sample locations, tau 0.07, no MLP head. ``seed``: the sample
    locations of a step are ``losses.patch_locations(seed, step, layer, patch size, ...)``, a pure function of
    the term and the step, so DDIM inversion records the reference at exactly those positions
    (``reference_samples``) and the sampler compares the edit there, replayed or not. Default weight 0.5:
    the weight at which its gradient pulls about as hard as the cross-attention term's at 0.1 (median
    gradient-RMS ratio 5.76 over a 10-step edit, random SD1.5 UNet, 256 px: ``bench/calibrate_patchnce.py``;
    docs/guide.md, "Calibrating PatchNCE"). Our choice: the zeroCon paper gives no weight.
    """

    weight: float = 0.5
    layers: str = "up"
    num_patches: int = 256
    tau: float = 0.07
    patch_sizes: tuple[int, ...] = field(default=(1, 2))
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_patches < 2:
            raise ValueError(f"PatchNCE needs at least 2 patches, got {self.num_patches}")
        if self.tau <= 0:
            raise ValueError(f"PatchNCE temperature must be > 0, got {self.tau}")
        if not self.patch_sizes or any(int(p) < 1 for p in self.patch_sizes):
            raise ValueError(f"patch sizes must be integers >= 1, got {self.patch_sizes}")

    def request(self, layers: Sequence[LayerInfo]) -> CaptureRequest:
        blocks, levels = parse_layer_spec(self.layers)
        return CaptureRequest(features=frozenset(select_layers(layers, "self", blocks, levels)))

    def loss(self, ctx: StepContext, request: CaptureRequest) -> Tensor:
        names = sorted(request.features)
        return multi_patch_nce_loss(
            {n: ctx.edit.features[n] for n in names},
            {n: ctx.ref.features[n] for n in names},
            patch_sizes=self.patch_sizes,
            num_patches=self.num_patches,
            tau=self.tau,
            seed=self.seed,
            step=ctx.step,
        )

    @property
    def samples_key(self) -> tuple:
        return ("PatchNCE", tuple(int(p) for p in self.patch_sizes), int(self.num_patches), int(self.seed))

    def reference_samples(self, layer: str, fmap: Tensor, step: int) -> PatchSamples:
        """``fmap``'s p x p pooled values at this term's sample locations of ``step``, per patch size."""
        return patch_samples(fmap, layer, step, self.patch_sizes, self.num_patches, self.seed)


Guidance = tuple[GuidanceTerm, ...]


def chain(previous: Guidance | None, term: GuidanceTerm) -> Guidance:
    """Append ``term`` to an optional previous guidance tuple (what the term nodes do)."""
    return tuple(previous or ()) + (term,)
