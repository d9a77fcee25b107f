"""The text side inside ComfyUI: BLIP loader / caption, edit directions with ComfyUI CLIPs, apply, save / load.

Tiny random models only (tiny_clip.py); HF_HUB_OFFLINE=1 and a trap on ``snapshot_download`` make sure
nothing ever reaches the Hugging Face hub.
"""

from __future__ import annotations

import logging
import os

import pytest
import tiny_clip
import torch
from conftest import forbid_downloads, load_on_cpu, pack_fixture, pack_module, run_node, temporary_model_folders

TEMPLATE_N = 6


blip_nodes = pack_fixture("nodes.classes.blip_nodes")
dn = pack_fixture("nodes.classes.direction_nodes")
zdir = pack_fixture("zerocon_core.text.direction")


@pytest.fixture
def model_dirs(tmp_path, monkeypatch):
    """Temporary models/blip and models/edit_directions folders, first in ComfyUI's search order."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    forbid_downloads(monkeypatch)
    with temporary_model_folders(tmp_path, ("blip", "edit_directions")):
        yield tmp_path


@pytest.fixture(scope="module")
def sd1_clip():
    return tiny_clip.clip("sd1", seed=3)


@pytest.fixture(scope="module")
def sdxl_clip():
    return tiny_clip.clip("sdxl", seed=4)


def encode_one(clip, text: str):
    """What CLIP Text Encode gives for one sentence: (cond (1, 77k, D), pooled (1, P))."""
    with torch.inference_mode():
        return clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)


def mean_one_by_one(clip, sentences):
    conds, pooleds = zip(*(encode_one(clip, s) for s in sentences))
    cond = torch.stack([c[0, :77].double() for c in conds]).mean(0)
    pooled = torch.stack([p[0].double() for p in pooleds]).mean(0)
    return cond, pooled


def make_direction(dn, clip, **over):
    inputs = dict(clip=clip, source="cat", target="dog", mode="sentence bank", num_sentences=TEMPLATE_N, batch_size=4)
    inputs.update(over)
    (direction,) = run_node(dn.ZeroConEditDirection, **inputs)
    return direction


# ---------------------------------------------------------------------------------------------------- BLIP


def test_blip_loader_missing_folder_names_folder_and_model_id(blip_nodes, model_dirs):
    with pytest.raises(FileNotFoundError) as err:
        load_on_cpu(blip_nodes.ZeroConBLIPLoader, "blip-image-captioning-base", allow_download=True)
    msg = str(err.value)
    assert str(model_dirs / "blip" / "blip-image-captioning-base") in msg
    assert "Salesforce/blip-image-captioning-base" in msg
    assert "the folder is missing and HF_HUB_OFFLINE is set" in msg


def test_blip_loader_download_switched_off(blip_nodes, model_dirs, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(pack_module("nodes.glue.loaders"), "hub_offline", lambda: False)
    with pytest.raises(FileNotFoundError, match="allow_download is off") as err:
        load_on_cpu(blip_nodes.ZeroConBLIPLoader, "blip-image-captioning-base")
    assert "Salesforce/blip-image-captioning-base" in str(err.value)


def test_blip_loader_downloads_once_when_allowed_and_online(blip_nodes, model_dirs, monkeypatch):
    """The download path, with snapshot_download replaced by a local writer (no network in tests)."""
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, local_dir, **kwargs):
        calls.append((repo_id, local_dir))
        tiny_clip.save_blip(local_dir)
        return local_dir

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(pack_module("nodes.glue.loaders"), "hub_offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    for _ in range(2):
        (blip,) = load_on_cpu(blip_nodes.ZeroConBLIPLoader, "blip-image-captioning-base", allow_download=True)
    assert calls == [("Salesforce/blip-image-captioning-base", str(model_dirs / "blip" / "blip-image-captioning-base"))]
    assert blip.blip.folder == str(model_dirs / "blip" / "blip-image-captioning-base")


def test_blip_loader_incomplete_local_folder_is_never_downloaded(blip_nodes, model_dirs, monkeypatch):
    monkeypatch.setattr(pack_module("nodes.glue.loaders"), "hub_offline", lambda: False)
    (model_dirs / "blip" / "my-blip").mkdir()
    (model_dirs / "blip" / "my-blip" / "config.json").write_text("{}")
    assert "my-blip" in blip_nodes.ZeroConBLIPLoader.INPUT_TYPES()["required"]["model"][1]["options"]
    with pytest.raises(FileNotFoundError, match=r"the folder is incomplete\)") as err:
        load_on_cpu(blip_nodes.ZeroConBLIPLoader, "my-blip", allow_download=True)
    assert str(model_dirs / "blip" / "my-blip") in str(err.value)


def test_blip_loader_rejects_paths(blip_nodes, model_dirs):
    with pytest.raises(ValueError, match="not a folder name"):
        load_on_cpu(blip_nodes.ZeroConBLIPLoader, "../secret")


def test_blip_caption_one_per_image(blip_nodes, model_dirs):
    import comfy.model_management as mm

    tiny_clip.save_blip(model_dirs / "blip" / "tiny-blip")
    options = blip_nodes.ZeroConBLIPLoader.INPUT_TYPES()["required"]["model"][1]["options"]
    assert "tiny-blip" in options and "blip-image-captioning-base" in options
    (blip,) = run_node(
        blip_nodes.ZeroConBLIPLoader, model="tiny-blip", precision="auto", device="auto", allow_download=False
    )
    assert blip.blip.dtype == torch.float32  # auto on CPU
    images = torch.rand(3, 40, 48, 3, generator=torch.Generator().manual_seed(0))
    out = blip_nodes.ZeroConBLIPCaption.execute(
        blip=blip, image=images, prefix="a photography of", max_new_tokens=4, min_new_tokens=0, num_beams=2
    )
    text = out.args[0]
    assert isinstance(text, str) and out.ui.as_dict() == {"text": (text,)}
    captions = text.split("\n")  # one line per image
    assert len(captions) == 3
    vocab = set(tiny_clip.BLIP_WORDS[6:])
    for text in captions:
        words = text.split()
        assert 1 <= len(words) <= 4 and set(words) <= vocab, text
        assert not text.startswith("a photography of")
    # The model is handed to ComfyUI's memory manager (so it can unload it).
    assert any(lm.model is blip.patcher for lm in mm.current_loaded_models)
    info = blip_nodes.ZeroConBLIPCaption.GET_NODE_INFO_V1()
    assert info["output"] == ["STRING"] and info["output_is_list"] == [False]


def test_blip_caption_empty_is_an_error(blip_nodes, model_dirs):
    tiny_clip.save_blip(model_dirs / "blip" / "tiny-empty", mode="empty")
    (blip,) = load_on_cpu(blip_nodes.ZeroConBLIPLoader, "tiny-empty")
    with pytest.raises(ValueError, match=r"empty caption for image 0 of 1.*min_new_tokens"):
        run_node(
            blip_nodes.ZeroConBLIPCaption,
            blip=blip,
            image=torch.rand(1, 32, 32, 3),
            prefix="a photography of",
            max_new_tokens=4,
            min_new_tokens=0,
            num_beams=1,
        )


# ---------------------------------------------------------------------------------------------------- directions


def test_sd1_direction_equals_sentence_by_sentence_encoding(dn, zdir, sd1_clip):
    direction = make_direction(dn, sd1_clip)
    assert isinstance(direction, zdir.EditDirection)
    assert direction.encoders == (("l", tiny_clip.CONTEXT_DIM),)
    assert direction.length == 77 and direction.pooled is None
    assert direction.extra["clip"] == "SD1ClipModel" and direction.extra["clip_keys"] == "l"
    src, _ = mean_one_by_one(sd1_clip, zdir.template_sentences("cat", TEMPLATE_N))
    tgt, _ = mean_one_by_one(sd1_clip, zdir.template_sentences("dog", TEMPLATE_N))
    torch.testing.assert_close(direction.delta.double(), tgt - src, atol=2e-5, rtol=1e-4)


def test_sdxl_direction_has_both_encoders_and_pooled_delta(dn, zdir, sdxl_clip):
    direction = make_direction(dn, sdxl_clip)
    assert direction.encoders == (("l", tiny_clip.SDXL_L_WIDTH), ("g", tiny_clip.SDXL_G_WIDTH))
    assert direction.pooled is not None and direction.pooled.shape == (tiny_clip.POOLED_DIM,)
    src, psrc = mean_one_by_one(sdxl_clip, zdir.template_sentences("cat", TEMPLATE_N))
    tgt, ptgt = mean_one_by_one(sdxl_clip, zdir.template_sentences("dog", TEMPLATE_N))
    torch.testing.assert_close(direction.delta.double(), tgt - src, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(direction.pooled.double(), ptgt - psrc, atol=2e-5, rtol=1e-4)
    assert direction.pooled.abs().max() > 0


def test_batched_pooled_path_is_used_and_matches_the_fallback(dn, sdxl_clip):
    sentences = ["a photo of a cat.", "a cat on the grass.", "a small (cat:1.2) in a house.", "cats."]
    fast = dn.ComfyClipEncoder(sdxl_clip)
    with torch.inference_mode():
        emb_fast, pooled_fast = fast(sentences)
    assert fast._fast_pooled is True
    slow = dn.ComfyClipEncoder(sdxl_clip)
    slow._fast_pooled = False
    with torch.inference_mode():
        emb_slow, pooled_slow = slow(sentences)
    assert emb_fast.shape == (4, 77, tiny_clip.CONTEXT_DIM) and pooled_fast.shape == (4, tiny_clip.POOLED_DIM)
    torch.testing.assert_close(emb_fast, emb_slow)
    torch.testing.assert_close(pooled_fast, pooled_slow, atol=1e-5, rtol=1e-4)


def test_user_sentences_prompt_difference_and_long_sentences(dn, zdir, sd1_clip, caplog):
    lists = make_direction(
        dn,
        sd1_clip,
        source_sentences="# comment\na cat.\n\na cat on grass.",
        target_sentences="a dog.\na dog on grass.",
    )
    assert (lists.num_source, lists.num_target) == (2, 2)
    src, _ = mean_one_by_one(sd1_clip, ["a cat.", "a cat on grass."])
    tgt, _ = mean_one_by_one(sd1_clip, ["a dog.", "a dog on grass."])
    torch.testing.assert_close(lists.delta.double(), tgt - src, atol=2e-5, rtol=1e-4)

    prompt = make_direction(
        dn, sd1_clip, mode="prompt difference", source="a photo of a cat", target="a photo of a dog"
    )
    assert prompt.mode == "prompt"
    a, _ = encode_one(sd1_clip, "a photo of a cat")
    b, _ = encode_one(sd1_clip, "a photo of a dog")
    torch.testing.assert_close(prompt.delta, (b - a)[0], atol=2e-5, rtol=1e-4)

    long = " ".join(["cat"] * 120)
    with caplog.at_level(logging.WARNING, logger="zerocon"):
        d = make_direction(dn, sd1_clip, source_sentences=long, target_sentences="dog")
    assert d.length == 77
    assert "cut to their first 77-token chunk" in caplog.text


def test_direction_input_errors(dn, sd1_clip):
    with pytest.raises(ValueError, match="prompt difference needs"):
        make_direction(dn, sd1_clip, mode="prompt difference", source=" ")
    with pytest.raises(ValueError, match="source word"):
        make_direction(dn, sd1_clip, source="")
    with pytest.raises(ValueError, match="clip input is None"):
        make_direction(dn, None)


# ---------------------------------------------------------------------------------------------------- apply


def caption_conditioning(clip, text="a photography of a cat on the grass"):
    import nodes as comfy_nodes

    with torch.inference_mode():
        (cond,) = comfy_nodes.CLIPTextEncode().encode(clip, text)
    cond[0][1]["some_other_key"] = "kept"
    return cond


def test_apply_strength_zero_leaves_conditioning_unchanged(dn, sdxl_clip):
    direction = make_direction(dn, sdxl_clip)
    cond = caption_conditioning(sdxl_clip)
    (out,) = run_node(dn.ZeroConApplyEditDirection, conditioning=cond, direction=direction, strength=0.0)
    assert len(out) == len(cond)
    assert torch.equal(out[0][0], cond[0][0])
    assert set(out[0][1]) == set(cond[0][1])
    assert torch.equal(out[0][1]["pooled_output"], cond[0][1]["pooled_output"])
    assert out[0][1]["some_other_key"] == "kept"


def test_apply_adds_delta_to_every_chunk_and_pooled(dn, sdxl_clip):
    direction = make_direction(dn, sdxl_clip)
    cond = caption_conditioning(sdxl_clip, " ".join(["a cat on the grass"] * 20))  # > 75 tokens: 2 chunks
    assert cond[0][0].shape[1] == 154
    (out,) = run_node(dn.ZeroConApplyEditDirection, conditioning=cond, direction=direction, strength=0.5)
    expect = cond[0][0] + 0.5 * direction.delta.repeat(2, 1)
    torch.testing.assert_close(out[0][0], expect)
    torch.testing.assert_close(out[0][1]["pooled_output"], cond[0][1]["pooled_output"] + 0.5 * direction.pooled)
    assert out[0][1]["some_other_key"] == "kept"
    assert not torch.equal(out[0][0], cond[0][0])  # and the input is left alone:
    assert out[0][0] is not cond[0][0]


def test_direction_from_a_different_clip_is_a_clear_error(dn, sd1_clip, sdxl_clip):
    other = tiny_clip.clip("sd1", seed=5, width=48)
    narrow = make_direction(dn, other, num_sentences=2)
    with pytest.raises(ValueError, match=r"made with a different CLIP \(SD1ClipModel\).*48 wide.*64 wide"):
        run_node(
            dn.ZeroConApplyEditDirection, conditioning=caption_conditioning(sd1_clip), direction=narrow, strength=1.0
        )
    # Same width, but an SDXL direction's pooled delta does not fit an SD1 conditioning's pooled output.
    xl = make_direction(dn, sdxl_clip, num_sentences=2)
    with pytest.raises(ValueError, match=r"different CLIP \(SDXLClipModel\).*pooled"):
        run_node(dn.ZeroConApplyEditDirection, conditioning=caption_conditioning(sd1_clip), direction=xl, strength=1.0)


# ---------------------------------------------------------------------------------------------------- save / load


def test_save_load_round_trip(dn, zdir, sdxl_clip, model_dirs):
    direction = make_direction(dn, sdxl_clip, num_sentences=2)
    (passed,) = run_node(dn.ZeroConSaveEditDirection, direction=direction, filename="sub/cat_to_dog", overwrite=True)
    assert passed is direction
    path = model_dirs / "edit_directions" / "sub" / "cat_to_dog.safetensors"
    assert path.is_file()

    options = dn.ZeroConLoadEditDirection.INPUT_TYPES()["required"]["name"][1]["options"]
    assert "sub/cat_to_dog.safetensors" in [o.replace(os.sep, "/") for o in options]
    fingerprint = dn.ZeroConLoadEditDirection.fingerprint_inputs(name="sub/cat_to_dog.safetensors")
    (loaded,) = run_node(dn.ZeroConLoadEditDirection, name="sub/cat_to_dog.safetensors")
    assert loaded.encoders == direction.encoders
    torch.testing.assert_close(loaded.delta, direction.delta)
    torch.testing.assert_close(loaded.pooled, direction.pooled)
    assert loaded.extra["clip"] == "SDXLClipModel"
    assert (loaded.source, loaded.target, loaded.mode) == ("cat", "dog", "sentences")

    with pytest.raises(FileExistsError, match="overwrite"):
        run_node(dn.ZeroConSaveEditDirection, direction=direction, filename="sub/cat_to_dog", overwrite=False)
    os.utime(path, ns=(1, 1))
    assert dn.ZeroConLoadEditDirection.fingerprint_inputs(name="sub/cat_to_dog.safetensors") != fingerprint
    for bad in ("../escape", "/tmp/abs", ""):
        with pytest.raises(ValueError):
            run_node(dn.ZeroConSaveEditDirection, direction=direction, filename=bad, overwrite=True)
    with pytest.raises(FileNotFoundError, match="no edit direction"):
        run_node(dn.ZeroConLoadEditDirection, name="missing.safetensors")
