"""Image I/O and VAE latents (zerocon_core.common.images): sizes to a multiple of 8, PNG round trip, encode/decode."""

from __future__ import annotations

import logging

import pytest
import torch

from zerocon_core.common.images import (
    ImageSizeError,
    decode_latents,
    encode_latents,
    fit_to_multiple,
    load_image,
    nearest_multiple,
    save_image,
)

from .tiny import PNG_H as H
from .tiny import PNG_W as W
from .tiny import tiny_vae

# -- images ---------------------------------------------------------------------------------------------------


def test_nearest_multiple():
    assert [nearest_multiple(n) for n in (1, 3, 4, 8, 11, 12, 36, 44, 512)] == [8, 8, 8, 8, 8, 16, 40, 48, 512]


def test_fit_to_multiple_and_strict(caplog):
    img = torch.rand(1, 3, H, W)
    with caplog.at_level(logging.WARNING, logger="zerocon"):
        out, size = fit_to_multiple(img)
    assert size == (H, W) and tuple(out.shape) == (1, 3, 40, 48)
    assert "not a multiple of 8" in caplog.text
    same, size8 = fit_to_multiple(torch.rand(1, 3, 16, 24))
    assert size8 == (16, 24) and tuple(same.shape[-2:]) == (16, 24)
    with pytest.raises(ImageSizeError, match="44x36"):
        fit_to_multiple(img, strict=True)


def test_load_save_roundtrip(tmp_path, png):
    img = load_image(png)
    assert tuple(img.shape) == (1, 3, H, W) and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    out = save_image(img, tmp_path / "copy.png")
    assert torch.equal(load_image(out), img)  # PNG is lossless at 8 bits
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(ValueError, match="extension"):
        save_image(img, tmp_path / "x.unknownext")


def test_vae_latents_mean_and_sample():
    vae = tiny_vae()
    img = torch.rand(1, 3, 16, 24)
    z = encode_latents(vae, img)
    assert tuple(z.shape) == (1, 4, 2, 3)
    with torch.no_grad():
        mean = vae.encode(img * 2 - 1).latent_dist.mean
    torch.testing.assert_close(z, mean * 0.18215)
    s1, s2 = encode_latents(vae, img, "sample", seed=1), encode_latents(vae, img, "sample", seed=1)
    assert torch.equal(s1, s2) and not torch.equal(s1, z)
    assert not torch.equal(s1, encode_latents(vae, img, "sample", seed=2))
    dec = decode_latents(vae, z)
    assert tuple(dec.shape) == (1, 3, 16, 24) and float(dec.min()) >= 0 and float(dec.max()) <= 1
    with pytest.raises(ValueError, match="posterior"):
        encode_latents(vae, img, "mode")
