"""Deterministic DDIM inversion in sigma space, with pix2pix-zero's optional noise regularisation.

Each step goes up the ascending grid from level ``a`` to ``b``: eps is predicted for the latent (under the
source conditioning, optionally with CFG), optionally regularised, and ``x_b = x_a + (s_b - s_a) * eps``.
Where the model is queried is a choice:

- ``"current"`` (default): at ``s_a`` with the latent as it is: Euler on flipped sigmas, exactly what
  ComfyUI's ``FlipSigmas`` + ``ddim`` sampler does;
- ``"next"``: at ``s_b`` with the same VP latent re-expressed at that level: diffusers'
  ``DDIMInverseScheduler`` / null-text inversion convention (exact for eps-prediction models). VP models only:
  a flow-matching model (``prediction_type`` "flow") is a ``ValueError`` (``check_eval_at``).

Flow-matching models (SD3, Flux): ``eps`` is the velocity and the same step is the Euler ODE run backwards, the
exact analogue of DDIM inversion (ComfyUI's ``FlipSigmas`` + ``euler``). The noise regulariser acts on the
implied noise ``n = x + (1 - t) v`` and the velocity is recovered from the regularised noise
(``parameterization.implied_noise``; our choice, docs/method.md §9b).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from ..common.log import logger
from .denoiser import CaptureRequest, Denoiser
from .losses import auto_corr_loss, kl_loss
from .parameterization import eps_from_noise, implied_noise, input_scale, is_flow
from .replay import Recorder, RecordSettings, ReferenceRecord
from .steps import cfg_combine

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


@dataclass
class Inversion:
    """Result of ``ddim_invert``: ``latent`` at ``sigmas[-1]`` (sigma space), the ascending ``sigmas`` and
    the ``trajectory`` of latents, one per level (``trajectory[k]`` is at ``sigmas[k]``). ``record``: the
    reference captures recorded for the sampler to replay (``ddim_invert(record=...)``), else None."""

    latent: Tensor
    sigmas: Tensor
    trajectory: list[Tensor] = field(default_factory=list)
    record: ReferenceRecord | None = None


def ddim_invert(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    cond: Any,
    *,
    negative_cond: Any = None,
    cfg: float = 1.0,
    eval_at: str = "current",
    regularization: NoiseRegularization | None = None,
    seed: int = 0,
    keep_trajectory: bool = True,
    record: RecordSettings | None = None,
    callback: Callable[[int, int, Tensor], None] | None = None,
    check_interrupt: Callable[[], None] | None = None,
) -> Inversion:
    """Invert the latent ``x`` (sigma space, at level ``sigmas[0]``) up the ascending grid ``sigmas``.

    ``cfg`` 1 (default, pix2pix-zero) uses ``cond`` alone; otherwise ``negative_cond`` is required.
    ``seed`` seeds the regulariser's random shifts. ``callback(i, n, x)`` after each step. Flow models
    (``denoiser.prediction_type`` "flow"): the backward Euler ODE, regulariser on the implied noise (module doc).
    ``record``: record the captures ``record.guidance`` requests for the sampler's "inverted" reference
    (``replay``; implies ``keep_trajectory``). Recorded only for eval_at "current" and cfg 1, where the
    inversion's forwards are the reference's; otherwise the record is empty and the sampler falls back.
    """
    ptype = denoiser.prediction_type
    check_eval_at(eval_at, prediction_type=ptype)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D grid of at least 2 levels, got shape {tuple(sigmas.shape)}")
    if bool((sigmas[1:] <= sigmas[:-1]).any()):
        raise ValueError("inversion sigmas must be strictly ascending")
    if cfg != 1.0 and negative_cond is None:
        raise ValueError("inversion with cfg != 1 needs a negative conditioning")
    if not torch.isfinite(x).all():
        raise ValueError("the latent to invert contains NaN or Inf")
    gen = torch.Generator().manual_seed(int(seed))
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)
    n = len(sigmas) - 1
    x = x.detach().clone()
    recorder = None
    if record is not None:
        keep_trajectory = True
        if eval_at == "current" and cfg == 1.0:
            recorder = Recorder(record, denoiser.layers() if record.guidance else [], n, eval_at, cfg)
        else:
            logger.info(
                "reference record: nothing recorded (eval_at %r, cfg %s: not the reference's forwards)", eval_at, cfg
            )
    trajectory = [x] if keep_trajectory else []
    with torch.no_grad():
        for i in range(n):
            if check_interrupt is not None:
                check_interrupt()
            s_a, s_b = sigmas[i], sigmas[i + 1]
            if eval_at == "current":
                s_e, x_in = s_a, x
            else:
                s_e = s_b
                x_in = x * (input_scale(s_a, ptype) / input_scale(s_e, ptype))
            if cfg == 1.0:
                capture = recorder.wants(i) if recorder is not None else None
                (p,) = denoiser.predict(x_in, s_e, [cond], capture)
                if capture:
                    recorder.add(i, p)
                eps = p.eps
            else:
                p_neg, p_pos = denoiser.predict(x_in, s_e, [negative_cond, cond])
                eps = cfg_combine(p_neg.eps, p_pos.eps, cfg)
            if regularization is not None:  # on the Gaussian noise the prediction implies (VP: eps itself)
                noise = regularization(implied_noise(x_in, eps, s_e, ptype), gen)
                eps = eps_from_noise(x_in, noise, s_e, ptype)
            x = x + (s_b - s_a) * eps
            if keep_trajectory:
                trajectory.append(x)
            if callback is not None:
                callback(i, n, x)
    if not torch.isfinite(x).all():
        logger.error("DDIM inversion produced non-finite values")
        raise FloatingPointError("DDIM inversion produced NaN/Inf: check the model and the latent")
    rec = None
    if record is not None:
        rec = recorder.finish() if recorder is not None else ReferenceRecord(CaptureRequest(), n, eval_at, cfg)
    return Inversion(latent=x, sigmas=sigmas, trajectory=trajectory, record=rec)
