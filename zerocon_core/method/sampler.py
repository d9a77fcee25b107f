"""The guided DDIM loop of pix2pix-zero(Con), over any ``Denoiser``.

At every step the *edit* branch first takes one gradient step on its latent to bring its captures (attention
maps, features) close to the *reference*'s, then a CFG step with the edited conditioning. In ComfyUI's sigma
space the step ``x + (sigma_next - sigma) * eps`` is DDIM for SD (VP) models and Euler on the velocity for
flow-matching models (SD3, Flux; ``parameterization``).

Where the reference comes from is ``SamplerSettings.reference``: "inverted" (the default, where exact) pins it
to the inversion's trajectory (Direct Inversion's source branch) and replays the captures ``ddim_invert``
recorded (``replay``), saving the reference forward at every step but the first; "resampled" denoises a
reference branch in lockstep with the source conditioning, its captures used at once and dropped (only one
step's maps are ever held; pix2pix-zero keeps all steps').

How the guidance step treats the two halves of the CFG batch is ``SamplerSettings.branches``; how the gradient
becomes a step, ``SamplerSettings.step_mode`` ("auto" by default: ``_auto_update``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor

from ..common.log import logger
from .denoiser import CaptureRequest, Denoiser, Prediction
from .guidance import GuidanceTerm, StepContext
from .parameterization import input_scale, renoise
from .replay import REFERENCES, merged_request, record_gap, replayed, resolve_reference
from .steps import cfg_combine

if TYPE_CHECKING:
    from .inversion import Inversion

STEP_MODES = ("auto", "raw", "normalized")
BRANCHES = ("edit", "both", "pix2pix-zero")
#: Step mode "auto": the default update, as a fraction of the latent's RMS per step. Not calibrated on real weights;
#: measured on the toy-world model trained here (docs/toyworld.md, docs/guide.md "Defaults"): the normalized mode's
#: 0.02; bench/calibrate_auto_step.py measures the raw defaults' step.
AUTO_STEP_SIZE = 0.02
#: Overflow retry: a gradient that is not finite is recomputed from the loss times this factor, then divided
#: by it in float32 (float16's largest value 65504 then stands for 4.3e9; what underflows is below 1e-12 of it).
RETRY_SCALE = 2.0**-16


def default_step_mode(branches: str) -> str:
    """The step mode when none is given: "raw" for branches "pix2pix-zero" (whose point is to be exactly
    pix2pix-zero's update, raw weights included), "auto" otherwise."""
    return "raw" if branches == "pix2pix-zero" else "auto"


def latent_scale(sigma: Tensor, prediction_type: str = "eps") -> Tensor:
    """``x = latent_scale(sigma) * z``: the sampler's sigma-space latent ``x`` over the model-input latent ``z``
    (VP: ``sqrt(1 + sigma^2)``; flow: 1, the model sees ``x`` itself: ``parameterization.input_scale``).
    Gradients go the other way: ``dL/dz = latent_scale * dL/dx``. The one place the step modes convert
    between the two spaces."""
    return 1.0 / input_scale(sigma, prediction_type)


@dataclass(frozen=True)
class SamplerSettings:
    """How the guided loop runs: everything but the model, the latents, the conditionings and the terms.

    - ``cfg``: classifier-free guidance scale between the negative and the edit. At 1 (no CFG: Flux-dev's
      distilled guidance) the step's noise is the edit's alone and the negative is not evaluated, as
      ComfyUI's own CFG skips it at 1 (the reference branch still runs where guidance needs it).
    - ``step_mode`` (``z``: the model-input latent, ``latent_scale``):

      - "auto": each active term's gradient divided by its own RMS (so a term's pull does not depend on its
        loss's scale, nor on the model's gradient scale), the unit gradients mixed by the terms' weights, which
        are unitless ratios (``auto_weights``), and the mix scaled to RMS ``step_size`` x RMS(``z``), per image:
        ``z <- z - step_size * rms(z) * d / rms(d)``, ``d = sum_k w_k g_k / rms(g_k)``. One backward pass per
        active term. A term whose gradient is exactly 0 (nothing to correct) adds nothing.
      - "raw": ``z <- z - grad_z(sum_k w_k L_k)`` (pix2pix-zero; the weights are step sizes).
      - "normalized": the raw direction rescaled to RMS ``step_size`` (model-input latent units, whole batch).
      - None (the default): ``default_step_mode(branches)``: "auto", or "raw" for branches "pix2pix-zero".

    - ``step_size``: the update's RMS in "auto" (a fraction of the latent's RMS: 0.02 = 2 %) and "normalized"
      (model-input latent units); unused by "raw".
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

    Raises ``ValueError`` on construction for an unknown ``step_mode`` / ``branches``, a negative
    ``step_size`` or a bad ``resample``.
    """

    cfg: float = 5.0
    step_mode: str | None = None
    step_size: float = AUTO_STEP_SIZE
    branches: str = "edit"
    seed: int = 0
    resample: int = 1
    keep_reference: bool = False
    reference: str = "inverted"
    reuse_guidance_eps: bool = False

    def __post_init__(self) -> None:
        if self.branches not in BRANCHES:
            raise ValueError(f"branches must be one of {BRANCHES}, got {self.branches!r}")
        if self.step_mode is None:
            object.__setattr__(self, "step_mode", default_step_mode(self.branches))
        if self.step_mode not in STEP_MODES:
            raise ValueError(f"step_mode must be one of {STEP_MODES}, got {self.step_mode!r}")
        if not (isinstance(self.step_size, (int, float)) and 0.0 <= float(self.step_size) < float("inf")):
            raise ValueError(f"step_size must be a finite number >= 0, got {self.step_size!r}")
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {self.reference!r}")
        if not isinstance(self.resample, int) or isinstance(self.resample, bool) or self.resample < 1:
            raise ValueError(f"resample must be an integer >= 1, got {self.resample!r}")
        if self.reuse_guidance_eps and self.branches != "edit":
            raise ValueError(f"reuse_guidance_eps needs branches 'edit' (one guided forward), got {self.branches!r}")


@dataclass(frozen=True)
class StepRecord:
    """What one guidance evaluation did (a step, or one of step 0's resampling repeats). Terms are keyed by
    class name (a second term of the same class gets " #2"...).

    ``step``: the sampler's step index; ``sigma``: its level. ``losses``: each term's loss before weighting
    (float32). ``weights``: the weight each term was used with (a ratio in "auto", a step size otherwise).
    ``grad_rms``: RMS of each term's (unweighted) loss gradient w.r.t. the model-input latent ``z``;
    ``pulls``: RMS of each term's share of the update, as a fraction of RMS(``z``). Both are measured where
    each term has its own backward pass ("auto", or a single active term) and empty otherwise. ``update``: the
    update's RMS as a fraction of RMS(``z``) (0 when skipped). ``retried``: the first gradient was not finite
    and was recomputed from the loss scaled by ``RETRY_SCALE``; ``skipped``: still not finite (no update).
    """

    step: int
    sigma: float
    losses: dict[str, float]
    weights: dict[str, float]
    grad_rms: dict[str, float]
    pulls: dict[str, float]
    update: float
    retried: bool = False
    skipped: bool = False


@dataclass
class SampleResult:
    """``latent``: the edit (sigma space at the last sigma). ``reference``: the reconstruction, when the
    reference branch ran at every step, else None. ``skipped``: step indices whose guidance gradient was
    not finite (no update was made). ``losses``: per guidance evaluation, the weighted loss of each active
    term. ``reference_mode``: the reference actually used ("inverted" or "resampled"). ``replayed``: steps
    whose reference captures came from the inversion's record. ``notes``: why the reference differs from the
    settings' or why steps ran a live reference forward (fallbacks), one sentence each. ``records``: per
    guidance evaluation (parallel to ``losses``), what it did (``StepRecord``). ``num_steps``: the sampler's
    steps; ``step_mode``: the step mode used (``diagnostics`` reads these three)."""

    latent: Tensor
    reference: Tensor | None
    skipped: list[int] = field(default_factory=list)
    losses: list[dict[str, float]] = field(default_factory=list)
    reference_mode: str = "resampled"
    replayed: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    records: list[StepRecord] = field(default_factory=list)
    num_steps: int = 0
    step_mode: str = "auto"


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
    unchanged when the gradient was not finite (``finite`` False). ``losses``: weighted loss per term.
    ``record``: the step's diagnostics (``StepRecord``)."""

    latents: tuple[Tensor, ...]
    losses: dict[str, float]
    finite: bool
    record: StepRecord | None = None


def ddim_step(x: Tensor, eps: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """DDIM (eta = 0) in sigma space: ``x + (sigma_next - sigma) * eps`` (= x0 when sigma_next is 0)."""
    return x + (sigma_next - sigma) * eps


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
    - A gradient that is not finite is recomputed once from the loss scaled down (``RETRY_SCALE``); a step
      whose gradient is still not finite is skipped (logged; listed in ``SampleResult.skipped``).
    - Every term's weight must be resolved (>= 0: ``auto_weights.resolve_weights``), else ``ValueError``.
    - ``callback(i, n, x, x0)`` after each step; ``check_interrupt()`` before each (it raises to stop).
    - The reference branch runs only while an active term requests captures (or with ``keep_reference``).
    - ``inversion``: the ``ddim_invert`` result ``x`` came from (its trajectory and record), for
      ``settings.reference`` "inverted"; its grid must be ``sigmas`` reversed.
    """
    _check_sigmas(x, sigmas)
    terms = tuple(guidance)
    for t in terms:
        if t.weight < 0:
            raise ValueError(
                f"{type(t).__name__} has an unresolved auto weight ({t.weight:g}): resolve it with "
                "zerocon_core.method.auto_weights.resolve_weights for the model's prediction type and the step mode"
            )
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
    records: list[StepRecord] = []
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
                    records.append(outcome.record)
                    if outcome.record.retried:
                        logger.info("step %d: the guidance gradient overflowed; recomputed from a scaled-down loss", i)
                    if outcome.finite:
                        copies = outcome.latents
                    else:
                        logger.warning("step %d: guidance gradient is not finite; step skipped", i)
                        skipped.append(i)

                with torch.no_grad():
                    eps_edit = memo.take() if memo is not None else None
                    x = copies[0]
                    if cfg == 1.0 and len(copies) == 1:  # no CFG (Flux-dev's distilled guidance): the edit alone
                        eps = eps_edit if eps_edit is not None else denoiser.predict(x, s, [edit_cond])[0].eps
                    else:
                        if eps_edit is not None:  # reuse_guidance_eps: the edit's noise from the guidance forward
                            (p_neg,) = denoiser.predict(x, s, [neg])
                            p_edit = p_neg._replace(eps=eps_edit)
                        elif len(copies) == 1:
                            p_neg, p_edit = denoiser.predict(x, s, [neg, edit_cond])
                        else:  # pix2pix-zero: the negative's noise from copy 0, the edit's from copy 1
                            (p_neg,) = denoiser.predict(x, s, [neg])
                            (p_edit,) = denoiser.predict(copies[1], s, [edit_cond])
                        eps = cfg_combine(p_neg.eps, p_edit.eps, cfg)
                    x0 = x - s * eps
                    x = ddim_step(x, eps, s, s_next)
            if callback is not None:
                callback(i, n, x, x0)

    if skipped:
        logger.warning("guidance skipped at %d of %d steps (non-finite gradient): %s", len(skipped), n, skipped)
    if live_steps and not gap:  # with a gap every step runs it, as its note already says
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
        records=records,
        num_steps=n,
        step_mode=settings.step_mode,
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
    """One gradient step on the edit latent ``x`` (sigma space) for ``settings.branches`` and ``step_mode``.

    Each term's loss is averaged over the (prediction, reference) pairs the branches mode compares:
    "edit" one pair (edit forward, source reference); "both" and "pix2pix-zero" two (negative forward with
    the negative's reference half, edit forward with the source's). In "both" the two forwards share one
    latent; in "pix2pix-zero" each has its own copy, and each copy takes its own gradient.

    Losses, gradients and the update are float32 (float64 when ``x`` is), whatever the model's dtype; the
    result is cast back to ``x``'s dtype. "auto" takes one backward pass per active term, the other modes one
    for the weighted sum. A gradient that is not finite is recomputed once (``_gradient``); still not finite:
    ``finite`` False and ``x`` unchanged.
    """
    den, s = step.denoiser, step.sigma
    merged = CaptureRequest()
    for _, r in step.active:
        merged = merged | r
    refs = step.ref_preds if step.ref_preds is not None else [None, None]
    names = _term_names(step.active)
    weights = [float(t.weight) for t, _ in step.active]
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
        term_losses: list[Tensor] = []
        for term, req in step.active:
            term_loss = None
            for xg, pred, ref in pairs:
                ctx = StepContext(
                    step.step, step.num_steps, s, xg, pred.eps, pred, ref, step.generator, step.sigma_next, step.state
                )
                value = _precise(term.loss(ctx, req))
                term_loss = value if term_loss is None else term_loss + value
            term_losses.append(term_loss / len(pairs))
        logged = {n: w * float(v.detach()) for n, w, v in zip(names, weights, term_losses)}
        unweighted = {n: float(v.detach()) for n, v in zip(names, term_losses)}
        if settings.step_mode == "auto":
            results = [_gradient(v, leaves) for v in term_losses]
            grads_per_term = [g for g, _, _ in results]
            retried = any(r for _, r, _ in results)
            finite = all(ok for _, _, ok in results)
        else:
            total = sum(w * v for w, v in zip(weights, term_losses))
            grads, retried, finite = _gradient(total, leaves)
    record = dict(step=step.step, sigma=float(s), losses=unweighted, weights=dict(zip(names, weights)))
    if not finite:
        rec = StepRecord(**record, grad_rms={}, pulls={}, update=0.0, retried=retried, skipped=True)
        return StepOutcome((x,), logged, finite=False, record=rec)
    k = latent_scale(_precise(s.detach()), den.prediction_type)
    x32 = _precise(x.detach())
    z_rms = _rms(x32 / k)
    if settings.step_mode == "auto":
        updates, grad_rms, pulls = _auto_update(x32 / k, grads_per_term, weights, settings.step_size, names)
        updates = [u * k for u in updates]  # back to sigma space
        grad_rms = {n: v * float(k) for n, v in grad_rms.items()}
    else:
        if settings.step_mode == "raw":
            updates = [g * (k * k) for g in grads]  # dz = -w k dL/dx, dx = k dz
        else:  # the copies' gradients rescaled together (one RMS over all of them)
            rms = torch.cat([g.flatten() for g in grads]).pow(2).mean().sqrt().clamp_min(1e-12)
            updates = [g / rms * settings.step_size * k for g in grads]
        grad_rms, pulls = {}, {}
        if len(names) == 1 and weights[0] > 0:  # one term: its share is the whole update
            grad_rms = {names[0]: _rms(torch.cat([g.flatten() for g in grads])) * float(k) / weights[0]}
    update = _rms(torch.cat([u.flatten() for u in updates])) / float(k) / z_rms if z_rms > 0 else 0.0
    if len(names) == 1 and settings.step_mode != "auto":
        pulls = {names[0]: update}
    rec = StepRecord(**record, grad_rms=grad_rms, pulls=pulls, update=update, retried=retried)
    return StepOutcome(tuple((x32 - u).to(x.dtype).detach() for u in updates), logged, finite=True, record=rec)


def _precise(t: Tensor) -> Tensor:
    """``t`` in float32 (float64 stays float64): losses, gradients and updates never run in half precision."""
    return t if t.dtype == torch.float64 else t.float()


def _rms(t: Tensor) -> float:
    return float(t.pow(2).mean().sqrt())


def _term_names(active) -> list[str]:
    """The terms' class names, a repeated class numbered " #2", " #3"... (keys of the losses and records)."""
    names: list[str] = []
    for term, _ in active:
        base = type(term).__name__
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base} #{k}"
        names.append(name)
    return names


def _gradient(loss: Tensor, leaves: tuple[Tensor, ...]) -> tuple[list[Tensor], bool, bool]:
    """``(grads, retried, finite)``: d ``loss`` / d each leaf, float32 (float64 leaves stay float64).

    When the first gradient is not finite (a half-precision backward overflowed) it is recomputed once from
    ``loss * RETRY_SCALE`` and divided by ``RETRY_SCALE`` in float32 (``retried``). A loss that is itself not
    finite is not retried (scaling cannot help). The graph is kept (``retain_graph``) for the retry and for the
    other terms' passes; it is freed with the step.
    """

    def grad(value: Tensor) -> list[Tensor]:
        raw = torch.autograd.grad(value, leaves, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(_precise(leaf)) if g is None else _precise(g) for g, leaf in zip(raw, leaves)]

    if not bool(torch.isfinite(loss.detach())):
        return [torch.zeros_like(_precise(leaf)) for leaf in leaves], False, False
    grads = grad(loss)
    if all(bool(torch.isfinite(g).all()) for g in grads):
        return grads, False, True
    grads = [g / RETRY_SCALE for g in grad(loss * RETRY_SCALE)]
    return grads, True, all(bool(torch.isfinite(g).all()) for g in grads)


def _auto_update(
    z: Tensor, grads_per_term: list[list[Tensor]], ratios: list[float], fraction: float, names: list[str]
) -> tuple[list[Tensor], dict[str, float], dict[str, float]]:
    """Step mode "auto" in the model-input latent ``z`` (B, ...): ``(updates per copy, grad_rms, pulls)``.

    Per image b (the copies of "pix2pix-zero" together): each term's gradient over its RMS (0 where it is
    exactly 0), mixed by ``ratios``: ``d = sum_k r_k g_k / rms(g_k)``, and scaled so that the update
    ``fraction * rms(z_b) * d / rms(d)`` has RMS ``fraction`` x RMS(``z_b``). The gradients may be w.r.t. the
    sigma-space latent: a constant factor on a gradient changes nothing. ``grad_rms`` (whole batch, the units of
    the given gradients) and ``pulls`` (RMS of each term's share of the update over RMS(``z``)) are diagnostics.
    """
    b = z.shape[0]
    shapes = [g.shape for g in grads_per_term[0]]
    flat = [torch.cat([g.reshape(b, -1) for g in grads], dim=1) for grads in grads_per_term]  # (B, copies * N)
    units, grad_rms = [], {}
    for name, g in zip(names, flat):
        rms = g.pow(2).mean(dim=1, keepdim=True).sqrt()
        units.append(torch.where(rms > 0, g / rms.clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(g)))
        grad_rms[name] = _rms(g)
    mix = sum(r * u for r, u in zip(ratios, units))
    mix_rms = mix.pow(2).mean(dim=1, keepdim=True).sqrt()
    z_rms = z.reshape(b, -1).pow(2).mean(dim=1, keepdim=True).sqrt()
    gain = torch.where(mix_rms > 0, fraction * z_rms / mix_rms.clamp_min(torch.finfo(z.dtype).tiny), 0.0)
    total_z = _rms(z)
    pulls = {n: (_rms(r * u * gain) / total_z if total_z > 0 else 0.0) for n, r, u in zip(names, ratios, units)}
    update = mix * gain
    out, at = [], 0
    for shape in shapes:
        size = int(torch.Size(shape[1:]).numel())
        out.append(update[:, at : at + size].reshape(shape))
        at += size
    return out, grad_rms, pulls
