"""DINO keys (zerocon_core.diffuseit.dino) are the last block's *key* projection of its LayerNorm'd input.

Recomputed from the model's named modules (``k_proj`` in transformers 5, ``attention.key`` in 4), not through
the module's own lookup helpers, and checked to differ from the query and value projections: a lookup that
picked another projection would pass a test that recomputes the keys with the same lookup.
"""

from __future__ import annotations

import torch

from zerocon_core.diffuseit.dino import dino_features

from .tiny_vision import random_image, tiny_dino

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def projections(model):
    """(LayerNorm before attention, {"query", "key", "value"} linears) of the last block, by module name."""
    if hasattr(model, "layers"):  # transformers 5
        block = model.layers[-1]
        attn = block.attention
        return block.layernorm_before, {"query": attn.q_proj, "key": attn.k_proj, "value": attn.v_proj}
    block = model.encoder.layer[-1]  # transformers 4
    attn = block.attention.attention
    return block.layernorm_before, {"query": attn.query, "key": attn.key, "value": attn.value}


def test_keys_are_the_key_projection_not_query_or_value():
    model = tiny_dino(0).double()
    img = random_image(4, 64, 64).double()
    feats = dino_features(model, img, size=64)
    mean = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(pixel_values=(img - mean) / std, output_hidden_states=True, interpolate_pos_encoding=True)
        norm, proj = projections(model)
        h = norm(out.hidden_states[-2])  # the last block's input
        expect = {name: lin(h) for name, lin in proj.items()}
    torch.testing.assert_close(feats.keys, expect["key"], rtol=1e-10, atol=1e-12)
    for other in ("query", "value"):
        assert (expect[other] - expect["key"]).abs().max() > 1e-2
    torch.testing.assert_close(feats.cls, out.hidden_states[-1][:, 0], rtol=1e-10, atol=1e-12)
