"""Fixtures shared by the core tests: one intra-op thread, and the tiny float64 denoisers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .tiny import tiny_denoiser, write_png

#: Our prediction-type names -> diffusers' ``prediction_type``.
PTYPES = {"eps": "epsilon", "v": "v_prediction"}


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Run torch single-threaded (restored after): tiny models gain nothing from intra-op threads, and on a
    shared CPU those threads thrash (a 20x slowdown was measured on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def den():
    """A float64 eps-prediction tiny denoiser (``tiny.tiny_denoiser``, seed 0)."""
    return tiny_denoiser("epsilon", seed=0)


@pytest.fixture(scope="module", params=["eps", "v"])
def pair(request):
    """(denoiser, untouched UNet copy, diffusers prediction_type) for an eps- and a v-prediction tiny model."""
    ptype = PTYPES[request.param]
    den, ref = tiny_denoiser(ptype, seed=0 if request.param == "eps" else 1, keep_copy=True)
    ref.requires_grad_(False)
    assert den.prediction_type == request.param
    return den, ref, ptype


@pytest.fixture()
def png(tmp_path) -> Path:
    """A 44x36 RGB gradient PNG (``tiny.write_png``): not a multiple of 8."""
    return write_png(tmp_path / "in.png")
