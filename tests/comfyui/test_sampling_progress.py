"""Console progress bars of the ZeroCon samplers (as the stock KSampler prints through k-diffusion's trange):
DDIM Inversion, Guided Sampler, Guided DDIM Sampler (SamplerCustomAdvanced) and DiffuseIT Sampler; none when
ComfyUI runs with progress bars disabled."""

from __future__ import annotations

import re

import comfy.utils
import sampling_helpers as h
import tiny_models as tm
from conftest import pack_module
from test_diffuseit_nodes import dino, dino_nodes, encode, image, sample, structure, vae  # noqa: F401  (fixtures + helpers)


def _bars(err: str, desc: str) -> list[tuple[int, int]]:
    """Every "desc: ... done/total" state tqdm wrote."""
    return [(int(a), int(b)) for a, b in re.findall(re.escape(desc) + r":[^\r\n]*?\| *(\d+)/(\d+)", err)]


def test_inversion_and_guided_sampler_print_a_console_bar(zc, run, sd15_model, capsys):
    _, inversion, _ = h.invert(zc, run, sd15_model, tm.latent(1), tm.conditioning(2), steps=4)
    inv = _bars(capsys.readouterr().err, "ZeroCon inversion")
    assert inv and inv[-1] == (4, 4)
    h.guided(zc, run, sd15_model, inversion, tm.conditioning(3))
    samp = _bars(capsys.readouterr().err, "ZeroCon sampling")
    assert samp and samp[-1] == (4, 4)


def test_guided_ddim_sampler_in_sampler_custom_advanced_prints_a_console_bar(zc, run, sd15_model, capsys):
    (guider,) = run(
        zc.sampling.ZeroConGuiderNode,
        model=sd15_model,
        edited=tm.conditioning(4),
        source=tm.conditioning(5),
        cfg=5.0,
    )
    sampler = h.ddim_sampler_node(zc, run)
    capsys.readouterr()
    h.sample_custom_advanced(guider, sampler, h.ddim_sigmas(sd15_model, 3), tm.latent(6))
    bars = _bars(capsys.readouterr().err, "ZeroCon sampling")
    assert bars and bars[-1] == (3, 3)


def test_diffuseit_sampler_prints_one_bar_through_its_resampled_first_step(run, sd15_model, vae, dino, capsys):  # noqa: F811
    dn = pack_module("nodes.classes.diffuseit_nodes")
    src = image(4)
    lat = encode(vae, src)
    guidance = structure(dn, run, sd15_model, vae, dino, src)
    capsys.readouterr()
    sample(dn, run, sd15_model, lat, guidance, steps=6, strength=0.5, resample=2)
    bars = _bars(capsys.readouterr().err, "ZeroCon sampling")
    assert bars and bars[-1][0] == bars[-1][1] and all(b == bars[-1][1] for _, b in bars)
    assert len({total for _, total in bars}) == 1  # one bar, not one per resampling pass


def test_no_console_bar_when_progress_bars_are_disabled(zc, run, sd15_model, capsys, monkeypatch):
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_ENABLED", False)
    _, inversion, _ = h.invert(zc, run, sd15_model, tm.latent(1), tm.conditioning(2), steps=3)
    h.guided(zc, run, sd15_model, inversion, tm.conditioning(3))
    err = capsys.readouterr().err
    assert "ZeroCon inversion" not in err and "ZeroCon sampling" not in err
