"""The helper models (BLIP, DINO, CLIP metric) are models ComfyUI's memory manager knows: each loader wraps
the very module the nodes run in a ``ModelPatcher``, using it loads it through ``load_models_gpu``, and
``free_memory`` (what ``load_models_gpu`` calls when the diffusion model needs the room) or
``unload_all_models`` evicts it; the next use loads it again and gives the same result."""

from __future__ import annotations

import comfy.model_management as mm
import pytest
import torch
from conftest import core_helper, forbid_downloads, pack_module, run_node, temporary_model_folders


def _loaded(patcher) -> bool:
    return any(m is patcher for m in mm.loaded_models())


@pytest.fixture
def helpers(tmp_path, monkeypatch):
    """name -> (ZeroConModel from the pack's loader node, the module the nodes run, a function using it)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    forbid_downloads(monkeypatch)
    blip_nodes, dino_nodes, metrics_nodes = (
        pack_module(f"nodes.{n}") for n in ("blip_nodes", "dino_nodes", "metrics_nodes")
    )
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    with temporary_model_folders(tmp_path, ("blip", "dino", metrics_nodes.CLIP_METRIC)):
        with torch.inference_mode(False):
            core_helper("tiny_text").tiny_blip_folder(tmp_path / "blip" / "tiny-blip")
            core_helper("tiny_vision").tiny_dino_folder(tmp_path / "dino" / "tiny-dino")
            core_helper("tiny_vision").tiny_clip_metric_folder(tmp_path / metrics_nodes.CLIP_METRIC / "tiny-clip")
        common = dict(precision="fp32", device="auto", allow_download=False)
        (blip,) = run_node(blip_nodes.ZeroConBLIPLoader, model="tiny-blip", **common)
        (dino,) = run_node(dino_nodes.ZeroConDINOLoader, model="tiny-dino", **common)
        (clip,) = run_node(metrics_nodes.ZeroConCLIPMetricLoader, model="tiny-clip", **common)

        def caption():
            kw = dict(prefix="a photography of", max_new_tokens=5, min_new_tokens=1, num_beams=1)
            return run_node(blip_nodes.ZeroConBLIPCaption, blip=blip, image=image, **kw)[0]

        def metrics():
            kw = dict(source_text="a cat", target_text="a dog", clip_metric=clip, dino=dino)
            return run_node(metrics_nodes.ZeroConEditMetrics, source_image=image, edited_image=1 - image, **kw)[:3]

        yield {
            "blip": (blip, blip.model.model, caption),
            "dino": (dino, dino.model, metrics),
            "clip": (clip, clip.model.model, metrics),
        }
    mm.unload_all_models()


@pytest.mark.parametrize("evict", ["free_memory", "unload_all_models"])
def test_memory_manager_evicts_the_helpers(helpers, evict):
    mm.unload_all_models()
    first = {name: use() for name, (_, _, use) in helpers.items()}
    for name, (value, module, _) in helpers.items():
        patcher = value.patcher
        assert patcher.model.inner is module, f"{name}: the patcher manages a different module than the nodes run"
        assert patcher.load_device == mm.get_torch_device()
        assert _loaded(patcher), f"{name} was used without being loaded through ComfyUI's memory manager"

    if evict == "free_memory":
        mm.free_memory(1e30, mm.get_torch_device())  # room for a model larger than any device
    else:
        mm.unload_all_models()
    for name, (value, _, _) in helpers.items():
        assert not _loaded(value.patcher), f"{name} survived {evict}"

    for name, (value, _, use) in helpers.items():
        assert use() == first[name]  # loaded again on use, same output
        assert _loaded(value.patcher)
