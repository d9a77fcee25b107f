"""The guided DDIM loop of pix2pix-zero(Con), over any ``Denoiser``.

Two branches run in lockstep from the same inverted latent: the *reference* branch denoises with the
source (caption) conditioning and records the captures the guidance needs; the *edit* branch, at every
step, first takes one gradient step on its latent to bring its captures close to the reference's, then
a CFG DDIM step with the edited conditioning. Reference captures are used at once and dropped, so only
one step's maps are ever held (pix2pix-zero keeps all steps').

How the guidance step treats the two halves of the CFG batch is ``SamplerSettings.branches`` (see there).

``SamplerSettings.reference`` "inverted" (the default, where exact) pins the reference branch to the
inverted trajectory instead (Direct Inversion's source branch) and replays the captures ``ddim_invert``
recorded (``replay``), saving the reference forward at every step but the first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor

from .denoiser import CaptureRequest, Denoiser, Prediction
from .diffuseit_start import renoise
from .guidance import GuidanceTerm, StepContext
from .log import logger
from .parameterization import gradient_scale
from .replay import REFERENCES, merged_request, record_gap, replayed, resolve_reference

if TYPE_CHECKING:
    from .inversion import Inversion

STEP_MODES = ("raw", "normalized")
BRANCHES = ("edit", "both", "pix2pix-zero")


@dataclass(frozen=True)
class SamplerSettings:
    """How the guided loop runs: everything but the model, the latents, the conditionings and the terms.

    - ``cfg``: classifier-free guidance scale between the negative and the edit.
    - ``step_mode`` "raw": ``z <- z - grad_z(sum_k w_k L_k)`` on the VP latent ``z`` (pix2pix-zero; the
      weights are step sizes). "normalized": the same direction rescaled to RMS ``step_size`` (VP units).
    - ``branches`` (what the guidance step differentiates):

      - "edit": only the edit-conditioned forward of the latent is guided (batch 1, cheapest);
      - "both": the negative- and the edit-conditioned forwards of the *one* latent, each compared with
        its own reference half, losses averaged; the single latent gets the summed gradient;
      - "pix2pix-zero": pix2pix-zero's own update: two copies of the latent (the negative's and the
        edit's), each moved by its own half of the averaged loss's gradient, the CFG noise recomputed as
        negative(copy 0) and edit(copy 1), and copy 0 carried on to the DDIM step.

    - ``seed``: seeds ``StepContext.generator`` (the terms' random draws while sampling; PatchNCE's locations
      come from its own seed, ``PatchNCEGuidance.seed``, so that the inversion can record them) and the
      resampling noise.
    - ``resample`` N > 1: DiffuseIT's first-step resampling: the first step (guidance + DDIM step) is
      done N times, each but the last followed by an exact re-noise from ``sigmas[1]`` back to
      ``sigmas[0]`` with fresh noise. N = 1: plain sampling.
    - ``keep_reference``: run the reference branch at every step (to return the reconstruction) even
      where no active term needs its captures.
    - ``reference``: "inverted": the reference latent at step ``i`` is the inversion's ``trajectory[n - i]``
      and its captures are replayed from the inversion's record (a live forward on that latent where
      nothing was recorded, and always at step 0); the reconstruction is the inversion's start latent.
      Exact only for the "current" convention, no inversion CFG, the source as the negative and branches
      other than "pix2pix-zero"; otherwise (or without an inversion) it falls back to "resampled", logged
      and noted in ``SampleResult.notes``. "resampled": the reference branch is denoised in lockstep.
    - ``reuse_guidance_eps`` (opt-in, branches "edit" only; not the method): at a guided step the CFG step
      takes the edit's noise from the guidance forward, i.e. at the latent *before* the gradient step, and
      runs the negative alone at the moved latent: one batch-1 forward fewer per guided step (a guided step
      costs about 1.8 plain CFG steps instead of 2.2 on CPU). Inexact: the edit noise lags the guidance
      update by one gradient step (``cfg * (eps_edit(x) - eps_edit(x - dx))`` in the CFG noise).

    Raises ``ValueError`` on construction for an unknown ``step_mode`` / ``branches`` or a bad ``resample``.
    """

    cfg: float = 5.0
    step_mode: str = "raw"
    step_size: float = 0.02
    branches: str = "edit"
    seed: int = 0
    resample: int = 1
    keep_reference: bool = False
    reference: str = "inverted"
    reuse_guidance_eps: bool = False

    def __post_init__(self) -> None:
        if self.step_mode not in STEP_MODES:
            raise ValueError(f"step_mode must be one of {STEP_MODES}, got {self.step_mode!r}")
        if self.branches not in BRANCHES:
            raise ValueError(f"branches must be one of {BRANCHES}, got {self.branches!r}")
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {self.reference!r}")
        if not isinstance(self.resample, int) or isinstance(self.resample, bool) or self.resample < 1:
            raise ValueError(f"resample must be an integer >= 1, got {self.resample!r}")
        if self.reuse_guidance_eps and self.branches != "edit":
            raise ValueError(f"reuse_guidance_eps needs branches 'edit' (one guided forward), got {self.branches!r}")


@dataclass
class SampleResult:
    """``latent``: the edit (sigma space at the last sigma). ``reference``: the reconstruction, when the
    reference branch ran at every step, else None. ``skipped``: step indices whose guidance gradient was
    not finite (no update was made). ``losses``: per step, the weighted loss of each active term.
    ``reference_mode``: the reference actually used ("inverted" or "resampled"). ``replayed``: steps whose
    reference captures came from the inversion's record. ``notes``: why the reference differs from the
    settings' or why steps ran a live reference forward (fallbacks), one sentence each."""

    latent: Tensor
    reference: Tensor | None
    skipped: list[int] = field(default_factory=list)
    losses: list[dict[str, float]] = field(default_factory=list)
    reference_mode: str = "resampled"
    replayed: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class GuidedStep:
    """What one guidance step sees besides the latent and the settings.

    ``active``: the (term, capture request) pairs active at this step. ``ref_preds``: the reference
    branch's predictions under (negative, source) at this step, detached; None when no active term
    requested captures. ``sigma`` / ``sigma_next``: 0-d levels of this step. ``state``: the terms' scratch
    space for the run (``StepContext.state``).
    """

    denoiser: Denoiser
    step: int
    num_steps: int
    sigma: Tensor
    sigma_next: Tensor | None
    active: Sequence[tuple[GuidanceTerm, CaptureRequest]]
    ref_preds: list[Prediction] | None
    negative_cond: Any
    edit_cond: Any
    generator: torch.Generator
    state: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StepOutcome:
    """``latents``: the guided latent, or for branches="pix2pix-zero" its two copies (negative's, edit's);
    unchanged when the gradient was not finite (``finite`` False). ``losses``: weighted loss per term."""

    latents: tuple[Tensor, ...]
    losses: dict[str, float]
    finite: bool


def ddim_step(x: Tensor, eps: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """DDIM (eta = 0) in sigma space: ``x + (sigma_next - sigma) * eps`` (= x0 when sigma_next is 0)."""
    return x + (sigma_next - sigma) * eps


def cfg_combine(eps_neg: Tensor, eps_pos: Tensor, cfg: float) -> Tensor:
    """Classifier-free guidance: ``eps_neg + cfg * (eps_pos - eps_neg)``."""
    return eps_neg + cfg * (eps_pos - eps_neg)


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
    guidance: Sequence[GuidanceTerm] = (),
    settings: SamplerSettings = SamplerSettings(),
    callback: Callable[[int, int, Tensor, Tensor], None] | None = None,
    check_interrupt: Callable[[], None] | None = None,
    inversion: Inversion | None = None,
) -> SampleResult:
    """Run the guided DDIM loop from ``x`` (sigma space, at ``sigmas[0]``) down the descending ``sigmas``.

    - ``negative_cond`` None means the source (caption) is the negative, pix2pix-zero's choice for real
      images; then the reference branch is a pure DDIM reconstruction at batch 1.
    - ``settings``: CFG scale, step mode, branches, seed, resampling (``SamplerSettings``).
    - A step whose gradient is not finite is skipped (logged; listed in ``SampleResult.skipped``).
    - ``callback(i, n, x, x0)`` after each step; ``check_interrupt()`` before each (it raises to stop).
    - The reference branch runs only while an active term requests captures (or with ``keep_reference``).
    - ``inversion``: the ``ddim_invert`` result ``x`` came from (its trajectory and record), for
      ``settings.reference`` "inverted"; its grid must be ``sigmas`` reversed.
    """
    _check_sigmas(x, sigmas)
    terms = tuple(guidance)
    n = len(sigmas) - 1
    layers = denoiser.layers() if terms else []
    reqs, merged = merged_request(terms, layers)
    neg_is_source = negative_cond is None
    neg = source_cond if neg_is_source else negative_cond
    cfg = settings.cfg
    gen = torch.Generator().manual_seed(int(settings.seed))
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)

    x = x.detach().clone()
    notes: list[str] = []
    mode, traj, record = _reference_source(settings, inversion, sigmas, x, neg_is_source, notes)
    replay_steps: list[int] = []
    live_steps: list[int] = []  # "inverted" steps after the first whose captures were not in the record
    # The reference branch must advance at every step up to the last one where a capturing term is active.
    last_active = max((i for i in range(n) for t, r in zip(terms, reqs) if r and t.active(i, n)), default=-1)
    ref_until = n if settings.keep_reference else last_active + 1
    x_ref = x.clone() if ref_until > 0 and mode == "resampled" else None
    gap = record_gap(record, terms, layers) if record is not None and merged else ""
    if gap:
        notes.append(f"{gap}: the reference forward runs at every step")
        logger.warning("reference record: %s", notes[-1])
        record = None
    skipped: list[int] = []
    losses: list[dict[str, float]] = []
    state: dict = {}  # per-run scratch space of the terms (StepContext.state)
    noise_gen = torch.Generator().manual_seed(int(settings.seed) + 1) if settings.resample > 1 else None
    memo = _GuidanceEps(denoiser, edit_cond) if settings.reuse_guidance_eps else None

    with denoiser.autograd_session():
        for i in range(n):
            if check_interrupt is not None:
                check_interrupt()
            s, s_next = sigmas[i], sigmas[i + 1]
            active = [(t, r) for t, r in zip(terms, reqs) if t.active(i, n)]

            ref_preds: list[Prediction] | None = None
            if mode == "inverted" and active and i < ref_until and merged:
                p_src = replayed(record, n - i, merged, x) if record is not None and i > 0 else None
                if p_src is None:
                    if i > 0:
                        live_steps.append(i)
                    with torch.no_grad():
                        (p_src,) = denoiser.predict(traj[n - i], s, [source_cond], merged)
                else:
                    replay_steps.append(i)
                ref_preds = [p_src, p_src]
            elif x_ref is not None and i < ref_until:
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

            repeats = settings.resample if i == 0 else 1
            for r in range(repeats):
                if r > 0:
                    if check_interrupt is not None:
                        check_interrupt()
                    x = renoise(x, s_next, s, noise_gen, denoiser.prediction_type)
                copies: tuple[Tensor, ...] = (x,)
                if active:
                    den = memo if memo is not None else denoiser
                    step = GuidedStep(den, i, n, s, s_next, active, ref_preds, neg, edit_cond, gen, state)
                    outcome = _guidance_step(x, step, settings)
                    losses.append(outcome.losses)
                    if outcome.finite:
                        copies = outcome.latents
                    else:
                        logger.warning("step %d: guidance gradient is not finite; step skipped", i)
                        skipped.append(i)

                with torch.no_grad():
                    eps_edit = memo.take() if memo is not None else None
                    if eps_edit is not None:  # reuse_guidance_eps: the edit's noise from the guidance forward
                        (p_neg,) = denoiser.predict(copies[0], s, [neg])
                        p_edit = p_neg._replace(eps=eps_edit)
                    elif len(copies) == 1:
                        p_neg, p_edit = denoiser.predict(copies[0], s, [neg, edit_cond])
                    else:  # pix2pix-zero: the negative's noise from copy 0, the edit's from copy 1
                        (p_neg,) = denoiser.predict(copies[0], s, [neg])
                        (p_edit,) = denoiser.predict(copies[1], s, [edit_cond])
                    x = copies[0]
                    eps = cfg_combine(p_neg.eps, p_edit.eps, cfg)
                    x0 = x - s * eps
                    x = ddim_step(x, eps, s, s_next)
            if callback is not None:
                callback(i, n, x, x0)

    if skipped:
        logger.warning("guidance skipped at %d of %d steps (non-finite gradient): %s", len(skipped), n, skipped)
    if live_steps:
        notes.append(f"steps {live_steps} ran the reference forward on the inverted latent (not in the record)")
        logger.info("reference: %s", notes[-1])
    if mode == "inverted":
        reconstruction = traj[0] if ref_until == n else None
    else:
        reconstruction = x_ref if ref_until == n else None
    return SampleResult(
        latent=x,
        reference=reconstruction,
        skipped=skipped,
        losses=losses,
        reference_mode=mode,
        replayed=replay_steps,
        notes=notes,
    )


class _GuidanceEps:
    """The denoiser as the guidance step sees it with ``reuse_guidance_eps``: keeps, detached, the eps of the
    last grad-enabled forward under the edit conditioning alone (the "edit" branches' guidance forward)."""

    def __init__(self, denoiser: Denoiser, edit_cond: Any) -> None:
        self.denoiser, self.edit_cond, self.eps = denoiser, edit_cond, None

    def __getattr__(self, name: str):
        return getattr(self.denoiser, name)

    def predict(self, x: Tensor, sigma: Tensor, conds: Sequence[Any], capture: CaptureRequest | None = None):
        preds = self.denoiser.predict(x, sigma, conds, capture)
        if torch.is_grad_enabled() and len(conds) == 1 and conds[0] is self.edit_cond:
            self.eps = preds[0].eps.detach()
        return preds

    def take(self) -> Tensor | None:
        """The kept eps (None if no guidance forward ran since the last call)."""
        eps, self.eps = self.eps, None
        return eps


def _reference_source(
    settings: SamplerSettings, inversion, sigmas: Tensor, x: Tensor, neg_is_source: bool, notes: list[str]
):
    """``(mode, trajectory, record)`` for the run: the reference mode after fallbacks (each noted and
    logged), the inverted latents cast like ``x`` (None for "resampled") and the inversion's record."""
    traj = list(getattr(inversion, "trajectory", None) or [])
    record = getattr(inversion, "record", None)
    mode, why = resolve_reference(
        settings.reference,
        record,
        has_trajectory=bool(traj),
        negative_is_source=neg_is_source,
        branches=settings.branches,
    )
    mismatch = ""  # a caller's mistake (warned about); the other reasons are settings, or no inversion at all
    if mode == "inverted":
        n = len(sigmas) - 1
        inv_sigmas = inversion.sigmas.to(device=sigmas.device, dtype=sigmas.dtype)
        # the last sampling level is never evaluated (its inverted twin may be FlipSigmas' 1e-4 for a 0)
        same_grid = len(inv_sigmas) == n + 1 and torch.allclose(inv_sigmas.flip(0)[:-1], sigmas[:-1])
        if len(traj) != n + 1 or not same_grid:
            mismatch = "the sampling grid is not the inversion's grid reversed"
        elif tuple(traj[-1].shape) != tuple(x.shape):
            mismatch = "the latent's shape differs from the inversion's"
    if mismatch:
        mode, why = "resampled", f"reference 'inverted' falls back to 'resampled': {mismatch}"
    if why:
        notes.append(why)
        (logger.warning if mismatch else logger.info)(why)
    if mode != "inverted":
        return mode, None, None
    return mode, [t.to(device=x.device, dtype=x.dtype) for t in traj], record


def _guidance_step(x: Tensor, step: GuidedStep, settings: SamplerSettings) -> StepOutcome:
    """One gradient step on the edit latent ``x`` (sigma space) for ``settings.branches``.

    Each term's loss is averaged over the (prediction, reference) pairs the branches mode compares:
    "edit" one pair (edit forward, source reference); "both" and "pix2pix-zero" two (negative forward with
    the negative's reference half, edit forward with the source's). In "both" the two forwards share one
    latent; in "pix2pix-zero" each has its own copy, and each copy takes its own gradient.
    """
    den, s = step.denoiser, step.sigma
    merged = CaptureRequest()
    for _, r in step.active:
        merged = merged | r
    refs = step.ref_preds if step.ref_preds is not None else [None, None]
    with torch.enable_grad():
        if settings.branches == "edit":
            leaves = (x.detach().requires_grad_(True),)
            (p_edit,) = den.predict(leaves[0], s, [step.edit_cond], merged)
            pairs = [(leaves[0], p_edit, refs[1])]
        elif settings.branches == "both":
            leaves = (x.detach().requires_grad_(True),)
            p_neg, p_edit = den.predict(leaves[0], s, [step.negative_cond, step.edit_cond], merged)
            pairs = [(leaves[0], p_neg, refs[0]), (leaves[0], p_edit, refs[1])]
        else:  # pix2pix-zero: one copy of the latent per CFG half
            leaves = (x.detach().requires_grad_(True), x.detach().clone().requires_grad_(True))
            (p_neg,) = den.predict(leaves[0], s, [step.negative_cond], merged)
            (p_edit,) = den.predict(leaves[1], s, [step.edit_cond], merged)
            pairs = [(leaves[0], p_neg, refs[0]), (leaves[1], p_edit, refs[1])]
        total = None
        logged: dict[str, float] = {}
        for term, req in step.active:
            term_loss = None
            for xg, pred, ref in pairs:
                ctx = StepContext(
                    step.step, step.num_steps, s, xg, pred.eps, pred, ref, step.generator, step.sigma_next, step.state
                )
                value = term.loss(ctx, req)
                term_loss = value if term_loss is None else term_loss + value
            weighted = term.weight * (term_loss / len(pairs))
            logged[type(term).__name__] = float(weighted.detach())
            total = weighted if total is None else total + weighted
        grads = torch.autograd.grad(total, leaves)
    if not all(torch.isfinite(g).all() for g in grads):
        return StepOutcome((x,), logged, finite=False)
    scale = gradient_scale(s, den.prediction_type)  # VP: 1 + s^2 (d/dz = sqrt(1+s^2) d/dx, dx = sqrt(1+s^2) dz)
    if settings.step_mode == "raw":
        updates = [g * scale for g in grads]
    else:  # the copies' gradients rescaled together (one RMS over all of them)
        rms = torch.cat([g.flatten() for g in grads]).pow(2).mean().sqrt().clamp_min(1e-12)
        updates = [g / rms * settings.step_size * scale.sqrt() for g in grads]
    return StepOutcome(tuple((x - u).detach() for u in updates), logged, finite=True)
