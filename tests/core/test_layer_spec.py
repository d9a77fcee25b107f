"""Layer specs on UNets and MM-DiTs (zerocon_core.method.denoiser): parsing, selection, per-family defaults."""

from __future__ import annotations

import pytest

from zerocon_core.method.denoiser import LayerInfo, default_layers, parse_layer_spec, select_layers
from zerocon_core.method.guidance import CrossAttentionGuidance, PatchNCEGuidance


def _dit(stacks: dict[str, int]) -> list[LayerInfo]:
    out = []
    for block, n in stacks.items():
        for i in range(n):
            out += [
                LayerInfo(f"{block}.{i}.img2txt", "cross", block, i),
                LayerInfo(f"{block}.{i}.img", "self", block, i),
            ]
    return out


FLUX_DEV = _dit({"double": 19, "single": 38})
SD35_LARGE = _dit({"joint": 38})
UNET = [
    LayerInfo("input.1.0.attn1", "self", "down", 0),
    LayerInfo("input.1.0.attn2", "cross", "down", 0),
    LayerInfo("middle.0.0.attn1", "self", "mid", 1),
    LayerInfo("middle.0.0.attn2", "cross", "mid", 1),
    LayerInfo("output.3.0.attn1", "self", "up", 0),
    LayerInfo("output.3.0.attn2", "cross", "up", 0),
]


def test_flux_defaults():
    """Maps from 5 double-stream blocks over the second half of that stack; features from 4 blocks over the
    second half of the model's depth (single-stream blocks 9..37 for Flux-dev's 19 + 38)."""
    assert default_layers(FLUX_DEV, "cross") == [f"double.{i}.img2txt" for i in (9, 11, 14, 16, 18)]
    assert default_layers(FLUX_DEV, "self") == [f"single.{i}.img" for i in (9, 18, 28, 37)]


def test_sd3_defaults_and_small_models():
    assert default_layers(SD35_LARGE, "cross") == [f"joint.{i}.img2txt" for i in (19, 24, 28, 32, 37)]
    assert default_layers(SD35_LARGE, "self") == [f"joint.{i}.img" for i in (19, 25, 31, 37)]
    tiny = _dit({"double": 1, "single": 1})
    assert default_layers(tiny, "cross") == ["double.0.img2txt"]
    assert default_layers(tiny, "self") == ["single.0.img"]


@pytest.mark.parametrize("spec", ["all", "up", "down,mid", "up:0,1", "auto", " AUTO "])
def test_unet_words_on_a_dit_mean_the_family_default(spec):
    blocks, levels = parse_layer_spec(spec)
    for kind in ("cross", "self"):
        assert select_layers(FLUX_DEV, kind, blocks, levels) == default_layers(FLUX_DEV, kind)


def test_dit_block_specs():
    assert select_layers(FLUX_DEV, "cross", *parse_layer_spec("double:0,1,17,18")) == [
        f"double.{i}.img2txt" for i in (0, 1, 17, 18)
    ]
    assert len(select_layers(FLUX_DEV, "self", *parse_layer_spec("double,single"))) == 57
    assert select_layers(SD35_LARGE, "self", *parse_layer_spec("joint:3")) == ["joint.3.img"]
    assert CrossAttentionGuidance(layers="single:37").request(FLUX_DEV).probs == {"single.37.img2txt"}
    assert PatchNCEGuidance().request(FLUX_DEV).features == set(default_layers(FLUX_DEV, "self"))


def test_unet_behaviour_unchanged_and_auto():
    assert select_layers(UNET, "cross", *parse_layer_spec("all")) == [
        "input.1.0.attn2",
        "middle.0.0.attn2",
        "output.3.0.attn2",
    ]
    assert select_layers(UNET, "self", *parse_layer_spec("up")) == ["output.3.0.attn1"]
    assert select_layers(UNET, "cross", *parse_layer_spec("auto")) == select_layers(
        UNET, "cross", ("down", "mid", "up")
    )
    assert select_layers(UNET, "self", *parse_layer_spec("auto")) == ["output.3.0.attn1"]


def test_bad_specs():
    with pytest.raises(ValueError, match="unknown block"):
        parse_layer_spec("middle")
    with pytest.raises(ValueError, match="'auto' stands alone"):
        parse_layer_spec("auto:1")
    with pytest.raises(ValueError, match="'auto' stands alone"):
        parse_layer_spec("auto,up")
    with pytest.raises(ValueError, match="DiT block"):
        select_layers(UNET, "cross", *parse_layer_spec("double"))
    with pytest.raises(ValueError, match=r"at block indices \[40\].*19 double blocks \(indices 0-18\)"):
        select_layers(FLUX_DEV, "cross", *parse_layer_spec("double:40"))
    with pytest.raises(ValueError, match="no cross-attention layers in blocks"):
        select_layers(SD35_LARGE, "cross", *parse_layer_spec("single"))
