"""zerocon_core.method.diagnostics: the summary's numbers and the chart's points are the sampler's own records
(checked against ``SampleResult.losses``, which the sampler keeps separately, and against the latents)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from zerocon_core.method import diagnostics as dg
from zerocon_core.method.guidance import CrossAttentionGuidance, GuidanceTerm, PatchNCEGuidance
from zerocon_core.method.sampler import GuidedStep, SamplerSettings, _guidance_step, guided_ddim_sample
from zerocon_core.method.schedule import ddim_sigmas, vp_scale

from .tiny import tiny_cond, tiny_latent

STEPS = 5


@dataclass(frozen=True)
class FailsAt(GuidanceTerm):
    """|x|^2 / 2, NaN at the steps in ``bad`` (a gradient that no rescaling repairs)."""

    bad: tuple[int, ...] = ()

    def loss(self, ctx, request):
        value = ctx.x.pow(2).sum() / 2
        return value * float("nan") if ctx.step in self.bad else value


def _run(den, terms, mode="auto", resample=1):
    sig = ddim_sigmas(den.sigma_table, STEPS)
    x = tiny_latent(3) / vp_scale(sig[0])
    settings = SamplerSettings(cfg=3.0, step_mode=mode, resample=resample, seed=1, step_size=0.02)
    return guided_ddim_sample(
        den, x, sig, source_cond=tiny_cond(1), edit_cond=tiny_cond(2), guidance=terms, settings=settings
    )


@pytest.fixture(scope="module")
def mixed(den):
    terms = (CrossAttentionGuidance(weight=1.0), PatchNCEGuidance(weight=2.0, num_patches=16))
    return terms, _run(den, terms, resample=2)


def test_series_are_the_samplers_losses(mixed):
    terms, res = mixed
    assert len(res.losses) == STEPS + 1 == len(res.records)  # step 0 twice (resampling)
    by_step = res.losses[1:]  # each step's last evaluation
    pts = dg.series(res)
    for term in terms:
        name = type(term).__name__
        values = [d[name] / term.weight for d in by_step]  # the sampler logs weight x loss
        lo, hi = min(values), max(values)
        assert [i for i, _ in pts[name]] == list(range(STEPS))
        assert [v for _, v in pts[name]] == pytest.approx([(v - lo) / (hi - lo) for v in values], rel=1e-9)
    assert [v for _, v in pts["update"]] == pytest.approx([1.0] * STEPS, rel=1e-9)  # auto: 2 % at every step


def test_summary_numbers(mixed):
    _, res = mixed
    s = dg.summarize(res)
    assert (s.num_steps, s.active, s.applied, s.skipped, s.retried) == (STEPS, STEPS, STEPS, (), ())
    assert s.mean_update == pytest.approx(0.02, rel=1e-9)
    assert s.pulls == {"PatchNCEGuidance": pytest.approx(2.0, rel=1e-9)}
    assert dg.summary(res) == (
        "guidance applied at 5/5 steps (step mode auto); mean update 2.0% of the latent RMS; "
        "PatchNCE pulled 2x as hard as cross-attention."
    )


def test_chart_is_a_comfy_image_with_the_points(mixed):
    terms, res = mixed
    img = dg.chart(res)
    lay = dg.Layout()
    assert img.shape == (1, lay.height, lay.width, 3) and img.dtype == torch.float32
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    pixels = (img[0] * 255).round().to(torch.uint8)
    colour = torch.tensor(dg.TERM_COLOURS[1], dtype=torch.uint8)  # PatchNCE: drawn last, never covered
    for i, v in dg.series(res)["PatchNCEGuidance"]:
        assert torch.equal(pixels[lay.y(v), lay.x(i, STEPS)], colour), (i, v)
    # and where the points are is where the sampler's losses put them
    values = [d["PatchNCEGuidance"] / 2.0 for d in res.losses[1:]]
    lo, hi = min(values), max(values)
    top_step = values.index(hi)
    assert torch.equal(pixels[lay.y(1.0), lay.x(top_step, STEPS)], colour)
    assert torch.equal(pixels[lay.y((values[0] - lo) / (hi - lo)), lay.x(0, STEPS)], colour)


def test_skipped_steps_are_marked_and_counted(den):
    res = _run(den, (FailsAt(weight=1.0, bad=(1, 3)),))
    s = dg.summarize(res)
    assert s.skipped == (1, 3) == tuple(res.skipped) and s.applied == 3 and s.active == STEPS
    assert s.mean_update == pytest.approx(0.02, rel=1e-9)  # over the applied steps only
    text = dg.summary(res)
    assert text.startswith("guidance applied at 3/5 steps (step mode auto)")
    assert "Skipped (gradient not finite even after rescaling) at step(s) 1, 3." in text
    assert "WARNING" not in text  # 2 skipped steps: not "more than a few"
    lay = dg.Layout()
    pixels = (dg.chart(res)[0] * 255).round().to(torch.uint8)
    band = torch.tensor((250, 205, 205), dtype=torch.uint8)

    def banded(i):
        column = pixels[lay.top + 1 : lay.bottom, lay.x(i, STEPS) + 10]
        return bool((column == band).all(-1).any())

    assert [banded(i) for i in range(STEPS)] == [False, True, False, True, False]
    assert [i for i, _ in dg.series(res)["update"]] == [0, 2, 4]


def test_more_than_a_few_skipped_steps_warn(den):
    res = _run(den, (FailsAt(weight=1.0, bad=(1, 2, 3)),))
    assert dg.too_many_skipped(dg.summarize(res))
    assert "WARNING: the guidance was skipped at 3 of 5 steps" in dg.summary(res)


def test_raw_mode_records_the_update_fraction(den):
    """raw, one term: the recorded update is RMS(dz) / RMS(z) on the VP latent, computed here from the latents."""
    s = den.sigma_table[701]
    x = tiny_latent(4) / vp_scale(s)
    term = CrossAttentionGuidance(weight=0.1)
    req = term.request(den.layers())
    with torch.no_grad():
        (ref,) = den.predict(x + 0.1, s, [tiny_cond(1)], req)
    step = GuidedStep(den, 0, 1, s, None, [(term, req)], [ref, ref], tiny_cond(1), tiny_cond(2), torch.Generator())
    out = _guidance_step(x, step, SamplerSettings(step_mode="raw"))
    c = vp_scale(s)
    want = float(((x - out.latents[0]) * c).pow(2).mean().sqrt() / (x * c).pow(2).mean().sqrt())
    assert out.record.update == pytest.approx(want, rel=1e-9) and want > 0
    assert out.record.pulls == {"CrossAttentionGuidance": out.record.update}


def test_raw_mode_with_two_terms_reports_no_pulls(den):
    terms = (CrossAttentionGuidance(weight=0.1), PatchNCEGuidance(weight=0.5, num_patches=16))
    res = _run(den, terms, mode="raw")
    assert all(r.pulls == {} and r.grad_rms == {} for r in res.records)
    text = dg.summary(res)
    assert text.startswith("guidance applied at 5/5 steps (step mode raw); mean update ") and "pulled" not in text


def test_no_guidance(den):
    res = _run(den, ())
    assert dg.summary(res) == "no guidance: no term was active at any of the 5 steps (a plain DDIM edit)."
    assert dg.chart(res).shape == (1, dg.Layout().height, dg.Layout().width, 3)


def test_windows_are_reported(den):
    res = _run(den, (CrossAttentionGuidance(weight=1.0, start=0.0, end=0.6),))
    assert dg.summary(res).startswith(
        "guidance applied at 3/5 steps (step mode auto); the terms were active at 3 (their start/end); "
    )


def _word_gaps(row_band: torch.Tensor, min_width: int) -> int:
    """Runs of at least ``min_width`` blank columns between inked columns of a (H, W) ink mask."""
    inked = row_band.any(dim=0).tolist()
    first, last = inked.index(True), len(inked) - 1 - inked[::-1].index(True)
    gaps, run = 0, 0
    for col in inked[first : last + 1]:
        if col:
            gaps += run >= min_width
            run = 0
        else:
            run += 1
    return gaps


def test_chart_title_keeps_its_spaces(mixed):
    """The title is drawn with spaces a reader sees (with a 2-pixel space it read "4/4stepsapplied")."""
    _, res = mixed
    img = dg.chart(res)
    lay = dg.Layout()
    band = (img[0, 2 : lay.top - 10, lay.left :] < 0.5).any(dim=-1)  # dark pixels of the title's rows
    title = f"ZeroCon guidance per step ({res.step_mode}): {dg.summarize(res).applied}/{STEPS} steps applied"
    assert _word_gaps(band, min_width=4) >= title.count(" ")
