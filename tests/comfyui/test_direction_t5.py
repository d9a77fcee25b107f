"""Edit directions with SD3 / SD3.5 and Flux CLIPs inside ComfyUI: tiny CLIP objects of ComfyUI's own SD3 and Flux
text-encoder classes (tiny_clip.sd3_clip / flux_clip), checked against CLIP Text Encode of each sentence on its
own (the independent computation: mean of the targets' conditionings minus mean of the sources', token-wise and
pooled), apply at the right tokens, save / load with the layout, the mismatch errors, Encode Prompts."""

from __future__ import annotations

import logging

import pytest
import tiny_clip
import torch
from conftest import pack_fixture, pack_module, run_node, temporary_model_folders

W_L, W_G = tiny_clip.SDXL_L_WIDTH, tiny_clip.SDXL_G_WIDTH  # tiny CLIP-L / CLIP-G widths (SD3 puts G after L)
SRC = "a photo of a cat\na cat sitting in the park\na small cat on the grass\nthere is a cute cat in the garden"
TGT = "a photo of a dog\na dog sitting in the park\na small dog on the grass"


dn = pack_fixture("nodes.classes.direction_nodes")


@pytest.fixture(scope="module")
def sd3():
    return tiny_clip.sd3_clip(seed=6)


@pytest.fixture(scope="module")
def flux():
    return tiny_clip.flux_clip(seed=7)


def encode_one(clip, text: str):
    """CLIP Text Encode's conditioning and pooled output for one sentence (float64)."""
    with torch.inference_mode():
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return cond[0].double(), pooled[0].double()


def mean_one_by_one(clip, text: str):
    rows = [encode_one(clip, s) for s in text.split("\n")]
    return sum(r[0] for r in rows) / len(rows), sum(r[1] for r in rows) / len(rows)


def make_direction(dn, clip, **over):
    inputs = dict(
        clip=clip,
        source="cat",
        target="dog",
        mode="sentence bank",
        num_sentences=4,
        batch_size=2,
        source_sentences=SRC,
        target_sentences=TGT,
    )
    inputs.update(over)
    (direction,) = run_node(dn.ZeroConEditDirection, **inputs)
    return direction


def caption(clip, text="a photo of a cat on the grass", **extra):
    import nodes as comfy_nodes

    with torch.inference_mode():
        (cond,) = comfy_nodes.CLIPTextEncode().encode(clip, text)
    cond[0][1].update(extra)
    return cond


# ---------------------------------------------------------------------------------------------------- building


def test_sd3_direction_is_the_mean_difference_of_clip_text_encode(dn, sd3):
    d = make_direction(dn, sd3)
    (ms, ps), (mt, pt) = mean_one_by_one(sd3, SRC), mean_one_by_one(sd3, TGT)
    assert ms.shape == (77 + 77, 4096)  # one CLIP chunk, T5 padded to 77: every sentence has this length
    diff, pdiff = mt - ms, pt - ps
    assert d.layout == "SD3" and d.encoders == (("l", W_L), ("g", W_G), ("t5xxl", 4096))
    assert d.extra["clip"].startswith("SD3ClipModel") and d.t5_length == 77
    torch.testing.assert_close(d.deltas["l"].double(), diff[:77, :W_L], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(d.deltas["g"].double(), diff[:77, W_L : W_L + W_G], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(d.deltas["t5xxl"].double(), diff[77:], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(d.delta.double(), diff, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(d.pooled.double(), pdiff, atol=2e-5, rtol=1e-4)
    assert d.deltas["t5xxl"].abs().max() > 0 and d.pooled[:W_L].abs().max() > 0 and d.pooled[W_L:].abs().max() > 0


def test_flux_direction_is_the_mean_difference_of_clip_text_encode(dn, flux):
    d = make_direction(dn, flux)
    (ms, ps), (mt, pt) = mean_one_by_one(flux, SRC), mean_one_by_one(flux, TGT)
    assert ms.shape == (256, 4096)  # Flux pads T5 to 256 tokens
    assert d.layout == "Flux" and d.encoders == (("t5xxl", 4096),) and d.pooled.shape == (W_L,)
    torch.testing.assert_close(d.delta.double(), mt - ms, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(d.pooled.double(), pt - ps, atol=2e-5, rtol=1e-4)
    prompt = make_direction(dn, flux, mode="prompt difference", source="a photo of a cat", target="a photo of a dog")
    a, pa = encode_one(flux, "a photo of a cat")
    b, pb = encode_one(flux, "a photo of a dog")
    assert prompt.mode == "prompt"
    torch.testing.assert_close(prompt.delta.double(), b - a, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(prompt.pooled.double(), pb - pa, atol=2e-5, rtol=1e-4)


def test_t5_length_follows_the_clips_tokenizer_options(dn, flux):
    """T5 Tokenizer Options' min_length sets the length the sentences are padded to (and the cache tells the two
    CLIPs apart: the default-length means made just before are not reused)."""
    make_direction(dn, flux)
    short = flux.clone()
    short.set_tokenizer_option("t5xxl_min_length", 100)
    d = make_direction(dn, short)
    (ms, _), (mt, _) = mean_one_by_one(short, SRC), mean_one_by_one(short, TGT)
    assert d.t5_length == 100 and ms.shape == (100, 4096)
    torch.testing.assert_close(d.delta.double(), mt - ms, atol=2e-5, rtol=1e-4)


def test_sd3_with_clip_l_only(dn):
    clip = tiny_clip.sd3_clip(g=False, t5=False, seed=8)
    d = make_direction(dn, clip)
    (ms, ps), (mt, pt) = mean_one_by_one(clip, SRC), mean_one_by_one(clip, TGT)
    assert ms.shape == (77, 4096) and d.encoders == (("l", W_L),) and d.kind() == "SD3: CLIP-L"
    torch.testing.assert_close(d.delta.double(), mt - ms, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(d.pooled.double(), pt - ps, atol=2e-5, rtol=1e-4)  # CLIP-G's half: zeros
    assert d.pooled.shape == (W_L + 1280,) and not d.pooled[W_L:].any()


def test_long_sentences_are_cut_to_the_t5_length_with_the_end_token(dn, flux, caplog):
    long = " ".join(["a cat on the grass"] * 60)  # 300 T5 tokens + end
    with caplog.at_level(logging.WARNING, logger="zerocon"):
        d = make_direction(dn, flux, source_sentences=long, target_sentences="a dog")
    assert d.t5_length == 256 and "cut to 256 tokens" in caplog.text
    tokens = flux.tokenize(long)
    assert len(tokens["t5xxl"][0]) == 301
    tokens = {"l": tokens["l"][:1], "t5xxl": [tokens["t5xxl"][0][:255] + [(1, 1.0)]]}  # </s> is 1
    with torch.inference_mode():
        cut = flux.encode_from_tokens(tokens)[0].double()
    dog, _ = encode_one(flux, "a dog")
    torch.testing.assert_close(d.delta.double(), dog - cut, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------- apply


def test_apply_sd3_long_caption(dn, sd3):
    d = make_direction(dn, sd3)
    cond = caption(sd3, " ".join(["a cat on the grass"] * 20), some_other_key="kept")  # 2 CLIP chunks, 101 T5
    x = cond[0][0]
    assert x.shape == (1, 154 + 101, 4096)
    (out,) = run_node(dn.ZeroConApplyEditDirection, conditioning=cond, direction=d, strength=0.5)
    expect = x.clone()
    for c in (0, 1):
        expect[0, 77 * c : 77 * c + 77, :W_L] += 0.5 * d.deltas["l"]
        expect[0, 77 * c : 77 * c + 77, W_L : W_L + W_G] += 0.5 * d.deltas["g"]
    expect[0, 154 : 154 + 77] += 0.5 * d.deltas["t5xxl"]  # the last 24 T5 tokens are left alone
    torch.testing.assert_close(out[0][0], expect)
    torch.testing.assert_close(out[0][1]["pooled_output"], cond[0][1]["pooled_output"] + 0.5 * d.pooled)
    assert out[0][1]["some_other_key"] == "kept" and not torch.equal(out[0][0], x)


def test_apply_flux_keeps_guidance_and_extras(dn, flux):
    d = make_direction(dn, flux)
    cond = caption(flux, guidance=3.5, some_other_key="kept")
    (out,) = run_node(dn.ZeroConApplyEditDirection, conditioning=cond, direction=d, strength=-1.0)
    torch.testing.assert_close(out[0][0], cond[0][0] - d.deltas["t5xxl"])
    torch.testing.assert_close(out[0][1]["pooled_output"], cond[0][1]["pooled_output"] - d.pooled)
    assert out[0][1]["guidance"] == 3.5 and out[0][1]["some_other_key"] == "kept"
    # A T5 padded shorter (T5 Tokenizer Options' min length) gets the direction's first tokens.
    short_clip = flux.clone()
    short_clip.set_tokenizer_option("t5xxl_min_length", 100)
    short = caption(short_clip)
    assert short[0][0].shape[1] == 100
    (out,) = run_node(dn.ZeroConApplyEditDirection, conditioning=short, direction=d, strength=1.0)
    torch.testing.assert_close(out[0][0], short[0][0] + d.deltas["t5xxl"][:100])


# ---------------------------------------------------------------------------------------------------- errors


def _error(dn, cond, direction) -> str:
    with pytest.raises(ValueError) as err:
        run_node(dn.ZeroConApplyEditDirection, conditioning=cond, direction=direction, strength=1.0)
    return " ".join(str(err.value).split())


def test_direction_from_another_family_is_a_clear_error(dn, sd3, flux):
    sd1 = make_direction(dn, tiny_clip.clip("sd1", seed=3))
    msg = _error(dn, caption(flux), sd1)
    assert msg.startswith("ZeroCon Apply Edit Direction: the direction was made with a different CLIP (SD1ClipModel)")
    assert f"it is {tiny_clip.CONTEXT_DIM} wide (SD1.x), but this conditioning is 4096 wide (Flux)" in msg
    # (Which SD3 encoders a conditioning holds is read at CLIP-L's real width, 768, when the direction has no
    # CLIP-L to say otherwise: exact for real models, not for the 32-wide tiny CLIP-L; tests/core checks it.)
    msg = _error(dn, caption(sd3), make_direction(dn, flux))
    assert "(FluxClipModel_): it is 4096 wide (Flux), but this conditioning is 4096 wide (SD3: " in msg
    msg = _error(dn, caption(flux), make_direction(dn, sd3))
    assert "it is 4096 wide (SD3: CLIP-L + CLIP-G + T5-XXL), but this conditioning is 4096 wide (Flux)" in msg
    only_l = make_direction(dn, tiny_clip.sd3_clip(g=False, t5=False, seed=8))
    msg = _error(dn, caption(sd3), only_l)
    assert "it is 4096 wide (SD3: CLIP-L), but this conditioning is 4096 wide (SD3: CLIP-L + CLIP-G + T5-XXL)" in msg
    msg = _error(dn, caption(tiny_clip.sd3_clip(g=False, t5=False, seed=8)), make_direction(dn, sd3))
    assert "(SD3: CLIP-L + CLIP-G + T5-XXL), but this conditioning is 4096 wide (SD3: CLIP-L)" in msg
    msg = _error(dn, caption(sd3), make_direction(dn, tiny_clip.clip("sdxl", seed=4)))
    assert f"it is {tiny_clip.CONTEXT_DIM} wide (SDXL), but this conditioning is 4096 wide (SD3: " in msg


# ---------------------------------------------------------------------------------------------------- save / load


def test_save_load_round_trip_with_layout(dn, sd3, flux, tmp_path):
    from safetensors import safe_open

    with temporary_model_folders(tmp_path, ("edit_directions",)):
        for name, clip in (("sd3", sd3), ("flux", flux)):
            d = make_direction(dn, clip)
            run_node(dn.ZeroConSaveEditDirection, direction=d, filename=name, overwrite=True)
            with safe_open(str(tmp_path / "edit_directions" / f"{name}.safetensors"), framework="pt") as f:
                meta = f.metadata()
            assert meta["layout"] == d.layout and meta["format_version"] == "2"
            (back,) = run_node(dn.ZeroConLoadEditDirection, name=f"{name}.safetensors")
            assert back.layout == d.layout and back.encoders == d.encoders and back.extra["clip"] == d.extra["clip"]
            torch.testing.assert_close(back.delta, d.delta)
            torch.testing.assert_close(back.pooled, d.pooled)
            cond = caption(clip)
            (a,) = run_node(dn.ZeroConApplyEditDirection, conditioning=cond, direction=d, strength=1.0)
            (b,) = run_node(dn.ZeroConApplyEditDirection, conditioning=cond, direction=back, strength=1.0)
            assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][1]["pooled_output"], b[0][1]["pooled_output"])


# ---------------------------------------------------------------------------------------------------- Encode Prompts


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_encode_prompts_batches_t5_clips(kind, sd3, flux):
    pn = pack_module("nodes.classes.prompt_nodes")
    clip = sd3 if kind == "sd3" else flux
    short, medium = "a cat", " ".join(["a dog on the grass"] * 10)  # 50 tokens (CLIP and T5): same padded length
    single = pn.encode_prompts(clip, [short])
    assert torch.equal(single[0][0], caption(clip, short)[0][0])
    ((cond, extra),) = pn.encode_prompts(clip, [short, medium, short])
    rows = [caption(clip, text)[0] for text in (short, medium)]
    assert cond.shape == (3, 154 if kind == "sd3" else 256, 4096) and extra["pooled_output"].shape[0] == 3
    torch.testing.assert_close(cond[0], rows[0][0][0])
    torch.testing.assert_close(cond[1], rows[1][0][0])
    torch.testing.assert_close(cond[2], cond[0])
    for i in range(2):
        torch.testing.assert_close(extra["pooled_output"][i], rows[i][1]["pooled_output"][0])


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_encode_prompts_pads_t5_to_the_longest_line(kind, sd3, flux, caplog):
    pn = pack_module("nodes.classes.prompt_nodes")
    clip = sd3 if kind == "sd3" else flux
    # "zebra" is one CLIP token but not in the tiny T5 vocabulary (spelled out in letters): 50 CLIP tokens (one
    # chunk), over 256 T5 tokens.
    short, long = "a cat", " ".join(["zebra"] * 50)
    t5_len = len(clip.tokenize(long)["t5xxl"][0])
    assert t5_len > 256 and len(clip.tokenize(long)["l"]) == 1
    with caplog.at_level(logging.INFO, logger="zerocon"):
        ((cond, extra),) = pn.encode_prompts(clip, [short, long])
    assert f"T5 sequences padded to {t5_len} tokens" in caplog.text
    padded = clip.clone()
    padded.set_tokenizer_option("t5xxl_min_length", t5_len)
    rows = [caption(padded, text)[0] for text in (short, long)]
    assert cond.shape[1] == rows[0][0].shape[1] == rows[1][0].shape[1] == t5_len + (77 if kind == "sd3" else 0)
    torch.testing.assert_close(cond[0], rows[0][0][0])
    torch.testing.assert_close(cond[1], rows[1][0][0])
    for i in range(2):
        torch.testing.assert_close(extra["pooled_output"][i], rows[i][1]["pooled_output"][0])


def test_encode_prompts_sd3_lines_of_different_clip_chunks_is_an_error(sd3):
    pn = pack_module("nodes.classes.prompt_nodes")
    with pytest.raises(ValueError, match=r"line 2 encodes to 255 tokens and line 1 to 178 .*75 CLIP tokens"):
        pn.encode_prompts(sd3, ["a cat", " ".join(["a cat on the grass"] * 20)])
