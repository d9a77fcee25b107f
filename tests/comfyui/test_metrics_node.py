"""ZeroCon Edit Metrics, CLIP Metric Loader and DINO Loader inside ComfyUI (tiny random models, no hub).

The node must give exactly what ``zerocon_core.evaluation.metrics.edit_metrics`` gives on the same pixels (batch
means), take ComfyUI's IMAGE / MASK layouts, and its loaders must find, refuse or (fake-)download models
the way the BLIP loader does.
"""

from __future__ import annotations

import logging
import math
import os

import pytest
import torch
from conftest import (
    core_helper,
    forbid_downloads,
    load_on_cpu,
    pack_fixture,
    pack_module,
    run_node,
    temporary_model_folders,
)


def save_tiny_clip(folder: str | os.PathLike, seed: int = 0) -> str:
    """The core tests' tiny random CLIPModel (32 px images, character-level tokenizer, preprocessor config), saved."""
    with torch.inference_mode(False):
        return str(core_helper("tiny_vision").tiny_clip_metric_folder(folder, seed))


def save_tiny_dino(folder: str | os.PathLike, seed: int = 0) -> str:
    """The core tests' tiny random ViT in DINO ViT-B/8's layout (patch 8, 224 px, 32 wide, 2 blocks), saved."""
    with torch.inference_mode(False):
        return str(core_helper("tiny_vision").tiny_dino_folder(folder, seed))


mn = pack_fixture("nodes.classes.metrics_nodes")
vn = pack_fixture("nodes.classes.dino_nodes")
zm = pack_fixture("zerocon_core.evaluation.metrics")


@pytest.fixture
def model_dirs(tmp_path, monkeypatch, mn):
    """Temporary models/dino and models/clip_metric, first in ComfyUI's search order; no hub access."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    forbid_downloads(monkeypatch)
    with temporary_model_folders(tmp_path, ("dino", mn.CLIP_METRIC)):
        yield tmp_path


@pytest.fixture
def loaded(model_dirs, mn, vn):
    save_tiny_clip(model_dirs / mn.CLIP_METRIC / "tiny-clip")
    save_tiny_dino(model_dirs / "dino" / "tiny-dino")
    (clip,) = load_on_cpu(mn.ZeroConCLIPMetricLoader, "tiny-clip")
    (dino,) = load_on_cpu(vn.ZeroConDINOLoader, "tiny-dino")
    return clip, dino


def comfy_image(seed: int, b: int = 1, h: int = 32, w: int = 32) -> torch.Tensor:
    """A ComfyUI IMAGE (B, H, W, 3) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, w, 3, generator=g)


# ---------------------------------------------------------------------------------------------------------


def test_schemas_have_tooltips_prefixed_ids_and_category(mn, vn):
    for node in mn.NODES + vn.NODES:
        schema = node.GET_SCHEMA()
        assert schema.node_id.startswith("ZeroCon") and schema.category == "image/translation/zerocon"
        for inp in schema.inputs:
            assert inp.tooltip, f"{schema.node_id}.{inp.id} has no tooltip"
        for out in schema.outputs:
            assert out.tooltip, f"{schema.node_id} output {out.id} has no tooltip"
    ids = {n.GET_SCHEMA().node_id for n in mn.NODES + vn.NODES}
    assert ids == {"ZeroConEditMetrics", "ZeroConCLIPMetricLoader", "ZeroConDINOLoader"}


def _edit_metrics(mn, source, edited, source_text="", target_text="", **optional):
    """The Edit Metrics node's outputs on these images and texts (``optional``: mask, clip_metric, dino)."""
    return run_node(
        mn.ZeroConEditMetrics,
        source_image=source,
        edited_image=edited,
        source_text=source_text,
        target_text=target_text,
        **optional,
    )


def test_metrics_node_matches_core(loaded, mn, zm):
    clip, dino = loaded
    src, edt = comfy_image(0, 2), comfy_image(1, 2)
    out = _edit_metrics(mn, src, edt, "a photo of a cat", "a photo of a dog", clip_metric=clip, dino=dino)
    assert len(out) == 7 and isinstance(out[-1], str)
    want = zm.edit_metrics(
        src.permute(0, 3, 1, 2),
        edt.permute(0, 3, 1, 2),
        "a photo of a cat",
        "a photo of a dog",
        clip=clip.model,
        dino=dino.model,
    )
    names = ("clip_score", "clip_accuracy", "structure_distance", "bg_psnr", "bg_ssim", "bg_mse")
    for name, got in zip(names, out[:6]):
        assert isinstance(got, float)
        assert got == pytest.approx(float(want[name].double().mean()), rel=1e-6), name
    assert "CLIP accuracy" in out[-1] and "structure distance" in out[-1]


def test_identical_images_and_mask(loaded, mn):
    clip, dino = loaded
    src = comfy_image(2)
    edt = src.clone()
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 8:24] = 1.0
    edt[:, 8:24, 8:24, :] = 1.0 - edt[:, 8:24, 8:24, :]  # the edit stays inside the mask
    _, _, sd, psnr, ssim, mse, text = _edit_metrics(mn, src, edt, "a", "b", mask=mask, dino=dino)
    assert psnr == math.inf and mse == 0.0 and 0.0 < ssim < 1.0 and sd > 0
    assert "background (mask == 0)" in text
    same = _edit_metrics(mn, src, src, "a", "b", clip_metric=clip, dino=dino)
    assert same[2] == 0.0 and same[3] == math.inf and same[4] == pytest.approx(1.0) and same[5] == 0.0


def test_without_models_clip_and_structure_are_nan(mn):
    out = _edit_metrics(mn, comfy_image(0), comfy_image(1))
    assert math.isnan(out[0]) and math.isnan(out[1]) and math.isnan(out[2])
    assert math.isfinite(out[3]) and math.isfinite(out[4])
    assert "n/a (connect a ZeroCon CLIP Metric Loader)" in out[-1] and "n/a (connect a ZeroCon DINO Loader)" in out[-1]


def test_bad_inputs(mn, caplog):
    with pytest.raises(ValueError, match="mask is 16x16 but the source image is 32x32"):
        _edit_metrics(mn, comfy_image(0), comfy_image(1), mask=torch.zeros(1, 16, 16))
    with caplog.at_level(logging.WARNING, logger="zerocon"):
        out = _edit_metrics(mn, comfy_image(0), comfy_image(1, h=64, w=64))
    assert "resizing the edited image" in caplog.text and math.isfinite(out[3])
    with pytest.raises(ValueError, match="batch sizes differ"):
        _edit_metrics(mn, comfy_image(0, 2), comfy_image(1, 3))


def test_loaders_missing_folder_name_folder_and_model_id(mn, vn, model_dirs):
    with pytest.raises(FileNotFoundError) as err:
        load_on_cpu(vn.ZeroConDINOLoader, "dino-vitb8", allow_download=True)
    msg = str(err.value)
    assert str(model_dirs / "dino" / "dino-vitb8") in msg and "facebook/dino-vitb8" in msg and "HF_HUB_OFFLINE" in msg
    with pytest.raises(FileNotFoundError) as err:
        load_on_cpu(mn.ZeroConCLIPMetricLoader, "clip-vit-large-patch14")
    msg = str(err.value)
    assert str(model_dirs / "clip_metric" / "clip-vit-large-patch14") in msg
    assert "openai/clip-vit-large-patch14" in msg and "allow_download is off" in msg
    with pytest.raises(ValueError, match="not a folder name"):
        load_on_cpu(vn.ZeroConDINOLoader, "../x")


def test_dino_loader_downloads_once_when_allowed_and_online(vn, model_dirs, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, local_dir, **kwargs):
        calls.append((repo_id, local_dir))
        save_tiny_dino(local_dir)
        return local_dir

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(pack_module("nodes.glue.loaders"), "hub_offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    for _ in range(2):
        (dino,) = load_on_cpu(vn.ZeroConDINOLoader, "dino-vitb8", allow_download=True)
    assert calls == [("facebook/dino-vitb8", str(model_dirs / "dino" / "dino-vitb8"))]
    assert dino.name == "dino-vitb8"


def test_local_model_folders_are_listed(mn, vn, model_dirs):
    save_tiny_dino(model_dirs / "dino" / "my-dino")
    names = pack_module("nodes.glue.loaders").model_names(vn.SOURCE)
    assert names[0] == "dino-vitb8" and "my-dino" in names
