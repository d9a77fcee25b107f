"""A batch through BLIP: N images give one STRING of N caption lines, ZeroCon Encode Prompts makes one CONDITIONING
of batch N (row i = CLIP Text Encode of caption i), and the graph after it runs once: N edits, not N x N."""

from __future__ import annotations

import pytest
import tiny_clip
import torch
from conftest import pack_fixture, pack_module, run_node
from test_graph import build_graph, execute_in_process, executor_env  # noqa: F401  (fixture + helpers)

pn = pack_fixture("nodes.classes.prompt_nodes")


def clip_text_encode(clip, text):
    import nodes as comfy_nodes

    with torch.inference_mode():
        return comfy_nodes.CLIPTextEncode().encode(clip, text)[0]


def test_one_line_is_clip_text_encode(pn):
    clip = tiny_clip.clip("sdxl", seed=4)
    (ours,) = run_node(pn.ZeroConEncodePrompts, clip=clip, text="a cat on the grass")
    (ref,) = (clip_text_encode(clip, "a cat on the grass"),)
    assert len(ours) == len(ref) == 1
    assert torch.equal(ours[0][0], ref[0][0]) and torch.equal(ours[0][1]["pooled_output"], ref[0][1]["pooled_output"])


def test_one_row_per_line_in_order(pn):
    clip = tiny_clip.clip("sdxl", seed=4)
    lines = ["a cat on the grass", "a red car", "a dog by the sea"]
    (ours,) = run_node(pn.ZeroConEncodePrompts, clip=clip, text="\n".join([lines[0], "", lines[1], "  ", lines[2]]))
    assert len(ours) == 1
    cond, extra = ours[0]
    assert cond.shape[0] == 3 and extra["pooled_output"].shape[0] == 3
    for i, line in enumerate(lines):
        (ref,) = clip_text_encode(clip, line)
        torch.testing.assert_close(cond[i : i + 1], ref[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(extra["pooled_output"][i : i + 1], ref[1]["pooled_output"], rtol=0, atol=1e-6)


def test_prompts_of_different_lengths_are_repeated_to_a_common_length(pn):
    clip = tiny_clip.clip("sd1", seed=3)
    long = " ".join(["cat"] * 100)  # more than 75 tokens: two 77-token chunks
    (ours,) = run_node(pn.ZeroConEncodePrompts, clip=clip, text=f"a dog\n{long}")
    cond = ours[0][0]
    (short_ref,) = clip_text_encode(clip, "a dog")
    (long_ref,) = clip_text_encode(clip, long)
    assert long_ref[0].shape[1] == 154 and cond.shape[:2] == (2, 154)
    torch.testing.assert_close(cond[0:1], short_ref[0].repeat(1, 2, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(cond[1:2], long_ref[0], rtol=0, atol=1e-6)


def test_bad_inputs(pn):
    with pytest.raises(ValueError, match="ZeroCon Encode Prompts: the text is empty; give one prompt per line"):
        run_node(pn.ZeroConEncodePrompts, clip=tiny_clip.clip("sd1", seed=3), text=" \n \n")
    with pytest.raises(ValueError, match="ZeroCon Encode Prompts: the clip input is None"):
        run_node(pn.ZeroConEncodePrompts, clip=None, text="a cat")


def test_metrics_take_one_text_per_line(monkeypatch):
    mn = pack_module("nodes.classes.metrics_nodes")
    seen = {}

    def fake_edit_metrics(source, edited, source_text, target_text, **kwargs):
        seen.update(source_text=source_text, target_text=target_text)
        keys = ("clip_score", "clip_accuracy", "structure_distance", "bg_psnr", "bg_ssim", "bg_mse")
        return {k: torch.zeros(2) for k in keys}

    monkeypatch.setattr(mn.metrics, "edit_metrics", fake_edit_metrics)
    monkeypatch.setattr(mn, "summary_text", lambda values, masked: "")
    monkeypatch.setattr(mn, "_mean", lambda v: 0.0)
    images = torch.rand(2, 16, 16, 3)
    run_node(
        mn.ZeroConEditMetrics, source_image=images, edited_image=images, source_text="a cat\na car", target_text="a dog"
    )
    assert seen == {"source_text": ["a cat", "a car"], "target_text": "a dog"}


def test_two_images_through_blip_run_the_graph_once_with_batch_2(executor_env):  # noqa: F811
    captured = executor_env
    captured.clear()
    prompt = build_graph("sd15")
    prompt["image"]["inputs"]["batch_size"] = 2
    prompt["source"] = {"class_type": "ZeroConEncodePrompts", "inputs": {"text": ["caption", 0], "clip": ["ckpt", 1]}}
    prompt["cap_cond"] = {"class_type": "ZeroConTest_Capture", "inputs": {"value": ["source", 0], "key": "cond"}}
    execute_in_process(prompt)

    caption = captured["caption"]
    assert isinstance(caption, str), "the caption node gave a list: the graph after it ran once per caption"
    lines = caption.split("\n")
    assert len(lines) == 2 and all(line.strip() for line in lines)
    cond = captured["cond"]
    assert isinstance(cond, list) and len(cond) == 1 and cond[0][0].shape[0] == 2  # one CONDITIONING, 2 rows
    for key in ("edit", "reconstruction", "x_t"):
        value = captured[key]
        value = value["samples"] if isinstance(value, dict) else value  # x_t is a LATENT
        assert isinstance(value, torch.Tensor), f"{key}: the sampler ran more than once ({type(value).__name__})"
        assert value.shape[0] == 2, f"{key}: batch {value.shape[0]}, expected 2 (one edit per image)"
