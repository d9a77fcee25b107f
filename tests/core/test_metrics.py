"""Edit metrics (zerocon_core.evaluation.metrics) against independent float64 formulas.

No weights, no network: DINO and CLIP are tiny random models built from configs (tests/core/tiny_vision.py).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zerocon_core.diffuseit import dino
from zerocon_core.evaluation import metrics

from .tiny_vision import random_image, tiny_clip_metric_folder, tiny_dino

C1, C2 = 0.01**2, 0.03**2


# ---------------------------------------------------------------------------------------------------------
# Independent references (plain numpy float64 loops)


def ref_ssim_map(x: np.ndarray, y: np.ndarray, window: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Naive SSIM map of (C, H, W) arrays over valid windows: (C, H-10, W-10)."""
    r = np.arange(window) - (window - 1) / 2
    g1 = np.exp(-(r**2) / (2 * sigma**2))
    w = np.outer(g1, g1)
    w /= w.sum()
    c, h, wd = x.shape
    out = np.zeros((c, h - window + 1, wd - window + 1))
    for ch in range(c):
        for i in range(h - window + 1):
            for j in range(wd - window + 1):
                px = x[ch, i : i + window, j : j + window]
                py = y[ch, i : i + window, j : j + window]
                mx, my = (w * px).sum(), (w * py).sum()
                vx = (w * (px - mx) ** 2).sum()
                vy = (w * (py - my) ** 2).sum()
                cxy = (w * (px - mx) * (py - my)).sum()
                out[ch, i, j] = ((2 * mx * my + C1) * (2 * cxy + C2)) / ((mx**2 + my**2 + C1) * (vx + vy + C2))
    return out


def ref_masked_ssim(x: np.ndarray, y: np.ndarray, edit_mask: np.ndarray) -> float:
    smap = ref_ssim_map(x, y)
    centres = edit_mask[5 : 5 + smap.shape[1], 5 : 5 + smap.shape[2]] == 0
    return float(smap[:, centres].mean())


# ---------------------------------------------------------------------------------------------------------
# Background PSNR / SSIM / MSE


@pytest.mark.parametrize("a,b", [(0.2, 0.7), (0.5, 0.5), (0.0, 1.0), (0.9, 0.85)])
def test_constant_images_closed_form(a, b):
    src = torch.full((1, 3, 16, 16), a, dtype=torch.float64)
    edt = torch.full((1, 3, 16, 16), b, dtype=torch.float64)
    mse = (a - b) ** 2
    assert metrics.background_mse(src, edt).item() == pytest.approx(mse, abs=1e-15)
    psnr = metrics.background_psnr(src, edt).item()
    if mse == 0:
        assert psnr == math.inf
    else:
        assert psnr == pytest.approx(10 * math.log10(1 / mse), rel=1e-12)
    # zero variances: SSIM is the luminance term alone
    expected_ssim = (2 * a * b + C1) / (a * a + b * b + C1)
    assert metrics.background_ssim(src, edt).item() == pytest.approx(expected_ssim, rel=1e-10)


def test_known_shift():
    src = random_image(3, 24, 20, torch.float64) * 0.8
    edt = src + 0.1
    assert metrics.background_mse(src, edt).item() == pytest.approx(0.01, rel=1e-12)
    assert metrics.background_psnr(src, edt).item() == pytest.approx(20.0, rel=1e-12)
    expected = ref_ssim_map(src[0].numpy(), edt[0].numpy()).mean()
    assert metrics.background_ssim(src, edt).item() == pytest.approx(expected, rel=1e-10)


def test_ssim_matches_naive_reference_and_identity():
    x = random_image(0, 18, 23, torch.float64)
    y = (x + 0.2 * random_image(1, 18, 23, torch.float64) - 0.1).clamp(0, 1)
    smap = metrics.ssim_map(x, y)
    ref = ref_ssim_map(x[0].numpy(), y[0].numpy())
    assert smap.shape == (1, 3, 8, 13)
    np.testing.assert_allclose(smap[0].numpy(), ref, rtol=1e-10, atol=1e-12)
    assert metrics.background_ssim(x, y).item() == pytest.approx(ref.mean(), rel=1e-10)
    assert metrics.background_ssim(x, x).item() == pytest.approx(1.0, abs=1e-12)
    # symmetric
    assert metrics.background_ssim(y, x).item() == pytest.approx(metrics.background_ssim(x, y).item(), rel=1e-12)


def test_masked_metrics_hand_computed():
    src = torch.zeros(1, 3, 20, 20, dtype=torch.float64)
    edt = torch.full_like(src, 0.2)
    mask = torch.zeros(20, 20, dtype=torch.float64)
    mask[5:12, 6:15] = 1.0
    edt[:, :, 5:12, 6:15] = 0.5  # the edited region changes a lot; the background by 0.2
    assert metrics.background_mse(src, edt, mask).item() == pytest.approx(0.04, rel=1e-12)
    assert metrics.background_psnr(src, edt, mask).item() == pytest.approx(10 * math.log10(25), rel=1e-12)
    # whole image: 63 of 400 pixels differ by 0.5, the rest by 0.2
    whole = (63 * 0.25 + 337 * 0.04) / 400
    assert metrics.background_mse(src, edt).item() == pytest.approx(whole, rel=1e-12)
    expected = ref_masked_ssim(src[0].numpy(), edt[0].numpy(), mask.numpy())
    assert metrics.background_ssim(src, edt, mask).item() == pytest.approx(expected, rel=1e-10)


def test_edit_inside_mask_leaves_background_perfect():
    src = random_image(5, 24, 24, torch.float64)
    edt = src.clone()
    mask = torch.zeros(1, 24, 24)
    mask[:, 8:16, 8:16] = 1
    edt[:, :, 8:16, 8:16] = 1 - edt[:, :, 8:16, 8:16]
    assert metrics.background_mse(src, edt, mask).item() == 0.0
    assert metrics.background_psnr(src, edt, mask).item() == math.inf
    # windows centred in the background but overlapping the edit see it: SSIM < 1, matching the reference
    ssim = metrics.background_ssim(src, edt, mask).item()
    assert ssim < 1.0
    assert ssim == pytest.approx(ref_masked_ssim(src[0].numpy(), edt[0].numpy(), mask[0].numpy()), rel=1e-10)


def test_mask_layouts_are_equivalent():
    src, edt = random_image(0, 16, 16), random_image(1, 16, 16)
    m = (torch.rand(16, 16, generator=torch.Generator().manual_seed(0)) > 0.6).float()
    values = [metrics.background_mse(src, edt, mm).item() for mm in (m, m[None], m[None, None])]
    assert values[0] == values[1] == values[2]


def test_empty_background_is_nan(caplog):
    src, edt = random_image(0, 16, 16), random_image(1, 16, 16)
    with caplog.at_level(logging.WARNING, logger="zerocon"):
        v = metrics.background_mse(src, edt, torch.ones(16, 16))
    assert math.isnan(v.item())
    assert "no background" in caplog.text


def test_mask_of_another_size_is_an_error():
    src, edt = random_image(0, 16, 16), random_image(1, 16, 16)
    with pytest.raises(ValueError, match="mask is 12x16 but the source image is 16x16"):
        metrics.background_psnr(src, edt, torch.zeros(16, 12))
    with pytest.raises(ValueError, match="mask batch"):
        metrics.background_mse(src, edt, torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="mask must be shaped"):
        metrics.background_mse(src, edt, torch.zeros(1, 2, 16, 16))


def test_size_mismatch_resizes_edited_with_warning(caplog):
    src = random_image(0, 32, 24)
    big = random_image(1, 64, 48)
    with caplog.at_level(logging.WARNING, logger="zerocon"):
        got = metrics.background_mse(src, big)
    assert "resizing the edited image" in caplog.text
    resized = F.interpolate(big, size=(32, 24), mode="bilinear", align_corners=False, antialias=True)
    assert got.item() == pytest.approx(((src - resized) ** 2).mean().item(), rel=1e-6)


def test_dtypes_batching_and_broadcast():
    src = torch.cat([random_image(i, 16, 16) for i in range(3)])
    edt = torch.cat([random_image(10 + i, 16, 16) for i in range(3)])
    assert metrics.background_ssim(src, edt).dtype == torch.float32
    assert metrics.background_ssim(src.double(), edt).dtype == torch.float64
    batched = metrics.background_ssim(src, edt)
    single = torch.stack([metrics.background_ssim(src[i : i + 1], edt[i : i + 1])[0] for i in range(3)])
    assert torch.equal(batched, single)
    one_source = metrics.background_mse(src[:1], edt)
    assert torch.allclose(
        one_source, torch.stack([metrics.background_mse(src[:1], edt[i : i + 1])[0] for i in range(3)])
    )
    with pytest.raises(ValueError, match="batch sizes differ"):
        metrics.background_mse(src[:2], edt)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        metrics.background_mse(src[0], edt[0])
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.background_ssim(src[..., :8, :8], edt[..., :8, :8])


def test_deterministic():
    src, edt = random_image(0, 20, 20), random_image(1, 20, 20)
    a = metrics.edit_metrics(src, edt)
    b = metrics.edit_metrics(src, edt)
    for k in metrics.METRIC_NAMES:
        assert torch.equal(a[k], b[k]) or (a[k].isnan().all() and b[k].isnan().all())


def ref_structure_distance(keys_a: torch.Tensor, keys_b: torch.Tensor) -> float:
    def sim(k):
        k = k.double()
        n = k.norm(dim=-1)
        return (k @ k.T) / torch.clamp(torch.outer(n, n), min=1e-8)

    return float(((sim(keys_a) - sim(keys_b)) ** 2).mean())


def test_structure_distance_identity_symmetry_and_reference():
    model = tiny_dino(0)
    a = torch.cat([random_image(0, 48, 48), random_image(2, 48, 48)])
    b = torch.cat([random_image(1, 48, 48), random_image(3, 48, 48)])
    assert torch.equal(metrics.structure_distance(model, a, a), torch.zeros(2))
    d_ab = metrics.structure_distance(model, a, b)
    d_ba = metrics.structure_distance(model, b, a)
    torch.testing.assert_close(d_ab, d_ba, rtol=1e-6, atol=1e-9)
    assert (d_ab > 0).all()
    ka, kb = dino.dino_keys(model, a), dino.dino_keys(model, b)
    for i in range(2):
        assert d_ab[i].item() == pytest.approx(ref_structure_distance(ka[i], kb[i]), rel=1e-4)
    sim = dino.key_self_similarity(ka)
    assert sim.shape == (2, 785, 785)
    torch.testing.assert_close(sim.diagonal(dim1=1, dim2=2), torch.ones(2, 785), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sim, sim.transpose(1, 2))


# ---------------------------------------------------------------------------------------------------------
# CLIP


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tiny_clip_metric_folder(tmp_path_factory.mktemp("clip") / "clip-vit-large-patch14")
    return metrics.load_clip_metric(folder)


TEXTS = ["a cat", "a dog", "a horse", "a zebra", "the red car", "a photo of grass", "blue sky", "an oil painting"]


def _model_cosines(clip, image: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """Cosines through CLIPModel.forward (logits_per_image / logit scale), preprocessing done here."""
    mean = torch.tensor(metrics.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(metrics.CLIP_STD).view(1, 3, 1, 1)
    tok = clip.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = clip.model(
            input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=(image - mean) / std
        )
    return (out.logits_per_image / clip.model.logit_scale.exp())[0]


def test_clip_score_matches_model_forward(clip):
    img = random_image(7, 32, 32)
    cos = _model_cosines(clip, img, TEXTS)
    got = metrics.clip_similarity(clip, img.expand(len(TEXTS), -1, -1, -1), TEXTS)
    torch.testing.assert_close(got, cos, rtol=1e-5, atol=1e-6)
    score = metrics.clip_score(clip, img.expand(len(TEXTS), -1, -1, -1), TEXTS)
    torch.testing.assert_close(score, 100 * cos.clamp_min(0), rtol=1e-5, atol=1e-4)


def test_clip_accuracy_on_provably_ordered_texts(clip):
    imgs = torch.cat([random_image(s, 32, 32) for s in (7, 8)])
    for i in range(2):
        cos = _model_cosines(clip, imgs[i : i + 1], TEXTS)
        best, worst = TEXTS[int(cos.argmax())], TEXTS[int(cos.argmin())]
        assert metrics.clip_accuracy(clip, imgs[i : i + 1], worst, best).item() == 1.0
        assert metrics.clip_accuracy(clip, imgs[i : i + 1], best, worst).item() == 0.0
        assert metrics.clip_accuracy(clip, imgs[i : i + 1], best, best).item() == 0.0  # a tie is not a success


def test_clip_accuracy_with_constructed_embeddings(clip, monkeypatch):
    img_emb = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    text_table = {"src": [1.0, 0.2, 0.0], "tgt": [0.0, 1.0, 0.2], "far": [-1.0, 0.0, 0.0]}
    monkeypatch.setattr(metrics, "clip_image_embeds", lambda _c, images: img_emb[: images.shape[0]])
    monkeypatch.setattr(
        metrics, "clip_text_embeds", lambda _c, texts: F.normalize(torch.tensor([text_table[t] for t in texts]), dim=-1)
    )
    imgs = torch.zeros(3, 3, 16, 16)
    acc = metrics.clip_accuracy(clip, imgs, ["src", "src", "src"], ["tgt", "tgt", "far"])
    # image 0 is closer to src, image 1 to tgt, image 2: cos 0 vs cos 0 (a tie) -> 0
    assert acc.tolist() == [0.0, 1.0, 0.0]
    out = metrics.edit_metrics(imgs, imgs, ["src"] * 3, ["tgt", "tgt", "far"], clip=clip)
    assert out["clip_accuracy"].tolist() == [0.0, 1.0, 0.0]
    expected = 100 * torch.tensor([0.0, 1.0 / math.hypot(1.0, 0.2), 0.0])
    torch.testing.assert_close(out["clip_score"], expected)


def test_clip_preprocess_resizes_and_crops(clip):
    # a wide image: short side to 32, centre crop 32x32 -> same embedding as cropping by hand first
    wide = random_image(4, 32, 64)
    centre = wide[..., :, 16:48]
    torch.testing.assert_close(metrics.clip_image_embeds(clip, wide), metrics.clip_image_embeds(clip, centre))
    big = random_image(4, 64, 64)
    small = F.interpolate(big, size=(32, 32), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    torch.testing.assert_close(metrics.clip_image_embeds(clip, big), metrics.clip_image_embeds(clip, small))


def test_clip_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="openai/clip-vit-large-patch14") as err:
        metrics.load_clip_metric(tmp_path / "clip")
    assert str(tmp_path / "clip") in str(err.value)


def test_edit_metrics_all_columns(clip):
    model = tiny_dino(0)
    src = torch.cat([random_image(0, 32, 32), random_image(1, 32, 32)])
    edt = torch.cat([random_image(0, 32, 32), random_image(2, 32, 32)])
    out = metrics.edit_metrics(src, edt, "a cat", ["a dog", "a zebra"], clip=clip, dino=model)
    assert list(out) == list(metrics.METRIC_NAMES)
    assert all(v.shape == (2,) for v in out.values())
    assert (
        out["structure_distance"][0] == 0 and out["bg_psnr"][0] == math.inf and out["bg_ssim"][0] == pytest.approx(1.0)
    )
    bare = metrics.edit_metrics(src, edt)
    assert bare["clip_score"].isnan().all() and bare["structure_distance"].isnan().all()
    torch.testing.assert_close(bare["bg_mse"], out["bg_mse"])
