"""The small pieces the guided sampler and the inversion loop over (docs/sampler.md), each on its own, on a fake
linear denoiser (``eps = x / 2 + c`` for the conditioning ``c``) whose calls are recorded; and the old keyword
calls against the new ones, bit for bit, on the tiny UNet."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch

from zerocon_core.common.legacy_args import from_old_keywords, reject_unknown
from zerocon_core.diffuseit.guidance import DiffuseITObjective, diffuseit_guidance, diffuseit_sample
from zerocon_core.method.calls import Hooks
from zerocon_core.method.denoiser import CaptureRequest, Prediction
from zerocon_core.method.guidance import CrossAttentionGuidance, GuidanceTerm
from zerocon_core.method.inversion import (
    InversionSettings,
    NoiseRegularization,
    _source_prediction,
    ddim_invert,
    eval_point,
)
from zerocon_core.method.parameterization import input_scale
from zerocon_core.method.replay import ReferenceRecord
from zerocon_core.method.sampler import (
    Conditionings,
    GuidedStep,
    SamplerSettings,
    _branch_forwards,
    _cfg_eps,
    _latent_updates,
    _Reference,
    _term_loss,
    _Terms,
    _Trace,
    guided_ddim_sample,
)
from zerocon_core.method.schedule import ddim_sigmas, inversion_sigmas, vp_scale
from zerocon_core.method.steps import cfg_combine, ddim_step, denoised

from .tiny import tiny_cond, tiny_latent
from .tiny_vision import tiny_dino

REQ = CaptureRequest(probs=frozenset({"L"}))


class Fake:
    """``eps = x / 2 + c`` for a float conditioning ``c``; a capture holds ``probs["L"] = x * c``. ``calls``:
    (latent, sigma, conds, capture) of each predict."""

    prediction_type = "eps"

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def layers(self):
        return []

    def autograd_session(self):
        return contextlib.nullcontext()

    def predict(self, x, sigma, conds, capture=None):
        self.calls.append((x, float(sigma), list(conds), capture))
        return [Prediction(x / 2 + c, {"L": x * c} if capture else {}, {}) for c in conds]


def _x(seed=0):
    return torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- steps.py: the pure step functions ----------------------------------------------------------------------


def test_cfg_combine_moves_from_the_negative_toward_the_positive():
    assert float(cfg_combine(torch.tensor(1.0), torch.tensor(3.0), 2.0)) == 5.0
    assert float(cfg_combine(torch.tensor(1.0), torch.tensor(3.0), 1.0)) == 3.0


def test_ddim_step_goes_from_sigma_to_sigma_next():
    x, eps = torch.tensor(10.0), torch.tensor(2.0)
    assert float(ddim_step(x, eps, torch.tensor(3.0), torch.tensor(1.0))) == 6.0  # 10 + (1 - 3) * 2
    assert float(ddim_step(x, eps, torch.tensor(1.0), torch.tensor(3.0))) == 14.0  # up the grid: the inversion


def test_denoised_is_the_step_to_zero():
    x, eps, s = _x(1), _x(2), torch.tensor(1.5, dtype=torch.float64)
    assert torch.equal(denoised(x, eps, s), x - s * eps)
    assert torch.allclose(denoised(x, eps, s), ddim_step(x, eps, s, torch.tensor(0.0, dtype=torch.float64)))


# -- calls.py: hooks and old keywords -----------------------------------------------------------------------


def test_hooks_call_what_was_given_and_nothing_else():
    seen = []
    hooks = Hooks(callback=lambda *a: seen.append(a), check_interrupt=lambda: seen.append("check"))
    hooks.interrupt()
    hooks.progress(1, 4, "x")
    assert seen == ["check", (1, 4, "x")]
    Hooks().interrupt(), Hooks().progress(1, 2)  # no hooks: nothing happens

    def stop():
        raise InterruptedError

    with pytest.raises(InterruptedError):
        Hooks(check_interrupt=stop).interrupt()


def test_old_keywords_build_the_group_and_are_consumed():
    old = {"source_cond": 1, "edit_cond": 2, "other": 3}
    names = {"source_cond": "source", "edit_cond": "edit", "negative_cond": "negative"}
    conds = from_old_keywords("f", "conds", None, Conditionings, old, names)
    assert conds == Conditionings(source=1, edit=2) and old == {"other": 3}
    assert from_old_keywords("f", "conds", "given", Conditionings, {}, names) == "given"
    assert from_old_keywords("f", "conds", None, Conditionings, {}, names) is None
    with pytest.raises(TypeError, match="conds= and the old keywords"):
        from_old_keywords("f", "conds", conds, Conditionings, {"edit_cond": 2}, names)
    with pytest.raises(TypeError, match="f\\(\\) got an unexpected keyword argument 'other'"):
        reject_unknown("f", {"edit_cond": 2, **old}, names)
    reject_unknown("f", {"edit_cond": 2}, {"x": "y"}, names)


def test_conditionings_cfg_negative_defaults_to_the_source():
    assert Conditionings(source=1, edit=2).cfg_negative == 1
    assert Conditionings(source=1, edit=2, negative=3).cfg_negative == 3


# -- the terms' windows and the reference ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Capturing(GuidanceTerm):
    """A capturing term: the mean squared difference of the edit's and the reference's probs."""

    def request(self, layers):
        return REQ

    def loss(self, ctx, request):
        ref = ctx.ref.probs["L"] if ctx.ref is not None else 0.0
        return (ctx.edit.probs["L"] - ref).pow(2).mean()


@dataclass(frozen=True)
class _Constant(GuidanceTerm):
    """A term whose loss is a fixed multiple of the step's latent sum (value set per pair by ``ctx.eps``)."""

    def loss(self, ctx, request):
        return ctx.eps.sum() * 0 + float(ctx.eps.flatten()[0])


def test_terms_reference_steps_end_after_the_last_capturing_step():
    plan = _Terms.of([_Capturing(weight=1.0, start=0.0, end=0.5), _Constant(weight=1.0)], Fake())
    assert [len(plan.active(i, 8)) for i in range(8)] == [2, 2, 2, 2, 1, 1, 1, 1]
    assert plan.reference_steps(8) == 4  # steps 0..3 need the reference; a non-capturing term needs none
    assert _Terms.of([_Constant(weight=1.0)], Fake()).reference_steps(8) == 0
    with pytest.raises(ValueError, match="unresolved auto weight"):
        _Terms.of([_Capturing(weight=-1.0)], Fake())


def _reference(mode, n=4, negative=None, record=None, until=None):
    den = Fake()
    traj = (
        [torch.full((1, 1, 2, 2), float(k), dtype=torch.float64) for k in range(n + 1)] if mode == "inverted" else None
    )
    conds = Conditionings(source=1.0, edit=2.0, negative=negative)
    x = torch.full((1, 1, 2, 2), 7.0, dtype=torch.float64) if mode == "resampled" else None
    ref = _Reference(den, conds, 3.0, REQ, mode, n, n if until is None else until, traj, record, x)
    return ref, den


def test_inverted_reference_reads_level_n_minus_i():
    ref, den = _reference("inverted")
    like = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    for i in range(4):
        (p_neg, p_src) = ref.predictions(i, like, torch.tensor(1.0), torch.tensor(0.5), active=[1])
        assert p_neg is p_src
        latent, _, conds, capture = den.calls[-1]
        assert float(latent.flatten()[0]) == 4 - i and conds == [1.0] and capture == REQ
    assert ref.live == [1, 2, 3] and ref.replayed == []  # no record: live after step 0 (step 0 is always live)
    assert torch.equal(ref.finish(), ref.traj[0])
    assert "not in the record" in ref.notes[-1]


def test_inverted_reference_replays_the_record_after_step_0():
    record = ReferenceRecord(REQ, 4, "current", 1.0)
    record.captures = {k: Prediction(None, {"L": torch.full((1, 1, 2, 2), 10.0 + k)}, {}) for k in range(5)}
    ref, den = _reference("inverted", record=record)
    like = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    preds = [ref.predictions(i, like, torch.tensor(1.0), None, active=[1]) for i in range(4)]
    assert len(den.calls) == 1 and float(den.calls[0][0].flatten()[0]) == 4  # step 0 live, on traj[n]
    assert [float(p[1].probs["L"].flatten()[0]) for p in preds[1:]] == [13.0, 12.0, 11.0]  # level n - i
    assert preds[1][1].probs["L"].dtype == torch.float64  # cast like the latent
    assert ref.replayed == [1, 2, 3] and ref.live == []


def test_inverted_reference_runs_only_while_a_term_is_active_and_before_until():
    ref, den = _reference("inverted", until=2)
    like = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    assert ref.predictions(0, like, torch.tensor(1.0), None, active=[]) is None
    assert ref.predictions(2, like, torch.tensor(1.0), None, active=[1]) is None
    assert den.calls == [] and ref.finish() is None  # did not run to the end: no reconstruction


@pytest.mark.parametrize("negative", [None, 5.0])
def test_resampled_reference_denoises_in_lockstep(negative):
    ref, den = _reference("resampled", negative=negative)
    x = ref.x.clone()
    s, s_next = torch.tensor(2.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    preds = ref.predictions(0, x, s, s_next, active=[])
    eps_src = x / 2 + 1.0
    if negative is None:
        assert den.calls[-1][2] == [1.0] and preds[0] is preds[1]
        eps = eps_src
    else:
        assert den.calls[-1][2] == [5.0, 1.0]
        eps = cfg_combine(x / 2 + 5.0, eps_src, 3.0)
    assert den.calls[-1][3] is None  # no active term: nothing captured
    assert torch.equal(ref.x, ddim_step(x, eps, s, s_next))
    ref.predictions(1, x, s_next, torch.tensor(0.0, dtype=torch.float64), active=[1])
    assert den.calls[-1][3] == REQ


# -- the CFG step and the branches -------------------------------------------------------------------------


def _step(den, active=(), ref_preds=None):
    s = torch.tensor(1.0, dtype=torch.float64)
    return GuidedStep(den, 0, 4, s, None, list(active), ref_preds, 5.0, 2.0, torch.Generator())


def test_cfg_eps_one_copy_is_cfg_between_negative_and_edit():
    den, x = Fake(), _x()
    eps = _cfg_eps(den, (x,), _step(den), 3.0, None)
    assert torch.equal(eps, cfg_combine(x / 2 + 5.0, x / 2 + 2.0, 3.0))
    assert [c[2] for c in den.calls] == [[5.0, 2.0]]


def test_cfg_eps_at_cfg_1_runs_the_edit_alone():
    den, x = Fake(), _x()
    assert torch.equal(_cfg_eps(den, (x,), _step(den), 1.0, None), x / 2 + 2.0)
    assert [c[2] for c in den.calls] == [[2.0]]
    kept = _x(5)
    assert _cfg_eps(den, (x,), _step(den), 1.0, kept) is kept and len(den.calls) == 1


def test_cfg_eps_pix2pix_zero_takes_the_negative_from_copy_0_and_the_edit_from_copy_1():
    den, x0, x1 = Fake(), _x(0), _x(1)
    eps = _cfg_eps(den, (x0, x1), _step(den), 3.0, None)
    assert torch.equal(eps, cfg_combine(x0 / 2 + 5.0, x1 / 2 + 2.0, 3.0))
    assert [(c[0] is x, c[2]) for c, x in zip(den.calls, (x0, x1))] == [(True, [5.0]), (True, [2.0])]
    den.calls.clear()  # at cfg 1 too: the edit's noise is copy 1's, the negative still runs on copy 0
    assert torch.allclose(_cfg_eps(den, (x0, x1), _step(den), 1.0, None), x1 / 2 + 2.0)
    assert [c[2] for c in den.calls] == [[5.0], [2.0]]


def test_cfg_eps_reusing_the_guidance_eps_runs_the_negative_alone():
    den, x, kept = Fake(), _x(), _x(7)
    assert torch.equal(_cfg_eps(den, (x,), _step(den), 3.0, kept), cfg_combine(x / 2 + 5.0, kept, 3.0))
    assert [c[2] for c in den.calls] == [[5.0]]


def _refs():
    return [Prediction(None, {"L": torch.zeros(1)}, {}), Prediction(None, {"L": torch.ones(1)}, {})]


def test_branch_edit_is_one_forward_against_the_source_reference():
    den, refs = Fake(), _refs()
    with torch.enable_grad():
        leaves, pairs = _branch_forwards(_x(), _step(den, [(_Capturing(weight=1.0), REQ)], refs), "edit")
    assert len(leaves) == 1 and leaves[0].requires_grad and len(pairs) == 1
    assert pairs[0][0] is leaves[0] and pairs[0][2] is refs[1]
    assert [c[2] for c in den.calls] == [[2.0]] and den.calls[0][3] == REQ


def test_branch_both_shares_one_latent_between_negative_and_edit():
    den, refs = Fake(), _refs()
    with torch.enable_grad():
        leaves, pairs = _branch_forwards(_x(), _step(den, [(_Capturing(weight=1.0), REQ)], refs), "both")
    assert len(leaves) == 1 and [p[0] is leaves[0] for p in pairs] == [True, True]
    assert [p[2] for p in pairs] == refs and [c[2] for c in den.calls] == [[5.0, 2.0]]


def test_branch_pix2pix_zero_gives_each_half_its_own_copy():
    den, refs, x = Fake(), _refs(), _x()
    with torch.enable_grad():
        leaves, pairs = _branch_forwards(x, _step(den, [(_Capturing(weight=1.0), REQ)], refs), "pix2pix-zero")
    assert len(leaves) == 2 and leaves[0] is not leaves[1] and torch.equal(leaves[0], leaves[1])
    assert [p[0] for p in pairs] == list(leaves) and [p[2] for p in pairs] == refs
    assert [c[2] for c in den.calls] == [[5.0], [2.0]]


def test_branch_without_reference_predictions_compares_with_none():
    with torch.enable_grad():
        _, pairs = _branch_forwards(_x(), _step(Fake()), "both")
    assert [p[2] for p in pairs] == [None, None]


def test_term_loss_averages_over_the_pairs():
    x = _x().requires_grad_(True)
    pairs = [(x, Prediction(torch.full_like(x, v), {}, {}), None) for v in (1.0, 4.0)]
    loss = _term_loss(_Constant(weight=1.0), CaptureRequest(), pairs, _step(Fake()))
    assert float(loss) == 2.5 and loss.dtype == torch.float64


@dataclass(frozen=True)
class _NaN(GuidanceTerm):
    def loss(self, ctx, request):
        return ctx.eps.sum() * float("nan")


def test_trace_keeps_a_finite_guided_latent_and_skips_a_non_finite_one():
    den, x = Fake(), _x()
    trace = _Trace()
    (moved,) = trace.guided(x, _step(den, [(_Capturing(weight=1.0), REQ)], _refs()), SamplerSettings())
    assert not torch.equal(moved, x) and trace.skipped == [] and len(trace.losses) == len(trace.records) == 1
    (kept,) = trace.guided(x, _step(den, [(_NaN(weight=1.0), CaptureRequest())]), SamplerSettings())
    assert kept is x and trace.skipped == [0] and trace.records[-1].skipped and len(trace.losses) == 2


# -- the step modes ---------------------------------------------------------------------------------------------


def test_raw_update_is_the_gradient_scaled_into_sigma_space():
    x, g, k = _x(0), _x(1), torch.tensor(0.5, dtype=torch.float64)
    updates, grad_rms, pulls = _latent_updates(x, k, [g], [2.0], ["T"], SamplerSettings(step_mode="raw"))
    assert torch.allclose(updates[0], g * k * k, rtol=0, atol=0)
    assert grad_rms["T"] == pytest.approx(float(g.pow(2).mean().sqrt()) * 0.5 / 2.0) and pulls == {}


def test_normalized_update_has_the_step_size_over_all_copies():
    x, g0, g1, k = _x(0), _x(1), 3 * _x(2), torch.tensor(0.5, dtype=torch.float64)
    settings = SamplerSettings(step_mode="normalized", step_size=0.1)
    updates, _, _ = _latent_updates(x, k, [g0, g1], [1.0], ["T"], settings)
    rms = float(torch.cat([u.flatten() for u in updates]).pow(2).mean().sqrt())
    assert rms / 0.5 == pytest.approx(0.1)
    assert torch.allclose(updates[1] / updates[0], g1 / g0)  # one scale for both copies


def test_auto_update_has_the_step_size_as_a_fraction_of_the_latent():
    x, g, k = _x(0), _x(1), torch.tensor(0.5, dtype=torch.float64)
    updates, grad_rms, pulls = _latent_updates(x, k, [[g]], [1.0], ["T"], SamplerSettings(step_size=0.02))
    z = x / k
    assert float((updates[0] / k).pow(2).mean().sqrt()) == pytest.approx(0.02 * float(z.pow(2).mean().sqrt()))
    assert float((updates[0] * g).sum()) > 0  # along the gradient (the step subtracts it)
    assert pulls["T"] == pytest.approx(0.02)


# -- the inversion's pieces ---------------------------------------------------------------------------------------


def test_eval_point_current_and_next():
    x, a, b = _x(), torch.tensor(1.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    s, x_in = eval_point(x, a, b, "current", "eps")
    assert s is a and x_in is x
    s, x_in = eval_point(x, a, b, "next", "eps")
    assert s is b and torch.allclose(x_in, x * input_scale(a, "eps") / input_scale(b, "eps"))
    assert float(x_in.abs().sum()) > float(x.abs().sum())  # the same VP latent at a higher level: a larger x


def test_source_prediction_is_the_source_or_the_cfg_mix():
    den, x = Fake(), _x()
    s = torch.tensor(1.0)
    p = _source_prediction(den, x, s, (2.0, 5.0), 1.0, REQ)
    assert torch.equal(p.eps, x / 2 + 2.0) and "L" in p.probs and den.calls[-1][2] == [2.0]
    p = _source_prediction(den, x, s, (2.0, 5.0), 3.0, None)
    assert torch.equal(p.eps, cfg_combine(x / 2 + 5.0, x / 2 + 2.0, 3.0)) and den.calls[-1][2] == [5.0, 2.0]


def test_inversion_loop_takes_one_step_per_level():
    den, x = Fake(), _x()
    sig = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    seen = []
    inv = ddim_invert(den, x, sig, 2.0, hooks=Hooks(callback=lambda i, n, z: seen.append((i, n))))
    expect = [x]
    for a, b in zip(sig[:-1], sig[1:]):
        expect.append(ddim_step(expect[-1], expect[-1] / 2 + 2.0, a, b))
    assert all(torch.equal(t, e) for t, e in zip(inv.trajectory, expect)) and torch.equal(inv.latent, expect[-1])
    assert seen == [(0, 2), (1, 2)] and [c[1] for c in den.calls] == pytest.approx([0.1, 0.5])


# -- the old keywords give the same results ----------------------------------------------------------------------


def test_old_and_new_sampler_calls_are_bit_identical(den):
    sig = ddim_sigmas(den.sigma_table, 4)
    x = tiny_latent(3) / vp_scale(sig[0])
    src, edit, neg = tiny_cond(1), tiny_cond(2), tiny_cond(3)
    terms = (CrossAttentionGuidance(weight=0.05),)
    settings = SamplerSettings(cfg=3.0, keep_reference=True, branches="both")
    old_seen, new_seen = [], []
    old = guided_ddim_sample(
        den,
        x,
        sig,
        source_cond=src,
        edit_cond=edit,
        negative_cond=neg,
        guidance=terms,
        settings=settings,
        callback=lambda i, n, z, z0: old_seen.append((i, z0)),
        check_interrupt=lambda: old_seen.append("check"),
    )
    hooks = Hooks(
        callback=lambda i, n, z, z0: new_seen.append((i, z0)), check_interrupt=lambda: new_seen.append("check")
    )
    new = guided_ddim_sample(den, x, sig, Conditionings(src, edit, neg), guidance=terms, settings=settings, hooks=hooks)
    assert torch.equal(old.latent, new.latent) and torch.equal(old.reference, new.reference)
    assert old.losses == new.losses and old.records == new.records
    assert len(old_seen) == len(new_seen) == 8
    assert all(a == b if isinstance(a, str) else torch.equal(a[1], b[1]) for a, b in zip(old_seen, new_seen))
    with pytest.raises(TypeError, match="unexpected keyword argument 'source'"):
        guided_ddim_sample(den, x, sig, source=src, edit_cond=edit)
    with pytest.raises(TypeError, match="conds= and the old keywords"):
        guided_ddim_sample(den, x, sig, Conditionings(src, edit), edit_cond=edit)


def test_old_and_new_inversion_calls_are_bit_identical(den):
    sig = inversion_sigmas(ddim_sigmas(den.sigma_table, 2))
    x = tiny_latent(4)
    reg = NoiseRegularization(outer=1, rolls=2)
    old_seen, new_seen = [], []
    kw = dict(cfg=2.0, eval_at="next", regularization=reg, seed=3, keep_trajectory=True)
    old = ddim_invert(
        den, x, sig, tiny_cond(1), negative_cond=tiny_cond(2), callback=lambda *a: old_seen.append(a[2]), **kw
    )
    new = ddim_invert(
        den,
        x,
        sig,
        tiny_cond(1),
        negative_cond=tiny_cond(2),
        settings=InversionSettings(**kw),
        hooks=Hooks(callback=lambda *a: new_seen.append(a[2])),
    )
    assert torch.equal(old.latent, new.latent) and torch.equal(old.sigmas, new.sigmas)
    assert all(torch.equal(a, b) for a, b in zip(old.trajectory, new.trajectory)) and len(new.trajectory) == 3
    assert all(torch.equal(a, b) for a, b in zip(old_seen, new_seen)) and len(new_seen) == 2
    with pytest.raises(TypeError, match="unexpected keyword argument 'cgf'"):
        ddim_invert(den, x, sig, tiny_cond(1), cgf=2.0)
    with pytest.raises(TypeError, match="settings= and the old keywords"):
        ddim_invert(den, x, sig, tiny_cond(1), settings=InversionSettings(), seed=1)


def test_diffuseit_guidance_old_keywords_build_the_same_terms():
    decode, dino = (lambda z: z), tiny_dino(seed=0)  # never called: the terms are only built
    src = torch.zeros(1, 3, 8, 8)
    old = diffuseit_guidance(dino, decode, src, src, weight=2.0, semantic=False, lambda_pixel=3.0, dino_size=16)
    new = diffuseit_guidance(
        dino, decode, src, src, objective=DiffuseITObjective(weight=2.0, semantic=False, lambda_pixel=3.0), dino_size=16
    )
    assert [type(t) for t in old] == [type(t) for t in new] and len(new) == 3
    assert [t.weight for t in new] == [2.0, 2.0, 2.0] and new[1].lambda_pixel == 3.0
    with pytest.raises(TypeError, match="objective= and the old keywords"):
        diffuseit_guidance(dino, decode, src, objective=DiffuseITObjective(), weight=2.0)


def test_old_and_new_diffuseit_sample_calls_are_bit_identical(den):
    sig = ddim_sigmas(den.sigma_table, 6)
    latent = tiny_latent(5)
    settings = SamplerSettings(cfg=3.0, resample=2, seed=1)
    kw = dict(guidance=(CrossAttentionGuidance(weight=0.05),), strength=0.5, settings=settings)
    old_seen, new_seen = [], []
    old = diffuseit_sample(
        den, latent, sig, cond=tiny_cond(7), negative_cond=tiny_cond(8), callback=lambda *a: old_seen.append(a[2]), **kw
    )
    conds = Conditionings(source=tiny_cond(8), edit=tiny_cond(7))
    new = diffuseit_sample(den, latent, sig, conds, hooks=Hooks(callback=lambda *a: new_seen.append(a[2])), **kw)
    assert torch.equal(old.latent, new.latent) and old.losses == new.losses and len(new.losses) >= 2
    assert len(old_seen) == len(new_seen) > 0 and all(torch.equal(a, b) for a, b in zip(old_seen, new_seen))
    with pytest.raises(TypeError, match="unexpected keyword argument 'source_cond'"):
        diffuseit_sample(den, latent, sig, source_cond=tiny_cond(8), cond=tiny_cond(7), **kw)
