"""DINO ViT features (zerocon_core.diffuseit.dino): keys and [CLS] against a manual forward, resizing, gradients, loading.

No weights, no network: DINO is a tiny random ViT built from a config (tests/core/tiny_vision.py).
"""

from __future__ import annotations

import pytest
import torch

from zerocon_core.diffuseit import dino
from zerocon_core.diffuseit.dino import dino_features
from zerocon_core.diffuseit.losses import self_similarity_loss

from .tiny import rand_image
from .tiny_vision import random_image, tiny_dino, tiny_dino_folder


@pytest.fixture(scope="module")
def dino64():
    return tiny_dino(seed=0).double()


# ---------------------------------------------------------------------------------------------------------
# DINO


def test_dino_resize_shape_matches_torchvision_rule():
    assert dino.dino_resize_shape(256, 256) == (224, 224)
    assert dino.dino_resize_shape(256, 512) == (224, 448)
    assert dino.dino_resize_shape(600, 300) == (448, 224)
    assert dino.dino_resize_shape(100, 1000) == (48, 480)  # long side capped at 480


def test_dino_keys_match_a_manual_forward():
    model = tiny_dino(0)
    img = torch.cat([random_image(0, 64, 64), random_image(1, 64, 64)])
    feats = dino.dino_features(model, img)
    assert feats.keys.shape == (2, 785, 32) and feats.cls.shape == (2, 32) and feats.grid == (28, 28)
    assert torch.equal(dino.dino_keys(model, img), feats.keys)
    # independent, in float64 at a 64 px working size (8 x 8 patches + [CLS]): normalise by hand,
    # run with all hidden states, apply the last block's LayerNorm + key projection to its input
    model, img = model.double(), img.double()
    feats = dino.dino_features(model, img, size=64)
    assert feats.keys.shape == (2, 65, 32)
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    out = model(pixel_values=(img - mean) / std, output_hidden_states=True, interpolate_pos_encoding=True)
    last = dino._last_layer(model)  # transformers 5: model.layers[-1]; 4: model.encoder.layer[-1]
    keys = dino._key_projection(last)(last.layernorm_before(out.hidden_states[-2]))
    torch.testing.assert_close(feats.keys, keys, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(feats.cls, out.hidden_states[-1][:, 0], rtol=1e-10, atol=1e-12)


def test_dino_non_square_and_grad_flow():
    model = tiny_dino(0).requires_grad_(False)
    img = random_image(0, 40, 80).requires_grad_(True)
    feats = dino.dino_features(model, img)
    assert feats.grid == (28, 56) and feats.keys.shape == (1, 1 + 28 * 56, 32)
    feats.keys.pow(2).mean().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0


def test_dino_folder_round_trip_and_missing(tmp_path):
    folder = tiny_dino_folder(tmp_path / "dino-vitb8")
    model = dino.load_dino(folder)
    img = random_image(0, 32, 32)
    torch.testing.assert_close(dino.dino_keys(model, img), dino.dino_keys(tiny_dino(0), img))
    with pytest.raises(FileNotFoundError, match=r"facebook/dino-vitb8") as err:
        dino.load_dino(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"missing config\.json"):
        dino.load_dino(tmp_path / "empty")


# -- in the DiffuseIT losses --------------------------------------------------------------------------------------------------------


def test_dino_keys_are_differentiable_wrt_the_image(dino64):
    img = rand_image(19, h=16, w=16).requires_grad_(True)
    feats = dino_features(dino64, img, size=16)
    assert feats.keys.shape == (1, 5, 32) and feats.cls.shape == (1, 32)
    src = dino_features(dino64, rand_image(20, h=16, w=16), size=16).keys.detach()
    assert torch.autograd.gradcheck(lambda i: self_similarity_loss(dino_features(dino64, i, size=16).keys, src), (img,))


def test_785_tokens_at_224(dino64):
    feats = dino_features(dino64, rand_image(21, h=256, w=256))
    assert feats.keys.shape[1] == 785
