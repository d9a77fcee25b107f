"""The guided DDIM loop of pix2pix-zero(Con), over any ``Denoiser``.

Two branches run in lockstep from the same inverted latent: the *reference* branch denoises with the
source (caption) conditioning and records the captures the guidance needs; the *edit* branch, at every
step, first takes one gradient step on its latent to bring its captures close to the reference's, then
a CFG DDIM step with the edited conditioning. Reference captures are used at once and dropped, so only
one step's maps are ever held (pix2pix-zero keeps all steps').
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .denoiser import CaptureRequest, Denoiser, Prediction
from .diffuseit_start import renoise
from .guidance import GuidanceTerm, StepContext
from .log import logger

STEP_MODES = ("raw", "normalized")
BRANCHES = ("edit", "both")


@dataclass
class SampleResult:
    """``latent``: the edit (sigma space at the last sigma). ``reference``: the reconstruction, when the
    reference branch ran at every step, else None. ``skipped``: step indices whose guidance gradient was
    not finite (no update was made). ``losses``: per step, the weighted loss of each active term."""

    latent: Tensor
    reference: Tensor | None
    skipped: list[int] = field(default_factory=list)
    losses: list[dict[str, float]] = field(default_factory=list)


def ddim_step(x: Tensor, eps: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """DDIM (eta = 0) in sigma space: ``x + (sigma_next - sigma) * eps`` (= x0 when sigma_next is 0)."""
    return x + (sigma_next - sigma) * eps


def cfg_combine(eps_neg: Tensor, eps_pos: Tensor, cfg: float) -> Tensor:
    """Classifier-free guidance: ``eps_neg + cfg * (eps_pos - eps_neg)``."""
    return eps_neg + cfg * (eps_pos - eps_neg)


def _merged_request(terms: Sequence[GuidanceTerm], layers) -> tuple[list[CaptureRequest], CaptureRequest]:
    reqs = [t.request(layers) for t in terms]
    merged = CaptureRequest()
    for r in reqs:
        merged = merged | r
    return reqs, merged


def _check_sigmas(x: Tensor, sigmas: Tensor) -> None:
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D grid of at least 2 levels, got shape {tuple(sigmas.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("the starting latent contains NaN or Inf")


def guided_ddim_sample(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    source_cond: Any,
    edit_cond: Any,
    negative_cond: Any = None,
    cfg: float = 5.0,
    guidance: Sequence[GuidanceTerm] = (),
    step_mode: str = "raw",
    step_size: float = 0.02,
    branches: str = "edit",
    keep_reference: bool = False,
    seed: int = 0,
    callback: Callable[[int, int, Tensor, Tensor], None] | None = None,
    check_interrupt: Callable[[], None] | None = None,
    resample: int = 1,
) -> SampleResult:
    """Run the guided DDIM loop from ``x`` (sigma space, at ``sigmas[0]``) down the descending ``sigmas``.

    - ``negative_cond`` None means the source (caption) is the negative, pix2pix-zero's choice for real
      images; then the reference branch is a pure DDIM reconstruction at batch 1.
    - ``step_mode`` "raw": ``z <- z - grad_z(sum_k w_k L_k)`` on the VP latent ``z`` (pix2pix-zero; the
      weights are step sizes). "normalized": the same direction rescaled to RMS ``step_size`` (VP units).
    - ``branches`` "edit": guide the edit-conditioned forward only (batch 1, cheaper); "both": also the
      negative-conditioned half, losses averaged over the halves (pix2pix-zero's batch of two).
    - A step whose gradient is not finite is skipped (logged; listed in ``SampleResult.skipped``).
    - ``callback(i, n, x, x0)`` after each step; ``check_interrupt()`` before each (it raises to stop).
    - The reference branch runs only while an active term requests captures (or with ``keep_reference``).
    - ``resample`` N > 1: DiffuseIT's first-step resampling (docs/method.md §9): the first step
      (guidance + DDIM step) is done N times, each but the last followed by an exact re-noise from
      ``sigmas[1]`` back to ``sigmas[0]`` with fresh noise (seeded by ``seed``). N = 1: plain sampling.
    """
    if step_mode not in STEP_MODES:
        raise ValueError(f"step_mode must be one of {STEP_MODES}, got {step_mode!r}")
    if branches not in BRANCHES:
        raise ValueError(f"branches must be one of {BRANCHES}, got {branches!r}")
    _check_sigmas(x, sigmas)
    if not isinstance(resample, int) or isinstance(resample, bool) or resample < 1:
        raise ValueError(f"resample must be an integer >= 1, got {resample!r}")
    terms = tuple(guidance)
    n = len(sigmas) - 1
    layers = denoiser.layers() if terms else []
    reqs, merged = _merged_request(terms, layers)
    neg_is_source = negative_cond is None
    neg = source_cond if neg_is_source else negative_cond
    gen = torch.Generator().manual_seed(int(seed))
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)

    x = x.detach().clone()
    # The reference branch must advance at every step up to the last one where a capturing term is active.
    last_active = max((i for i in range(n) for t, r in zip(terms, reqs) if r and t.active(i, n)), default=-1)
    ref_until = n if keep_reference else last_active + 1
    x_ref = x.clone() if ref_until > 0 else None
    result = SampleResult(latent=x, reference=None)
    state: dict = {}  # per-run scratch space of the terms (StepContext.state)
    noise_gen = torch.Generator().manual_seed(int(seed) + 1) if resample > 1 else None

    with denoiser.autograd_session():
        for i in range(n):
            if check_interrupt is not None:
                check_interrupt()
            s, s_next = sigmas[i], sigmas[i + 1]
            active = [(t, r) for t, r in zip(terms, reqs) if t.active(i, n)]

            ref_preds: list[Prediction] | None = None
            if x_ref is not None and i < ref_until:
                with torch.no_grad():
                    capture = merged if active else None
                    if neg_is_source:
                        (p_src,) = denoiser.predict(x_ref, s, [source_cond], capture)
                        ref_preds = [p_src, p_src]
                        eps_ref = p_src.eps
                    else:
                        p_neg, p_src = denoiser.predict(x_ref, s, [neg, source_cond], capture)
                        ref_preds = [p_neg, p_src]
                        eps_ref = cfg_combine(p_neg.eps, p_src.eps, cfg)
                    x_ref = ddim_step(x_ref, eps_ref, s, s_next)

            repeats = resample if i == 0 else 1
            for r in range(repeats):
                if r > 0:
                    if check_interrupt is not None:
                        check_interrupt()
                    x = renoise(x, s_next, s, noise_gen)
                if active:
                    x = _guidance_step(
                        denoiser,
                        x,
                        s,
                        i,
                        n,
                        active,
                        ref_preds,
                        neg,
                        edit_cond,
                        branches,
                        step_mode,
                        step_size,
                        gen,
                        result,
                        s_next,
                        state,
                    )

                with torch.no_grad():
                    p_neg, p_edit = denoiser.predict(x, s, [neg, edit_cond])
                    eps = cfg_combine(p_neg.eps, p_edit.eps, cfg)
                    x0 = x - s * eps
                    x = ddim_step(x, eps, s, s_next)
            if callback is not None:
                callback(i, n, x, x0)

    result.latent = x
    result.reference = x_ref if ref_until == n else None
    if result.skipped:
        logger.warning(
            "guidance skipped at %d of %d steps (non-finite gradient): %s", len(result.skipped), n, result.skipped
        )
    return result


def _guidance_step(
    denoiser: Denoiser,
    x: Tensor,
    s: Tensor,
    i: int,
    n: int,
    active,
    ref_preds: list[Prediction] | None,
    neg: Any,
    edit_cond: Any,
    branches: str,
    step_mode: str,
    step_size: float,
    gen: torch.Generator,
    result: SampleResult,
    s_next: Tensor | None = None,
    state: dict | None = None,
) -> Tensor:
    """One gradient step on the edit latent ``x`` (sigma space); returns the updated latent.

    ``ref_preds`` is None when no active term requested captures (their ``StepContext.ref`` is None).
    """
    state = {} if state is None else state
    merged = CaptureRequest()
    for _, r in active:
        merged = merged | r
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        if branches == "edit":
            preds = denoiser.predict(xg, s, [edit_cond], merged)
            pairs = [(preds[0], ref_preds[1] if ref_preds is not None else None)]
        else:
            preds = denoiser.predict(xg, s, [neg, edit_cond], merged)
            refs = ref_preds if ref_preds is not None else [None, None]
            pairs = [(preds[0], refs[0]), (preds[1], refs[1])]
        total = None
        logged: dict[str, float] = {}
        for term, req in active:
            term_loss = None
            for edit_p, ref_p in pairs:
                ctx = StepContext(i, n, s, xg, edit_p.eps, edit_p, ref_p, gen, s_next, state)
                value = term.loss(ctx, req)
                term_loss = value if term_loss is None else term_loss + value
            term_loss = term_loss / len(pairs)
            weighted = term.weight * term_loss
            logged[type(term).__name__] = float(weighted.detach())
            total = weighted if total is None else total + weighted
        (grad,) = torch.autograd.grad(total, xg)
    result.losses.append(logged)
    if not torch.isfinite(grad).all():
        logger.warning("step %d: guidance gradient is not finite; step skipped", i)
        result.skipped.append(i)
        return x
    scale = 1.0 + s * s  # d/dz = sqrt(1+s^2) d/dx, and dx = sqrt(1+s^2) dz
    if step_mode == "raw":
        update = grad * scale
    else:
        rms = grad.pow(2).mean().sqrt().clamp_min(1e-12)
        update = grad / rms * step_size * scale.sqrt()
    return (x - update).detach()
