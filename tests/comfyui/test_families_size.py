"""The training-size rule (families.size_warning): when a latent is far above the family's training size, and
what the DDIM Inversion node says about it (log + text on the node)."""

from __future__ import annotations

import logging

import pytest
import sampling_helpers as h
import tiny_models as tm
import torch


def test_native_size_per_family(zc, sd15_model, sd2v_model, sdxl_model):
    detect = zc.families.detect_family
    assert detect(sd15_model).native_size == 512
    assert detect(sd2v_model).native_size == 768
    assert detect(sdxl_model).native_size == 1024
    assert zc.families.ModelFamily("SD2.x", "eps").native_size == 512  # SD 2.x-base


@pytest.mark.parametrize(
    "name, pred, pixels, warned",
    [
        ("SD1.x", "eps", (512, 512), False),
        ("SD1.x", "eps", (768, 768), False),  # exactly 2.25 x the pixels: the limit, not above it
        ("SD1.x", "eps", (776, 776), True),
        ("SD1.x", "eps", (512, 1536), True),  # 3 x the pixels in a tall image
        ("SD1.x", "eps", (1024, 1024), True),
        ("SD2.x", "v", (1024, 1024), False),  # 768-v: 1.78 x
        ("SD2.x", "eps", (1024, 1024), True),
        ("SDXL", "eps", (1024, 1024), False),
        ("SDXL", "eps", (2048, 2048), True),
    ],
)
def test_size_warning_threshold(zc, name, pred, pixels, warned):
    family = zc.families.ModelFamily(name, pred)
    height, width = pixels
    msg = zc.families.size_warning(family, (1, 4, height // 8, width // 8))
    assert (msg is not None) is warned
    if warned:
        side = family.native_size
        ratio = height * width / side**2
        assert f"{width}x{height} px" in msg and f"{side}x{side}" in msg and name in msg
        assert f"{ratio:.1f} x the pixels" in msg
        assert "time and memory" in msg and "degrade" in msg


def test_inversion_warns_about_1024px_on_sd15_in_log_and_on_the_node(zc, sd15_model, caplog):
    node = zc.sampling.ZeroConDDIMInversion
    kw = h.inversion_inputs(sd15_model, tm.conditioning(1), steps=2)
    with caplog.at_level(logging.WARNING, logger="zerocon"), torch.inference_mode():
        big = node.execute(latent=tm.latent(2, size=128), **kw)
    warnings = [r.getMessage() for r in caplog.records if "trained at" in r.getMessage()]
    assert len(warnings) == 1 and "1024x1024 px" in warnings[0] and "4.0 x" in warnings[0]
    assert big.ui is not None and big.ui.as_dict() == {"text": (warnings[0],)}

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="zerocon"), torch.inference_mode():
        small = node.execute(latent=tm.latent(2, size=64), **kw)
    assert small.ui is None
    assert not [r for r in caplog.records if "trained at" in r.getMessage()]
