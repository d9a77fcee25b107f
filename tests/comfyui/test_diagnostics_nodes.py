"""The guided samplers' diagnostics outputs inside real ComfyUI (a per-step chart IMAGE and a summary STRING,
shown on the node), step mode "auto" as every node's default, and the Guided DDIM Sampler's logged summary."""

from __future__ import annotations

import logging
import re

import pytest
import sampling_helpers as h
import tiny_models as tm
import torch
from conftest import node_infos, pack_module
from test_diffuseit_nodes import dino, dino_nodes, dn, encode, image, sampler_inputs, structure, vae  # noqa: F401 (fixtures)

STEP_NODES = ("ZeroConGuidedSampler", "ZeroConGuidedDDIMSampler", "ZeroConDiffuseITSampler")
WEIGHT_NODES = (
    "ZeroConCrossAttentionGuidance",
    "ZeroConPatchNCEGuidance",
    "ZeroConDinoStructureGuidance",
    "ZeroConDinoStyleGuidance",
)


def _inputs(info) -> dict:
    return {**info["input"].get("required", {}), **info["input"].get("optional", {})}


def test_auto_is_the_default_on_every_node():
    infos = node_infos()
    auto_size = pack_module("zerocon_core.method.sampler").AUTO_STEP_SIZE
    for node in STEP_NODES:
        spec = _inputs(infos[node])
        assert spec["step_mode"][1]["default"] == "auto", node
        assert spec["step_size"][1]["default"] == pytest.approx(auto_size), node
        assert "auto (default, no tuning)" in spec["step_mode"][1]["tooltip"]
    for node in WEIGHT_NODES:
        weight = _inputs(infos[node])["weight"][1]
        assert weight["default"] == -1.0 and weight["min"] == -1.0, node
        assert weight["tooltip"].startswith("-1 = auto (no tuning needed)"), node
    for node in ("ZeroConGuidedSampler", "ZeroConDiffuseITSampler"):
        outputs = infos[node]["output"]
        assert list(outputs[-2:]) == ["IMAGE", "STRING"], node  # appended last: saved links keep their slots


def _execute(node_cls, **inputs):
    with torch.inference_mode():
        out = node_cls.execute(**inputs)
    return tuple(out.args), out.ui


def _check_image(img):
    assert img.ndim == 4 and img.shape[0] == 1 and img.shape[-1] == 3 and img.dtype == torch.float32
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    colours = pack_module("zerocon_core.method.diagnostics").TERM_COLOURS
    pixels = (img[0] * 255).round().to(torch.uint8)
    return [bool((pixels == torch.tensor(c, dtype=torch.uint8)).all(-1).any()) for c in colours[:2]]


def test_guided_sampler_outputs_diagnostics(zc, run, sd15_model):
    lat, cap, edit = tm.latent(31), tm.conditioning(32), tm.conditioning(33)
    _, inversion, _ = h.invert(zc, run, sd15_model, lat, cap)
    guidance = h.guidance(zc, run, xa=-1.0, nce=-1.0)
    sampler = zc.sampling.ZeroConGuidedSampler
    kw = dict(model=sd15_model, inversion=inversion, edited=edit, cfg=5.0, branches="edit", seed=0)
    (out, _, img, text), shown = _execute(sampler, step_mode="auto", step_size=0.02, guidance=guidance, **kw)
    assert torch.isfinite(out["samples"]).all()
    assert _check_image(img) == [True, True]  # both terms' loss curves are drawn
    assert text == (
        f"guidance applied at {h.STEPS}/{h.STEPS} steps (step mode auto); mean update 2.0% of the latent RMS; "
        "PatchNCE pulled 1x as hard as cross-attention."
    )
    assert shown.as_dict()["text"] == (text,)

    # a window: the summary counts the steps the terms were active at; a bigger step_size shows in the summary
    (g,) = run(zc.guidance.ZeroConCrossAttentionGuidance, weight=-1.0, layers="all", start=0.0, end=0.5)
    (_, _, _, text), _ = _execute(sampler, step_mode="auto", step_size=0.05, guidance=g, **kw)
    active = sum(1 for i in range(h.STEPS) if i / h.STEPS < 0.5)
    assert text.startswith(
        f"guidance applied at {active}/{h.STEPS} steps (step mode auto); the terms were active at {active} "
        "(their start/end); mean update 5.0% of the latent RMS."
    )

    # no guidance: said so, and a chart still comes out
    (_, _, img, text), _ = _execute(sampler, step_mode="auto", step_size=0.02, **kw)
    assert text == f"no guidance: no term was active at any of the {h.STEPS} steps (a plain DDIM edit)."
    _check_image(img)


def test_ddim_sampler_logs_the_summary(zc, run, sd15_model, caplog):
    lat, cap, edit = tm.latent(34), tm.conditioning(35), tm.conditioning(36)
    _, inversion, sigmas = h.invert(zc, run, sd15_model, lat, cap)
    (guider,) = run(
        zc.sampling.ZeroConGuiderNode,
        model=sd15_model,
        edited=edit,
        source=cap,
        cfg=5.0,
        guidance=h.guidance(zc, run, xa=-1.0, nce=-1.0),
        inversion=inversion,
    )
    sampler = h.ddim_sampler_node(zc, run, step_mode="auto")
    with caplog.at_level(logging.INFO, logger="zerocon"):
        h.sample_custom_advanced(guider, sampler, sigmas, lat)
    assert f"ZeroCon guidance: guidance applied at {h.STEPS}/{h.STEPS} steps (step mode auto)" in caplog.text


def test_diffuseit_sampler_outputs_diagnostics(dn, run, sd15_model, vae, dino):  # noqa: F811
    src = image(4)
    lat = encode(vae, src)
    guidance = structure(dn, run, sd15_model, vae, dino, src, weight=-1.0)
    kw = sampler_inputs(sd15_model, lat, guidance, step_mode="auto")
    (out, img, text), shown = _execute(dn.ZeroConDiffuseITSampler, **kw)
    assert torch.isfinite(out["samples"]).all()
    _check_image(img)
    m = re.match(r"guidance applied at (\d+)/(\d+) steps \(step mode auto\); mean update 2\.0% of the latent RMS", text)
    assert m and m.group(1) == m.group(2) and 1 < int(m.group(1)) < 6, text  # strength 0.5: part of the 6 steps
    # the auto ratios of the node's terms (semantic divergence is gated off at these low sigmas: 0)
    assert "semantic divergence pulled 0x as hard as DINO structure" in text
    assert "range pulled 0.5x as hard as DINO structure" in text
    assert text in shown.as_dict()["text"][0]


def test_skipped_steps_are_said_plainly_on_the_node(zc, run, sd15_model):
    """A term whose gradient is never finite: the output stays finite and the node's summary warns."""
    from dataclasses import dataclass

    base = pack_module("zerocon_core.method.guidance").GuidanceTerm

    @dataclass(frozen=True)
    class Broken(base):
        def loss(self, ctx, request):
            return (ctx.x * float("nan")).sum()

    lat, cap, edit = tm.latent(37), tm.conditioning(38), tm.conditioning(39)
    _, inversion, _ = h.invert(zc, run, sd15_model, lat, cap)
    kw = dict(model=sd15_model, inversion=inversion, edited=edit, cfg=5.0, branches="edit", seed=0)
    (out, _, img, text), shown = _execute(
        zc.sampling.ZeroConGuidedSampler, step_mode="auto", step_size=0.02, guidance=(Broken(weight=1.0),), **kw
    )
    assert torch.isfinite(out["samples"]).all()
    assert text.startswith(f"guidance applied at 0/{h.STEPS} steps (step mode auto)")
    assert f"WARNING: the guidance was skipped at {h.STEPS} of {h.STEPS} steps" in text
    assert shown.as_dict()["text"] == (text,)
    pixels = (img[0] * 255).round().to(torch.uint8)
    assert bool((pixels == torch.tensor((250, 205, 205), dtype=torch.uint8)).all(-1).any())  # skipped bands
