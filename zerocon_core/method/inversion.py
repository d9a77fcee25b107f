"""Deterministic DDIM inversion in sigma space, with pix2pix-zero's optional noise regularisation.

Each step goes up the ascending grid from level ``a`` to ``b``: eps predicted under the source conditioning
(optionally with CFG) at the ``eval_at`` point ("current": ComfyUI's ``FlipSigmas`` + ``ddim``/``euler``;
"next": diffusers' ``DDIMInverseScheduler``, VP models only), optionally regularised, then ``ddim_step``.
Flow models (SD3, Flux) run the Euler ODE backwards, the regulariser on the implied noise. Why, step by step:
docs/sampler.md, "The inversion".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..common.legacy_args import from_old_keywords, reject_unknown
from ..common.log import logger
from .calls import HOOK_KEYWORDS, Hooks
from .denoiser import CaptureRequest, Denoiser, Prediction
from .losses import auto_corr_loss, kl_loss
from .parameterization import eps_from_noise, implied_noise, input_scale, is_flow
from .replay import Inversion, Recorder, RecordSettings, ReferenceRecord
from .steps import cfg_combine, ddim_step

EVAL_AT = ("current", "next")


def check_eval_at(eval_at: str, what: str = "eval_at", prediction_type: str = "eps") -> None:
    """``ValueError`` naming the accepted conventions (``EVAL_AT``) unless ``eval_at`` is one of them, or when
    ``eval_at`` is "next" for a flow-matching model (diffusers' DDIM convention is defined for VP models only)."""
    if eval_at not in EVAL_AT:
        raise ValueError(f"{what} must be one of {', '.join(EVAL_AT)}, got {eval_at!r}")
    if eval_at == "next" and is_flow(prediction_type):
        raise ValueError(
            f"{what} 'next' (diffusers' DDIMInverseScheduler) is for VP models (SD1.x, SD2.x, SDXL) only; "
            "flow-matching models (SD3, Flux) invert with 'current' (ComfyUI's FlipSigmas + euler)"
        )


@dataclass(frozen=True)
class NoiseRegularization:
    """pix2pix-zero's regulariser on predicted noise: ``outer`` rounds of (``rolls`` auto-correlation
    steps of size ``lambda_ac / rolls``, then one KL step of size ``lambda_kl``). Defaults as the paper's
    code: 20, 20, 5 x 5. Deliberate differences from diffusers' pipeline (docs/method.md §3):
    shifts never 0, one KL per image, the pyramid follows the shorter side (``losses.auto_corr_loss``)."""

    lambda_ac: float = 20.0
    lambda_kl: float = 20.0
    outer: int = 5
    rolls: int = 5

    def __post_init__(self) -> None:
        if self.outer < 0 or self.rolls < 1:
            raise ValueError(f"regularisation needs outer >= 0 and rolls >= 1, got {self.outer}, {self.rolls}")
        if self.lambda_ac < 0 or self.lambda_kl < 0:
            raise ValueError("regularisation weights must be >= 0")

    def __call__(self, eps: Tensor, generator: torch.Generator | None) -> Tensor:
        """Return the regularised copy of ``eps`` (B, C, H, W); each image is regularised on its own."""
        eps = eps.detach()
        with torch.enable_grad():
            for _ in range(self.outer):
                if self.lambda_ac > 0:
                    for _ in range(self.rolls):
                        var = eps.clone().requires_grad_(True)
                        (g,) = torch.autograd.grad(auto_corr_loss(var, generator), var)
                        eps = eps - self.lambda_ac * g / self.rolls
                if self.lambda_kl > 0:
                    var = eps.clone().requires_grad_(True)
                    (g,) = torch.autograd.grad(kl_loss(var), var)
                    eps = eps - self.lambda_kl * g
        return eps.detach()


@dataclass(frozen=True)
class InversionSettings:
    """How ``ddim_invert`` runs (docs/sampler.md, "The inversion"): ``cfg`` 1 (pix2pix-zero) uses the source alone;
    ``eval_at`` "current" or "next" (``EVAL_AT``); ``regularization`` of the predicted noise (None: none);
    ``seed`` of the regulariser's random shifts; ``keep_trajectory``: keep every level's latent; ``record``: the
    captures to record for the sampler's "inverted" reference (implies ``keep_trajectory``)."""

    cfg: float = 1.0
    eval_at: str = "current"
    regularization: NoiseRegularization | None = None
    seed: int = 0
    keep_trajectory: bool = True
    record: RecordSettings | None = None


#: ``ddim_invert``'s old keywords, one per ``InversionSettings`` field.
SETTINGS_KEYWORDS = {name: name for name in ("cfg", "eval_at", "regularization", "seed", "keep_trajectory", "record")}


def ddim_invert(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    cond: Any,
    *,
    negative_cond: Any = None,
    settings: InversionSettings | None = None,
    hooks: Hooks | None = None,
    **old: Any,
) -> Inversion:
    """Invert the latent ``x`` (sigma space, at level ``sigmas[0]``) up the ascending grid ``sigmas`` (sigma
    space, not timesteps); returns the ``Inversion`` (latent at ``sigmas[-1]``, trajectory, record).

    ``negative_cond`` is needed when ``settings.cfg`` is not 1. ``hooks``: ``callback(i, n, x)`` after each
    step, ``check_interrupt()`` before each. The old keywords (``cfg=``, ``eval_at=``, ``regularization=``,
    ``seed=``, ``keep_trajectory=``, ``record=``, ``callback=``, ``check_interrupt=``) are still accepted.
    """
    reject_unknown("ddim_invert", old, SETTINGS_KEYWORDS, HOOK_KEYWORDS)
    settings = from_old_keywords("ddim_invert", "settings", settings, InversionSettings, old, SETTINGS_KEYWORDS)
    hooks = from_old_keywords("ddim_invert", "hooks", hooks, Hooks, old, HOOK_KEYWORDS)
    settings, hooks = settings or InversionSettings(), hooks or Hooks()
    ptype = denoiser.prediction_type
    _check_inversion(x, sigmas, negative_cond, settings, ptype)
    gen = torch.Generator().manual_seed(int(settings.seed))
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)
    n = len(sigmas) - 1
    x = x.detach().clone()
    recorder = _recorder(denoiser, settings, n)
    keep = settings.keep_trajectory or settings.record is not None
    trajectory = [x] if keep else []
    with torch.no_grad():
        for i in range(n):
            hooks.interrupt()
            s_e, x_in = eval_point(x, sigmas[i], sigmas[i + 1], settings.eval_at, ptype)
            capture = recorder.wants(i) if recorder is not None else None
            p = _source_prediction(denoiser, x_in, s_e, (cond, negative_cond), settings.cfg, capture)
            if capture:
                recorder.add(i, p)
            eps = p.eps
            if settings.regularization is not None:  # on the Gaussian noise the prediction implies (VP: eps itself)
                noise = settings.regularization(implied_noise(x_in, eps, s_e, ptype), gen)
                eps = eps_from_noise(x_in, noise, s_e, ptype)
            x = ddim_step(x, eps, sigmas[i], sigmas[i + 1])
            if keep:
                trajectory.append(x)
            hooks.progress(i, n, x)
    if not torch.isfinite(x).all():
        logger.error("DDIM inversion produced non-finite values")
        raise FloatingPointError("DDIM inversion produced NaN/Inf: check the model and the latent")
    return Inversion(latent=x, sigmas=sigmas, trajectory=trajectory, record=_finished(recorder, settings, n))


def _check_inversion(x: Tensor, sigmas: Tensor, negative_cond: Any, settings: InversionSettings, ptype: str) -> None:
    """``ValueError`` for a bad convention, grid, missing negative or non-finite latent."""
    check_eval_at(settings.eval_at, prediction_type=ptype)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D grid of at least 2 levels, got shape {tuple(sigmas.shape)}")
    if bool((sigmas[1:] <= sigmas[:-1]).any()):
        raise ValueError("inversion sigmas must be strictly ascending")
    if settings.cfg != 1.0 and negative_cond is None:
        raise ValueError("inversion with cfg != 1 needs a negative conditioning")
    if not torch.isfinite(x).all():
        raise ValueError("the latent to invert contains NaN or Inf")


def eval_point(x: Tensor, s_a: Tensor, s_b: Tensor, eval_at: str, prediction_type: str) -> tuple[Tensor, Tensor]:
    """``(sigma, latent)`` where the model is queried for the step from ``s_a`` up to ``s_b``: "current" at
    ``s_a`` with ``x`` as it is; "next" at ``s_b`` with the VP latent re-expressed at that level."""
    if eval_at == "current":
        return s_a, x
    return s_b, x * (input_scale(s_a, prediction_type) / input_scale(s_b, prediction_type))


def _source_prediction(
    denoiser: Denoiser, x_in: Tensor, sigma: Tensor, conds: tuple[Any, Any], cfg: float, capture
) -> Prediction:
    """The source's prediction at ``sigma`` (with ``capture``'s captures); with ``cfg`` != 1 its ``eps`` is the
    CFG mix with the negative (``conds`` = (source, negative))."""
    cond, negative_cond = conds
    if cfg == 1.0:
        (p,) = denoiser.predict(x_in, sigma, [cond], capture)
        return p
    p_neg, p_pos = denoiser.predict(x_in, sigma, [negative_cond, cond])
    return p_pos._replace(eps=cfg_combine(p_neg.eps, p_pos.eps, cfg))


def _recorder(denoiser: Denoiser, settings: InversionSettings, n: int) -> Recorder | None:
    """The recorder of the reference captures, when ``settings.record`` asks and the inversion's forwards are
    the reference's ("current", cfg 1); else None (logged when a record was asked)."""
    if settings.record is None:
        return None
    if settings.eval_at == "current" and settings.cfg == 1.0:
        record = settings.record
        return Recorder(record, denoiser.layers() if record.guidance else [], n, settings.eval_at, settings.cfg)
    logger.info(
        "reference record: nothing recorded (eval_at %r, cfg %s: not the reference's forwards)",
        settings.eval_at,
        settings.cfg,
    )
    return None


def _finished(recorder: Recorder | None, settings: InversionSettings, n: int) -> ReferenceRecord | None:
    """The record to return: the recorder's, an empty one where nothing could be recorded, None if none asked."""
    if settings.record is None:
        return None
    if recorder is not None:
        return recorder.finish()
    return ReferenceRecord(CaptureRequest(), n, settings.eval_at, settings.cfg)
