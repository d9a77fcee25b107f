"""DiffuseIT's pure losses (zerocon_core.diffuseit.losses) against independent float64 formulas; gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from zerocon_core.diffuseit.losses import (
    cls_loss,
    key_contrastive_loss,
    pixel_mse_loss,
    range_loss,
    self_similarity_loss,
    semantic_divergence_loss,
)

from .tiny import rand_image, randn64

# -- independent float64 reference formulas (loops, no code under test) ---------------------------------------


def ref_cos(u, v):
    return float(u @ v) / (math.sqrt(float(u @ u)) * math.sqrt(float(v @ v)))


def ref_ssim(keys, src):
    total = 0.0
    for k, s in zip(keys, src):
        t = k.shape[0]
        acc = 0.0
        for a in range(t):
            for b in range(t):
                acc += (ref_cos(k[a], k[b]) - ref_cos(s[a], s[b])) ** 2
        total += acc / (t * t)
    return total


def ref_contrastive(keys, src, tau):
    total = 0.0
    for q, k in zip(keys, src):
        t = q.shape[0]
        acc = 0.0
        for a in range(t):
            pos = ref_cos(q[a], k[a]) / tau
            logits = [pos] + [(-10.0 if b == a else ref_cos(q[a], k[b])) / tau for b in range(t)]
            m = max(logits)
            acc += -(pos - (m + math.log(sum(math.exp(v - m) for v in logits))))
        total += acc / t
    return total


# -- losses ----------------------------------------------------------------------------------------------------


def test_self_similarity_loss_matches_formula_and_identity():
    keys, src = randn64(2, 6, 5, seed=1), randn64(2, 6, 5, seed=2)
    assert float(self_similarity_loss(keys, src)) == pytest.approx(ref_ssim(keys, src), rel=1e-12)
    assert float(self_similarity_loss(src, src)) == pytest.approx(0.0, abs=1e-15)
    # a batch-1 source broadcasts: the same as repeating it
    one = src[:1]
    assert float(self_similarity_loss(keys, one)) == pytest.approx(ref_ssim(keys, one.expand(2, 6, 5)), rel=1e-12)
    assert self_similarity_loss(keys.float(), src.float()).dtype == torch.float32


def test_key_contrastive_loss_matches_formula_chance_and_identity():
    keys, src = randn64(2, 7, 4, seed=3), randn64(2, 7, 4, seed=4)
    for tau in (0.07, 0.5):
        assert float(key_contrastive_loss(keys, src, tau)) == pytest.approx(ref_contrastive(keys, src, tau), rel=1e-10)
    # chance level ln(T) for near-orthogonal random keys; well below it on identical keys
    wide_q, wide_k = randn64(1, 20, 4096, seed=5), randn64(1, 20, 4096, seed=6)
    assert float(key_contrastive_loss(wide_q, wide_k)) == pytest.approx(math.log(20), abs=0.15)
    assert float(key_contrastive_loss(wide_k, wide_k)) < 0.1


def test_cls_semantic_range_pixel_losses_match_formulas():
    cls, ref = randn64(3, 8, seed=7), randn64(1, 8, seed=8)
    expect = sum(float(((cls[i] - ref[0]) ** 2).mean()) for i in range(3))
    assert float(cls_loss(cls, ref)) == pytest.approx(expect, rel=1e-12)
    assert float(semantic_divergence_loss(cls, ref)) == pytest.approx(-expect, rel=1e-12)

    img = 0.5 + 0.8 * randn64(2, 3, 5, 5, seed=9)  # partly outside [0, 1]
    expect = 0.0
    for i in range(2):
        x = (2 * img[i] - 1).flatten().tolist()
        expect += sum((v - min(1.0, max(-1.0, v))) ** 2 for v in x) / len(x)
    assert float(range_loss(img)) == pytest.approx(expect, rel=1e-12)
    assert float(range_loss(img.clamp(0, 1))) == 0.0

    tgt = rand_image(10, b=1, h=5, w=5)
    expect = sum(float(((2 * img[i] - 1) - (2 * tgt[0] - 1)).pow(2).mean()) for i in range(2))
    assert float(pixel_mse_loss(img, tgt)) == pytest.approx(expect, rel=1e-12)


def test_pixel_mse_resizes_a_reference_of_another_size():
    img, tgt = rand_image(11, h=8, w=12), rand_image(12, h=20, w=30)
    resized = F.interpolate(tgt, size=(8, 12), mode="bilinear", align_corners=False, antialias=True)
    assert float(pixel_mse_loss(img, tgt)) == pytest.approx(float(4 * (img - resized).pow(2).mean()), rel=1e-12)


def test_batch_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="batch mismatch.*reference has batch 2"):
        cls_loss(randn64(3, 8), randn64(2, 8))
    with pytest.raises(ValueError, match="batch mismatch.*source has batch 2"):
        self_similarity_loss(randn64(3, 5, 4), randn64(2, 5, 4))
    with pytest.raises(ValueError, match="patch grids"):
        key_contrastive_loss(randn64(1, 5, 4), randn64(1, 6, 4))


def test_gradcheck_losses():
    keys = randn64(2, 5, 3, seed=13).requires_grad_(True)
    src = randn64(2, 5, 3, seed=14)
    cls = randn64(2, 4, seed=15).requires_grad_(True)
    ref = randn64(1, 4, seed=16)
    img = (0.5 + 0.7 * randn64(1, 3, 4, 4, seed=17)).requires_grad_(True)
    tgt = rand_image(18, h=6, w=6)
    assert torch.autograd.gradcheck(lambda k: self_similarity_loss(k, src), (keys,))
    assert torch.autograd.gradcheck(lambda k: key_contrastive_loss(k, src, 0.3), (keys,))
    assert torch.autograd.gradcheck(lambda c: cls_loss(c, ref), (cls,))
    assert torch.autograd.gradcheck(lambda c: semantic_divergence_loss(c, ref), (cls,))
    assert torch.autograd.gradcheck(lambda i: pixel_mse_loss(i, tgt), (img,))
    assert torch.autograd.gradcheck(range_loss, (img,))
