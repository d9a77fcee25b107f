"""DiffuseIT (Kwon & Ye, ICLR 2023) ported to latent diffusion: guidance terms and the sampler entry point.

The losses themselves are pure functions in ``diffuseit_losses``; the start level and resampling constants
in ``diffuseit_start``; the method and its port are described in docs/method.md §8-§9. Text-guided
DiffuseIT on Stable Diffusion needs no CLIP loss: the target prompt conditions the model and the structure
losses keep the content.

The guidance terms decode ``StepContext.x0`` (the differentiable predicted clean latent, in the model's
latent space) with a host-supplied ``decode`` callable, so the gradient goes through the decoder, DINO and
the UNet to the latent: DiffuseIT's "manifold constrained" gradient. Several terms at one step share
one decode and one DINO forward (cached in ``StepContext.state``); the source's and reference's features
are computed once (no grad) and kept by the term.

Step size: DiffuseIT shifts the posterior mean by ``Σ_t · (-∇ L)`` with ``Σ_t`` the (learned) posterior
variance, about the respaced beta. With ``posterior_scale`` (default) a term multiplies its loss by the
VP beta of the step it guides, ``1 - a(now)/a(next) = (σ² - σ_next²) / (1 + σ²)``, so the sampler's "raw"
step ``z <- z - w ∇_z L`` is DiffuseIT's update ``β_t λ ∇ ℓ`` (applied to z_t before the DDIM step rather
than to the posterior mean after it) with weights ``λ`` as in its code: ssim 1000, cont 200, [CLS] 2000,
pixel 3000, sem 100, range 200. The ratios are DiffuseIT's; the global multiplier (``weight``, default 1)
is **our choice, UNVERIFIED in latent space** (the latent-to-pixel Jacobian of the VAE differs from ADM's
identity): tune it, or use the sampler's "normalized" step mode.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import Tensor

from ..common.legacy_args import from_old_keywords, reject_unknown
from ..common.log import logger
from ..method.calls import HOOK_KEYWORDS, Hooks
from ..method.guidance import GuidanceTerm, StepContext
from ..method.parameterization import check_prediction_type, noise_blend, vp_sigma
from ..method.sampler import Conditionings, SampleResult, SamplerSettings, guided_ddim_sample
from .dino import DINO_MAX_SIZE, DINO_SIZE, DinoFeatures, dino_features
from .losses import (
    TAU,
    broadcast_batch,
    check_images,
    cls_loss,
    key_contrastive_loss,
    pixel_mse_loss,
    range_loss,
    resize_to,
    self_similarity_loss,
    semantic_divergence_loss,
)
from .start import DIFFUSEIT_RESAMPLE, DIFFUSEIT_SEM_SIGMA, noised_start

__all__ = [
    "LAMBDA_CLS",
    "LAMBDA_CONT",
    "LAMBDA_PIXEL",
    "LAMBDA_RANGE",
    "LAMBDA_SEM",
    "LAMBDA_SSIM",
    "DinoStructureGuidance",
    "DinoStyleGuidance",
    "RangeGuidance",
    "SemanticDivergenceGuidance",
    "diffuseit_guidance",
    "diffuseit_sample",
    "posterior_step_scale",
]

#: DiffuseIT's code defaults (docs/method.md §9): ``--lambda_ssim``, ``--lambda_contra_ssim``, ``--lambda_trg``,
#: ``--l2_trg_lambda``, ``--lambda_dir_cls``, ``--range_lambda``.
LAMBDA_SSIM = 1000.0
LAMBDA_CONT = 200.0
LAMBDA_CLS = 2000.0
LAMBDA_PIXEL = 3000.0
LAMBDA_SEM = 100.0
LAMBDA_RANGE = 200.0

Decode = Callable[[Tensor], Tensor]


# -- step size ------------------------------------------------------------------------------------------


def posterior_step_scale(sigma: Tensor | float, sigma_next: Tensor | float, prediction_type: str = "eps") -> float:
    """The VP beta of the step ``sigma -> sigma_next``: ``1 - a(now)/a(next) = (σ² - σ_next²) / (1 + σ²)``.

    DiffuseIT's guidance step is the posterior variance ``Σ_t``, bounded by this beta of its respaced
    schedule (docs/method.md §9): large at the noisy start, vanishing at the end. Flow models: the beta of the
    VP levels of the same SNR (``parameterization.vp_sigma``; 1 from the pure-noise level t = 1).
    """
    s, sn = float(vp_sigma(float(sigma), prediction_type)), float(vp_sigma(float(sigma_next), prediction_type))
    if s == float("inf"):
        return 1.0
    return max(s * s - sn * sn, 0.0) / (1.0 + s * s)


# -- guidance terms ---------------------------------------------------------------------------------------

_ROUND = "zerocon.diffuseit.round"


def _round_cache(ctx: StepContext) -> dict:
    """Entries shared by the terms at one guided evaluation (same ``ctx.x``); reset when ``x`` changes."""
    entry = ctx.state.get(_ROUND)
    if entry is None or entry["x"] is not ctx.x:
        entry = {"x": ctx.x, "values": {}}
        ctx.state[_ROUND] = entry
    return entry["values"]


def _cached(ctx: StepContext, key: tuple, compute: Callable[[], Any]) -> Any:
    """``compute()`` once per (guided evaluation, branch prediction, key); the eps object identifies the branch."""
    values = _round_cache(ctx)
    full = (id(ctx.eps),) + key
    hit = values.get(full)
    if hit is not None and hit[0] is ctx.eps:
        return hit[1]
    value = compute()
    values[full] = (ctx.eps, value)
    return value


@dataclass(frozen=True)
class _DecodedTerm(GuidanceTerm):
    """A term on the decoded predicted clean image. ``decode``: model latent ``(B, 4, h, w)`` (what the UNet
    denoises, at sigma 0) -> image ``(B, 3, H, W)`` in [0, 1], differentiable and not clamped.
    ``posterior_scale``: multiply the loss by the step's VP beta (module docstring). ``autograd_session``:
    optional host hook, a context-manager factory entered around the decoder's and DINO's forwards (ComfyUI
    makes its inference-tensor weights usable by autograd there, like ``Denoiser.autograd_session``).
    ``prediction_type``: the sampled model's (``Denoiser.prediction_type``): flow models map noise levels to VP
    ones by SNR for the posterior scale, the semantic gate and the noise blend (``parameterization``)."""

    decode: Decode | None = field(default=None, compare=False, repr=False)
    posterior_scale: bool = True
    autograd_session: Callable[[], ContextManager[None]] | None = field(default=None, compare=False, repr=False)
    prediction_type: str = "eps"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_prediction_type(self.prediction_type)
        if self.decode is None or not callable(self.decode):
            raise ValueError(f"{type(self).__name__} needs a decode callable (latent -> image in [0, 1])")

    def _scale(self, ctx: StepContext) -> float:
        if not self.posterior_scale:
            return 1.0
        if ctx.sigma_next is None:
            logger.debug("%s: no sigma_next in the step context; posterior scale 1", type(self).__name__)
            return 1.0
        return posterior_step_scale(ctx.sigma, ctx.sigma_next, self.prediction_type)

    def _session(self) -> ContextManager[None]:
        return self.autograd_session() if self.autograd_session is not None else contextlib.nullcontext()

    def _decoded(self, ctx: StepContext, blend: bool = False) -> Tensor:
        def compute() -> Tensor:
            latent = ctx.x0
            if blend:  # DiffuseIT's --use_noise_aug_all: f * x0 + (1 - f) * z_t, f the noise level (VP sqrt(1 - a))
                latent = noise_blend(ctx.x, latent, ctx.sigma.to(ctx.x.dtype), self.prediction_type)
            with self._session():
                image = self.decode(latent)
            if (
                not isinstance(image, Tensor)
                or image.ndim != 4
                or image.shape[1] != 3
                or image.shape[0] != latent.shape[0]
            ):
                shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
                raise ValueError(
                    f"decode must return images (B, 3, H, W) for a latent batch of {latent.shape[0]}, got {shape}"
                )
            return image

        return _cached(ctx, ("decode", id(self.decode), blend), compute)


@dataclass(frozen=True)
class _DinoTerm(_DecodedTerm):
    """A decoded-image term with DINO features. ``dino``: a transformers ViTModel (``dino.load_dino``);
    ``dino_size`` / ``dino_max_size``: DINO's resize (short side, long-side cap; DiffuseIT 224 / 480);
    ``noise_blend``: evaluate on DiffuseIT's noise-blended estimate instead of the clean prediction (its
    ``--use_noise_aug_all``; off by default: docs/method.md §9)."""

    dino: Any = field(default=None, compare=False, repr=False)
    dino_size: int = DINO_SIZE
    dino_max_size: int | None = DINO_MAX_SIZE
    noise_blend: bool = False
    _cache: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dino is None:
            raise ValueError(f"{type(self).__name__} needs a DINO model (zerocon_core.diffuseit.dino.load_dino)")
        if self.dino_size < 8:
            raise ValueError(f"dino_size must be >= 8 px, got {self.dino_size}")

    def _features(self, ctx: StepContext) -> tuple[Tensor, DinoFeatures]:
        """(decoded image, its DINO features), differentiable, shared with other terms at this evaluation."""
        image = self._decoded(ctx, self.noise_blend)
        key = ("dino", id(self.decode), id(self.dino), self.noise_blend, self.dino_size, self.dino_max_size)

        def compute() -> DinoFeatures:
            with self._session():
                return dino_features(self.dino, image, self.dino_size, self.dino_max_size)

        return image, _cached(ctx, key, compute)

    def _fixed(self, name: str, images: Tensor, size: tuple[int, int] | None) -> DinoFeatures:
        """DINO features of a fixed image (no grad), resized to ``size`` first if given; cached on the term."""
        param = next(self.dino.parameters())
        key = (name, size, param.device, param.dtype, self.dino_size, self.dino_max_size)
        hit = self._cache.get(key)
        if hit is None:
            with torch.no_grad(), self._session():
                img = images.to(device=param.device)
                if size is not None:
                    img = resize_to(img.float() if img.dtype in (torch.float16, torch.bfloat16) else img, size)
                hit = dino_features(self.dino, img, self.dino_size, self.dino_max_size)
                hit = DinoFeatures(keys=hit.keys.detach(), cls=hit.cls.detach(), grid=hit.grid)
            self._cache[key] = hit
        return hit


@dataclass(frozen=True)
class _SourceTerm(_DinoTerm):
    """A DINO term that compares with the source image ``source`` ``(1 or B, 3, H, W)`` in [0, 1] (resized to
    the decoded size before DINO, so both give the same patch grid)."""

    source: Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source is None:
            raise ValueError(f"{type(self).__name__} needs the source image (B, 3, H, W) in [0, 1]")
        check_images(self.source, "source image")

    def _source(self, image: Tensor) -> DinoFeatures:
        broadcast_batch(self.source, image.shape[0], "source image")
        return self._fixed("source", self.source, tuple(image.shape[-2:]))


@dataclass(frozen=True)
class DinoStructureGuidance(_SourceTerm):
    """DiffuseIT's structure loss: ``lambda_ssim * ℓ_ssim + lambda_cont * ℓ_cont`` on the DINO keys of the
    decoded prediction against the source image's (docs/method.md §8; weights 1000 and 200 as
    its code, tau 0.07). ``weight`` is a global multiplier (our choice 1; UNVERIFIED in latent space).
    """

    weight: float = 1.0
    lambda_ssim: float = LAMBDA_SSIM
    lambda_cont: float = LAMBDA_CONT
    tau: float = TAU

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tau <= 0:
            raise ValueError(f"the contrastive temperature must be > 0, got {self.tau}")
        if self.lambda_ssim < 0 or self.lambda_cont < 0:
            raise ValueError("lambda_ssim and lambda_cont must be >= 0")

    def loss(self, ctx: StepContext, request) -> Tensor:
        image, feats = self._features(ctx)
        src = self._source(image).keys
        total = ctx.x.new_zeros((), dtype=torch.float64 if ctx.x.dtype == torch.float64 else torch.float32)
        if self.lambda_ssim:
            total = total + self.lambda_ssim * self_similarity_loss(feats.keys, src)
        if self.lambda_cont:
            total = total + self.lambda_cont * key_contrastive_loss(feats.keys, src, self.tau)
        return total * self._scale(ctx)


@dataclass(frozen=True)
class DinoStyleGuidance(_DinoTerm):
    """DiffuseIT's image-guided style loss: ``lambda_cls * ℓ_CLS + lambda_pixel * ℓ_pixel``: the decoded
    prediction's DINO [CLS] toward the reference image's, plus a weak pixel MSE toward the reference resized
    to the output (docs/method.md §8; weights 2000 and 3000 as its code; ``lambda_pixel`` 0 turns the MSE off).

    ``reference`` ``(1 or B, 3, H, W)`` in [0, 1], any size (DINO resizes it; a batch of 1 is shared).
    """

    weight: float = 1.0
    reference: Tensor | None = field(default=None, compare=False, repr=False)
    lambda_cls: float = LAMBDA_CLS
    lambda_pixel: float = LAMBDA_PIXEL

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reference is None:
            raise ValueError("DinoStyleGuidance needs a reference image (B, 3, H, W) in [0, 1]")
        check_images(self.reference, "reference image")
        if self.lambda_cls < 0 or self.lambda_pixel < 0:
            raise ValueError("lambda_cls and lambda_pixel must be >= 0")

    def reference_cls(self) -> Tensor:
        """The reference's DINO [CLS] ``(B_ref, D)`` at its own size (no grad)."""
        return self._fixed("reference", self.reference, None).cls

    def loss(self, ctx: StepContext, request) -> Tensor:
        image, feats = self._features(ctx)
        broadcast_batch(self.reference, image.shape[0], "reference image")
        total = ctx.x.new_zeros((), dtype=torch.float64 if ctx.x.dtype == torch.float64 else torch.float32)
        if self.lambda_cls:
            total = total + self.lambda_cls * cls_loss(feats.cls, self.reference_cls())
        if self.lambda_pixel:
            total = total + self.lambda_pixel * pixel_mse_loss(image, self.reference.to(image.device))
        return total * self._scale(ctx)


@dataclass(frozen=True)
class SemanticDivergenceGuidance(_SourceTerm):
    """DiffuseIT's ``ℓ_sem`` (docs/method.md §8-§9): pushes the decoded prediction's [CLS] away from the
    previous guidance call's (the source image's at the first call; resampling repeats count as calls). Active while
    the level is above ``min_sigma`` (VP units; flow levels compared by SNR, ``parameterization.vp_sigma``):
    DiffuseIT's ``diff_iter`` gate at the same noise level (ADM t = 505, sigma 3.54; SD t = 715; flow t = 0.780).
    Weight ``lambda_sem`` 100 as its code; ``weight`` is the global multiplier.
    """

    weight: float = 1.0
    lambda_sem: float = LAMBDA_SEM
    min_sigma: float = DIFFUSEIT_SEM_SIGMA

    def loss(self, ctx: StepContext, request) -> Tensor:
        if float(vp_sigma(float(ctx.sigma), self.prediction_type)) <= self.min_sigma:
            return (ctx.x * 0).sum()
        image, feats = self._features(ctx)
        # Previous call's [CLS] per branch prediction: a new evaluation starts when ctx.x changes.
        mine = ctx.state.setdefault(("zerocon.diffuseit.sem", id(self)), {"x": None, "prev": [], "cur": []})
        if mine["x"] is not ctx.x:
            mine["prev"], mine["cur"], mine["x"] = mine["cur"], [], ctx.x
        k = len(mine["cur"])
        if mine["prev"]:
            prev = mine["prev"][min(k, len(mine["prev"]) - 1)]
        else:
            prev = self._source(image).cls
        mine["cur"].append(feats.cls.detach())
        return self.lambda_sem * semantic_divergence_loss(feats.cls, prev) * self._scale(ctx)


@dataclass(frozen=True)
class RangeGuidance(_DecodedTerm):
    """DiffuseIT's ``ℓ_rng`` (docs/method.md §8): penalises decoded pixels of the clean prediction outside [0, 1]
    (its [-1, 1] units); ``lambda_range`` 200 as its code; ``weight`` is the global multiplier."""

    weight: float = 1.0
    lambda_range: float = LAMBDA_RANGE

    def loss(self, ctx: StepContext, request) -> Tensor:
        return self.lambda_range * range_loss(self._decoded(ctx, blend=False)) * self._scale(ctx)


# -- conveniences -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiffuseITObjective:
    """Which of DiffuseIT's terms ``diffuseit_guidance`` builds, and how strongly: ``weight`` multiplies every
    term; ``semantic`` adds ``SemanticDivergenceGuidance``, ``range_term`` ``RangeGuidance``; ``lambda_pixel``
    is the style term's pixel weight (image-guided only)."""

    weight: float = 1.0
    semantic: bool = True
    range_term: bool = True
    lambda_pixel: float = LAMBDA_PIXEL


#: ``diffuseit_guidance``'s old keywords, one per ``DiffuseITObjective`` field.
OBJECTIVE_KEYWORDS = {name: name for name in ("weight", "semantic", "range_term", "lambda_pixel")}
#: ``diffuseit_sample``'s old keywords of ``Conditionings``' fields: the target prompt is the edit, the negative
#: the source (the reference branch's and CFG's negative).
DIFFUSEIT_COND_KEYWORDS = {"cond": "edit", "negative_cond": "source"}


def diffuseit_guidance(
    dino: Any,
    decode: Decode,
    source: Tensor,
    reference: Tensor | None = None,
    *,
    objective: DiffuseITObjective | None = None,
    **common: Any,
) -> tuple[GuidanceTerm, ...]:
    """DiffuseIT's full objective as a guidance tuple: structure, + style when ``reference`` is given
    (image-guided), + semantic divergence, + range (``objective``; its old keywords ``weight=``, ``semantic=``,
    ``range_term=``, ``lambda_pixel=`` still work). ``common`` goes to every DINO term (``dino_size``,
    ``noise_blend``, ``posterior_scale``...)."""
    objective = from_old_keywords(
        "diffuseit_guidance", "objective", objective, DiffuseITObjective, common, OBJECTIVE_KEYWORDS
    )
    obj = objective if objective is not None else DiffuseITObjective()
    weight = obj.weight
    terms: list[GuidanceTerm] = [
        DinoStructureGuidance(weight=weight, dino=dino, decode=decode, source=source, **common)
    ]
    if reference is not None:
        terms.append(
            DinoStyleGuidance(
                weight=weight, dino=dino, decode=decode, reference=reference, lambda_pixel=obj.lambda_pixel, **common
            )
        )
    if obj.semantic:
        terms.append(SemanticDivergenceGuidance(weight=weight, dino=dino, decode=decode, source=source, **common))
    if obj.range_term:
        shared = {k: v for k, v in common.items() if k in ("posterior_scale", "autograd_session", "prediction_type")}
        terms.append(RangeGuidance(weight=weight, decode=decode, **shared))
    return tuple(terms)


def diffuseit_sample(
    denoiser,
    latent: Tensor,
    sigmas: Tensor,
    conds: Conditionings | None = None,
    *,
    guidance: Sequence[GuidanceTerm],
    strength: float | None = None,
    settings: SamplerSettings | None = None,
    hooks: Hooks | None = None,
    **old: Any,
) -> SampleResult:
    """DiffuseIT on a latent model: forward-noise the clean ``latent`` (model latent space) to the start level
    (``diffuseit_start.noised_start``: DiffuseIT's SNR when ``strength`` is None), then the guided DDIM loop with
    first-step resampling. ``conds``: ``Conditionings(source=negative, edit=target prompt)`` (CFG between them;
    the old keywords ``cond=``, ``negative_cond=``, ``callback=``, ``check_interrupt=`` still work).
    ``sigmas``: the full descending grid (sigma space). ``settings``: the sampler's (default: CFG 5 and
    ``resample`` = 10, as DiffuseIT); its ``seed`` also draws the start noise. Returns the sampler's
    ``SampleResult``. The DINO terms' ``prediction_type`` must be the model's (else ``ValueError``; docs/sampler.md).
    """
    reject_unknown("diffuseit_sample", old, DIFFUSEIT_COND_KEYWORDS, HOOK_KEYWORDS)
    conds = from_old_keywords("diffuseit_sample", "conds", conds, Conditionings, old, DIFFUSEIT_COND_KEYWORDS)
    hooks = from_old_keywords("diffuseit_sample", "hooks", hooks, Hooks, old, HOOK_KEYWORDS)
    if conds is None:
        raise TypeError(
            "diffuseit_sample() missing the conditionings: conds=Conditionings(source=negative, edit=target)"
        )
    settings = SamplerSettings(resample=DIFFUSEIT_RESAMPLE) if settings is None else settings
    for term in guidance:
        wanted = getattr(term, "prediction_type", None)
        if wanted is not None and wanted != denoiser.prediction_type:
            raise ValueError(
                f"{type(term).__name__} was built for prediction type {wanted!r} but the model's is "
                f"{denoiser.prediction_type!r}: build the DINO terms with prediction_type={denoiser.prediction_type!r}"
            )
    x, grid = noised_start(latent, sigmas, strength, settings.seed, prediction_type=denoiser.prediction_type)
    return guided_ddim_sample(denoiser, x, grid, conds, guidance=guidance, settings=settings, hooks=hooks)
