"""zerocon_core.text.captioning with a tiny random BLIP saved by the test (no hub, no downloaded weights)."""

from __future__ import annotations

import os

import pytest
import torch

from zerocon_core.text import captioning as C

try:
    from .tiny_text import tiny_blip_folder
except ImportError:  # tests/core collected without a package
    from tiny_text import tiny_blip_folder


@pytest.fixture(scope="module")
def blip_folder(tmp_path_factory):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by tiny_text
    return tiny_blip_folder(tmp_path_factory.mktemp("models") / "blip-tiny")


@pytest.fixture(scope="module")
def blip(blip_folder):
    return C.load_blip(blip_folder, device="cpu", dtype=torch.float32)


def _images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 40, 48, 3, generator=g)


def test_caption_batch_with_prefix(blip):
    images = _images()
    kw = dict(max_new_tokens=8, min_new_tokens=2, num_beams=2)
    full = C.caption(blip, images, prefix="a photography of", strip_prefix=False, **kw)
    stripped = C.caption(blip, images, prefix="a photography of", **kw)
    assert len(full) == len(stripped) == 2 and all(isinstance(s, str) and s for s in stripped)
    for f, s in zip(full, stripped):
        assert f.startswith("a photography of ")
        assert f == "a photography of " + s
    # per-image batches give the same captions as one batch; PIL input equals tensor input
    assert C.caption(blip, images, batch_size=1, **kw) == stripped
    from PIL import Image

    pil = [Image.fromarray((im.numpy() * 255).round().astype("uint8")) for im in images]
    assert C.caption(blip, pil, **kw) == stripped


def test_caption_unconditional_and_max_tokens(blip):
    caps = C.caption(blip, _images()[:1], prefix="", max_new_tokens=3, num_beams=1, allow_empty=True)
    assert len(caps) == 1 and isinstance(caps[0], str) and len(caps[0].split()) <= 3


def test_load_bfloat16(blip_folder):
    b = C.load_blip(blip_folder, device="cpu", dtype=torch.bfloat16)
    assert b.dtype == torch.bfloat16 and b.device == torch.device("cpu")
    assert not any(p.requires_grad for p in b.model.parameters())
    caps = C.caption(b, _images(), max_new_tokens=4, num_beams=1, allow_empty=True)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)


def test_empty_caption_raises(blip, monkeypatch):
    monkeypatch.setattr(
        blip.processor, "batch_decode", lambda ids, **kw: ["a photography of", "a photography of a cat"]
    )
    with pytest.raises(ValueError, match=r"empty caption for image\(s\) \[0\]"):
        C.caption(blip, _images(), max_new_tokens=2, num_beams=1)
    assert C.caption(blip, _images(), max_new_tokens=2, num_beams=1, allow_empty=True) == ["", "a cat"]


def test_bad_images(blip):
    with pytest.raises(ValueError, match="no images"):
        C.caption(blip, [])
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        C.caption(blip, torch.rand(2, 3, 8, 8, 9))
    with pytest.raises(TypeError, match="PIL"):
        C.caption(blip, ["not an image"])


def test_missing_folder_error(tmp_path):
    missing = tmp_path / "blip" / "blip-image-captioning-base"
    with pytest.raises(FileNotFoundError) as e:
        C.load_blip(missing)
    assert str(missing) in str(e.value) and "Salesforce/blip-image-captioning-base" in str(e.value)


def test_incomplete_folder_error(tmp_path, blip_folder):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((blip_folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError) as e:
        C.load_blip(partial)
    msg = str(e.value)
    assert str(partial) in msg and "model.safetensors" in msg and C.BLIP_MODEL_ID in msg


def test_caption_settings_object_and_old_keywords_agree(blip):
    images = _images()
    kw = dict(max_new_tokens=6, min_new_tokens=1, num_beams=2)
    old = C.caption(blip, images, prefix="a photography of", **kw)
    assert C.caption(blip, images, settings=C.CaptionSettings(**kw)) == old
    assert C.caption(blip, images, "a photography of", 6, 2, min_new_tokens=1) == old  # the old positions
    with pytest.raises(TypeError, match="unexpected keyword argument 'beams'"):
        C.caption(blip, images, beams=2)
    with pytest.raises(TypeError, match="multiple values for argument 'prefix'"):
        C.caption(blip, images, "a", prefix="b")
