"""The guided DDIM loop of pix2pix-zero(Con), over any ``Denoiser`` (docs/sampler.md, step by step).

Each step: the reference's captures (``_Reference``), one gradient step on the edit latent (``_guidance_step``:
the branches' forwards, the terms' losses, the step mode's update), then a CFG step with the edited conditioning
(``_cfg_eps``, ``steps.ddim_step``). Sigma space throughout: ``x + (sigma_next - sigma) * eps`` is DDIM for VP
models and Euler on the velocity for flow-matching models (``parameterization``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from ..common.legacy_args import from_old_keywords, reject_unknown
from ..common.log import logger
from .calls import HOOK_KEYWORDS, Hooks
from .denoiser import CaptureRequest, Denoiser, Prediction
from .guidance import GuidanceTerm, StepContext
from .parameterization import input_scale, renoise
from .replay import REFERENCES, Inversion, ReferenceRecord, merged_request, record_gap, replayed, resolve_reference
from .steps import cfg_combine, ddim_step, denoised

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
    Field by field in docs/sampler.md ("The settings"): ``cfg`` scale; ``step_mode`` "auto" / "raw" /
    "normalized" (None: ``default_step_mode(branches)``); ``step_size`` (a fraction of the latent's RMS in
    "auto"); ``branches`` "edit" / "both" / "pix2pix-zero"; ``seed``; ``resample`` (first-step repeats);
    ``keep_reference``; ``reference`` "inverted" / "resampled"; ``reuse_guidance_eps`` (opt-in, inexact).

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


def _check_sigmas(x: Tensor, sigmas: Tensor) -> None:
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D grid of at least 2 levels, got shape {tuple(sigmas.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("the starting latent contains NaN or Inf")


@dataclass(frozen=True)
class Conditionings:
    """The conditionings of a guided run (opaque here; the ``Denoiser`` reads them). ``source``: the caption,
    the reference branch's; ``edit``: the edited caption; ``negative``: CFG's negative, None for the source
    (pix2pix-zero's choice for real images; the reference is then a plain DDIM reconstruction at batch 1)."""

    source: Any
    edit: Any
    negative: Any = None

    @property
    def cfg_negative(self) -> Any:
        """The negative of the CFG step: ``negative``, or the source when it is None."""
        return self.source if self.negative is None else self.negative


#: ``guided_ddim_sample``'s old keywords of ``Conditionings``' fields.
COND_KEYWORDS = {"source_cond": "source", "edit_cond": "edit", "negative_cond": "negative"}


def guided_ddim_sample(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    conds: Conditionings | None = None,
    *,
    guidance: Sequence[GuidanceTerm] = (),
    settings: SamplerSettings = SamplerSettings(),
    hooks: Hooks | None = None,
    inversion: Inversion | None = None,
    **old: Any,
) -> SampleResult:
    """Run the guided DDIM loop from ``x`` (sigma space, at ``sigmas[0]``) down the descending ``sigmas``
    (sigma space, not timesteps); returns the edit at ``sigmas[-1]`` and what each step did (``SampleResult``).

    Every term's weight must be resolved (>= 0: ``auto_weights.resolve_weights``), else ``ValueError``. A step
    whose guidance gradient is not finite (after one scaled-down retry) is skipped and listed. ``hooks``:
    ``callback(i, n, x, x0)`` after each step, ``check_interrupt()`` before each. ``inversion``: the
    ``ddim_invert`` result ``x`` came from, for the "inverted" reference. The old keywords (``source_cond=``,
    ``edit_cond=``, ``negative_cond=``, ``callback=``, ``check_interrupt=``) are still accepted.
    """
    conds, hooks = _call_arguments(conds, hooks, old)
    _check_sigmas(x, sigmas)
    plan = _Terms.of(guidance, denoiser)
    n = len(sigmas) - 1
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)
    x = x.detach().clone()
    ref = _start_reference(denoiser, x, sigmas, conds, settings, inversion, plan)
    trace, state = _Trace(), {}  # state: the terms' scratch space for the run (StepContext.state)
    gen = torch.Generator().manual_seed(int(settings.seed))
    noise_gen = torch.Generator().manual_seed(int(settings.seed) + 1) if settings.resample > 1 else None
    memo = _GuidanceEps(denoiser, conds.edit) if settings.reuse_guidance_eps else None
    with denoiser.autograd_session():
        for i in range(n):
            hooks.interrupt()
            s, s_next = sigmas[i], sigmas[i + 1]
            active = plan.active(i, n)
            ref_preds = ref.predictions(i, x, s, s_next, active)
            den = memo if memo is not None else denoiser
            step = GuidedStep(den, i, n, s, s_next, active, ref_preds, conds.cfg_negative, conds.edit, gen, state)
            for r in range(settings.resample if i == 0 else 1):
                if r > 0:
                    hooks.interrupt()
                    x = renoise(x, s_next, s, noise_gen, denoiser.prediction_type)
                copies = trace.guided(x, step, settings) if active else (x,)
                with torch.no_grad():
                    eps = _cfg_eps(denoiser, copies, step, settings.cfg, memo.take() if memo is not None else None)
                    x0, x = denoised(copies[0], eps, s), ddim_step(copies[0], eps, s, s_next)
            hooks.progress(i, n, x, x0)
    return trace.result(x, ref, settings)


def _call_arguments(
    conds: Conditionings | None, hooks: Hooks | None, old: dict[str, Any]
) -> tuple[Conditionings, Hooks]:
    """The run's conditionings and hooks, from the new arguments or the old keywords (``TypeError`` for
    both, for unknown keywords, or for no conditionings)."""
    reject_unknown("guided_ddim_sample", old, COND_KEYWORDS, HOOK_KEYWORDS)
    conds = from_old_keywords("guided_ddim_sample", "conds", conds, Conditionings, old, COND_KEYWORDS)
    hooks = from_old_keywords("guided_ddim_sample", "hooks", hooks, Hooks, old, HOOK_KEYWORDS)
    if conds is None:
        raise TypeError("guided_ddim_sample() missing the conditionings: conds=Conditionings(source, edit)")
    return conds, hooks if hooks is not None else Hooks()


@dataclass(frozen=True)
class _Terms:
    """The run's guidance ``terms``, each one's capture request ``reqs`` over the denoiser's ``layers`` and
    their union ``merged``."""

    terms: tuple[GuidanceTerm, ...]
    reqs: list[CaptureRequest]
    merged: CaptureRequest
    layers: list

    @classmethod
    def of(cls, guidance: Sequence[GuidanceTerm], denoiser: Denoiser) -> _Terms:
        """``ValueError`` for a term whose weight is not resolved (< 0)."""
        terms = tuple(guidance)
        for t in terms:
            if t.weight < 0:
                raise ValueError(
                    f"{type(t).__name__} has an unresolved auto weight ({t.weight:g}): resolve it with "
                    "zerocon_core.method.auto_weights.resolve_weights for the model's prediction type and the "
                    "step mode"
                )
        layers = denoiser.layers() if terms else []
        reqs, merged = merged_request(terms, layers)
        return cls(terms, reqs, merged, layers)

    def active(self, i: int, n: int) -> list[tuple[GuidanceTerm, CaptureRequest]]:
        """The (term, request) pairs active at step ``i`` of ``n``."""
        return [(t, r) for t, r in zip(self.terms, self.reqs) if t.active(i, n)]

    def reference_steps(self, n: int) -> int:
        """How many steps the reference must run: up to the last one where a capturing term is active."""
        return 1 + max((i for i in range(n) for t, r in zip(self.terms, self.reqs) if r and t.active(i, n)), default=-1)


@dataclass
class _Reference:
    """Where each step's reference captures come from, for steps ``i < until``: ``mode`` "inverted" (the
    inversion's trajectory ``traj``, its captures replayed from ``record`` or run live on it) or "resampled"
    (the latent ``x`` denoised in lockstep under the source, or CFG(negative, source))."""

    denoiser: Denoiser
    conds: Conditionings
    cfg: float
    merged: CaptureRequest
    mode: str
    n: int
    until: int
    traj: list[Tensor] | None = None
    record: ReferenceRecord | None = None
    x: Tensor | None = None
    gap: bool = False
    replayed: list[int] = field(default_factory=list)
    live: list[int] = field(default_factory=list)  # "inverted" steps after the first, not in the record
    notes: list[str] = field(default_factory=list)

    def predictions(self, i: int, x: Tensor, s: Tensor, s_next: Tensor, active) -> list[Prediction] | None:
        """The (negative, source) reference predictions at step ``i`` (sigma ``s``), detached; None where no
        reference runs. "resampled" advances its latent to ``s_next``; ``x`` (the edit latent) sets the
        replayed captures' dtype and device."""
        if i >= self.until:
            return None
        if self.mode == "inverted":
            return self._inverted(i, x, s) if active and self.merged else None
        return self._lockstep(s, s_next, active) if self.x is not None else None

    def _inverted(self, i: int, x: Tensor, s: Tensor) -> list[Prediction]:
        k = self.n - i  # sampling step i is the inversion's level n - i
        p_src = replayed(self.record, k, self.merged, x) if self.record is not None and i > 0 else None
        if p_src is None:
            if i > 0:
                self.live.append(i)
            with torch.no_grad():
                (p_src,) = self.denoiser.predict(self.traj[k], s, [self.conds.source], self.merged)
        else:
            self.replayed.append(i)
        return [p_src, p_src]

    def _lockstep(self, s: Tensor, s_next: Tensor, active) -> list[Prediction]:
        capture = self.merged if active else None
        with torch.no_grad():
            if self.conds.negative is None:
                (p_src,) = self.denoiser.predict(self.x, s, [self.conds.source], capture)
                preds, eps = [p_src, p_src], p_src.eps
            else:
                p_neg, p_src = self.denoiser.predict(self.x, s, [self.conds.negative, self.conds.source], capture)
                preds, eps = [p_neg, p_src], cfg_combine(p_neg.eps, p_src.eps, self.cfg)
            self.x = ddim_step(self.x, eps, s, s_next)
        return preds

    def finish(self) -> Tensor | None:
        """The reconstruction (None unless the reference ran at every step); notes the live steps."""
        if self.live and not self.gap:  # with a gap every step runs it, as its note already says
            self.notes.append(f"steps {self.live} ran the reference forward on the inverted latent (not in the record)")
            logger.info("reference: %s", self.notes[-1])
        if self.until != self.n:
            return None
        return self.traj[0] if self.mode == "inverted" else self.x


def _start_reference(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    conds: Conditionings,
    settings: SamplerSettings,
    inversion: Inversion | None,
    plan: _Terms,
) -> _Reference:
    """The run's reference: its mode after fallbacks (``_reference_source``), how many steps it runs (every
    step with ``keep_reference``), and the record unless it lacks what the terms read (noted, logged)."""
    notes: list[str] = []
    mode, traj, record = _reference_source(settings, inversion, sigmas, x, conds.negative is None, notes)
    n = len(sigmas) - 1
    until = n if settings.keep_reference else plan.reference_steps(n)
    x_ref = x.clone() if until > 0 and mode == "resampled" else None
    gap = record_gap(record, plan.terms, plan.layers) if record is not None and plan.merged else ""
    if gap:
        notes.append(f"{gap}: the reference forward runs at every step")
        logger.warning("reference record: %s", notes[-1])
        record = None
    return _Reference(
        denoiser, conds, settings.cfg, plan.merged, mode, n, until, traj, record, x_ref, bool(gap), notes=notes
    )


@dataclass
class _Trace:
    """What the guidance steps did, for the ``SampleResult``: ``skipped`` steps, per-evaluation ``losses`` and
    ``records``."""

    skipped: list[int] = field(default_factory=list)
    losses: list[dict[str, float]] = field(default_factory=list)
    records: list[StepRecord] = field(default_factory=list)

    def guided(self, x: Tensor, step: GuidedStep, settings: SamplerSettings) -> tuple[Tensor, ...]:
        """The guided latent(s) of ``_guidance_step`` (logged and recorded); ``(x,)`` when it was not finite."""
        outcome = _guidance_step(x, step, settings)
        self.losses.append(outcome.losses)
        self.records.append(outcome.record)
        if outcome.record.retried:
            logger.info("step %d: the guidance gradient overflowed; recomputed from a scaled-down loss", step.step)
        if outcome.finite:
            return outcome.latents
        logger.warning("step %d: guidance gradient is not finite; step skipped", step.step)
        self.skipped.append(step.step)
        return (x,)

    def result(self, x: Tensor, ref: _Reference, settings: SamplerSettings) -> SampleResult:
        """The run's ``SampleResult`` with the final latent ``x`` (logs the skipped steps)."""
        if self.skipped:
            logger.warning(
                "guidance skipped at %d of %d steps (non-finite gradient): %s", len(self.skipped), ref.n, self.skipped
            )
        reconstruction = ref.finish()
        return SampleResult(
            latent=x,
            reference=reconstruction,
            skipped=self.skipped,
            losses=self.losses,
            reference_mode=ref.mode,
            replayed=ref.replayed,
            notes=ref.notes,
            records=self.records,
            num_steps=ref.n,
            step_mode=settings.step_mode,
        )


def _cfg_eps(denoiser: Denoiser, copies: tuple[Tensor, ...], step: GuidedStep, cfg: float, eps_edit) -> Tensor:
    """The CFG noise at the guided latent ``copies[0]`` (sigma ``step.sigma``): ``cfg_combine(negative, edit)``, or
    the edit's alone at ``cfg`` 1 (Flux-dev's distilled guidance; one copy). Branches "pix2pix-zero" (two
    copies): the negative's noise from copy 0, the edit's from copy 1. ``eps_edit`` (``reuse_guidance_eps``):
    the edit's noise from the guidance forward, so only the negative is run."""
    x, s = copies[0], step.sigma
    if cfg == 1.0 and len(copies) == 1:
        return eps_edit if eps_edit is not None else denoiser.predict(x, s, [step.edit_cond])[0].eps
    if eps_edit is not None:
        (p_neg,) = denoiser.predict(x, s, [step.negative_cond])
    elif len(copies) == 1:
        p_neg, p_edit = denoiser.predict(x, s, [step.negative_cond, step.edit_cond])
        eps_edit = p_edit.eps
    else:
        (p_neg,) = denoiser.predict(x, s, [step.negative_cond])
        (p_edit,) = denoiser.predict(copies[1], s, [step.edit_cond])
        eps_edit = p_edit.eps
    return cfg_combine(p_neg.eps, eps_edit, cfg)


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
    """One gradient step on the edit latent ``x`` (sigma space) for ``settings.branches`` and ``step_mode``:
    the guided latent (two copies for "pix2pix-zero"), cast to ``x``'s dtype, its losses and record.

    Losses, gradients and the update are float32 (float64 when ``x`` is), whatever the model's dtype. A
    gradient that is not finite is recomputed once (``_gradient``); still not finite: ``finite`` False and
    ``x`` unchanged.
    """
    names = _term_names(step.active)
    weights = [float(t.weight) for t, _ in step.active]
    with torch.enable_grad():
        leaves, pairs = _branch_forwards(x, step, settings.branches)
        term_losses = [_term_loss(term, req, pairs, step) for term, req in step.active]
        logged = {n: w * float(v.detach()) for n, w, v in zip(names, weights, term_losses)}
        unweighted = {n: float(v.detach()) for n, v in zip(names, term_losses)}
        if settings.step_mode == "auto":
            results = [_gradient(v, leaves) for v in term_losses]
            grads = [g for g, _, _ in results]  # per term, per copy
            retried, finite = any(r for _, r, _ in results), all(ok for _, _, ok in results)
        else:
            grads, retried, finite = _gradient(sum(w * v for w, v in zip(weights, term_losses)), leaves)
    record = dict(step=step.step, sigma=float(step.sigma), losses=unweighted, weights=dict(zip(names, weights)))
    if not finite:
        rec = StepRecord(**record, grad_rms={}, pulls={}, update=0.0, retried=retried, skipped=True)
        return StepOutcome((x,), logged, finite=False, record=rec)
    k = latent_scale(_precise(step.sigma.detach()), step.denoiser.prediction_type)
    x32 = _precise(x.detach())
    updates, grad_rms, pulls = _latent_updates(x32, k, grads, weights, names, settings)
    z_rms = _rms(x32 / k)
    update = _rms(torch.cat([u.flatten() for u in updates])) / float(k) / z_rms if z_rms > 0 else 0.0
    if len(names) == 1 and settings.step_mode != "auto":  # one term: its share is the whole update
        pulls = {names[0]: update}
    rec = StepRecord(**record, grad_rms=grad_rms, pulls=pulls, update=update, retried=retried)
    return StepOutcome(tuple((x32 - u).to(x.dtype).detach() for u in updates), logged, finite=True, record=rec)


def _branch_forwards(x: Tensor, step: GuidedStep, branches: str) -> tuple[tuple[Tensor, ...], list[tuple]]:
    """``(leaves, pairs)`` for ``branches`` (call with grad enabled): the latent leaves the gradient is taken
    for, and the (leaf, prediction, reference) pairs each term's loss averages over. "edit": one leaf, the edit
    forward with the source's reference; "both": one leaf, the negative and the edit forwards with their own
    reference halves; "pix2pix-zero": one leaf per CFG half (negative's, edit's), each with its own forward."""
    den, s = step.denoiser, step.sigma
    merged = CaptureRequest()
    for _, r in step.active:
        merged = merged | r
    refs = step.ref_preds if step.ref_preds is not None else [None, None]
    leaf = x.detach().requires_grad_(True)
    if branches == "edit":
        (p_edit,) = den.predict(leaf, s, [step.edit_cond], merged)
        return (leaf,), [(leaf, p_edit, refs[1])]
    if branches == "both":
        p_neg, p_edit = den.predict(leaf, s, [step.negative_cond, step.edit_cond], merged)
        return (leaf,), [(leaf, p_neg, refs[0]), (leaf, p_edit, refs[1])]
    twin = x.detach().clone().requires_grad_(True)
    (p_neg,) = den.predict(leaf, s, [step.negative_cond], merged)
    (p_edit,) = den.predict(twin, s, [step.edit_cond], merged)
    return (leaf, twin), [(leaf, p_neg, refs[0]), (twin, p_edit, refs[1])]


def _term_loss(term: GuidanceTerm, request: CaptureRequest, pairs: list[tuple], step: GuidedStep) -> Tensor:
    """``term``'s loss (float32 or float64) averaged over the branches' (leaf, prediction, reference) ``pairs``."""
    total = None
    for xg, pred, ref in pairs:
        ctx = StepContext(
            step.step, step.num_steps, step.sigma, xg, pred.eps, pred, ref, step.generator, step.sigma_next, step.state
        )
        value = _precise(term.loss(ctx, request))
        total = value if total is None else total + value
    return total / len(pairs)


def _latent_updates(
    x32: Tensor, k: Tensor, grads: list, weights: list[float], names: list[str], settings: SamplerSettings
) -> tuple[list[Tensor], dict[str, float], dict[str, float]]:
    """``(updates, grad_rms, pulls)``: each copy's update in sigma space (the step is ``x - update``) for
    ``settings.step_mode``, from the gradients w.r.t. the sigma-space latent ``x32`` (``k``: ``latent_scale``).
    "auto": ``grads`` per term (``_auto_update``); "raw": ``z <- z - grad_z``; "normalized": the raw direction
    at RMS ``step_size`` over all copies together."""
    if settings.step_mode == "auto":
        updates, grad_rms, pulls = _auto_update(x32 / k, grads, weights, settings.step_size, names)
        return [u * k for u in updates], {n: v * float(k) for n, v in grad_rms.items()}, pulls
    if settings.step_mode == "raw":
        updates = [g * (k * k) for g in grads]  # dz = -w k dL/dx, dx = k dz
    else:
        rms = torch.cat([g.flatten() for g in grads]).pow(2).mean().sqrt().clamp_min(1e-12)
        updates = [g / rms * settings.step_size * k for g in grads]
    grad_rms = {}
    if len(names) == 1 and weights[0] > 0:  # one term: its share is the whole update
        grad_rms = {names[0]: _rms(torch.cat([g.flatten() for g in grads])) * float(k) / weights[0]}
    return updates, grad_rms, {}


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
