"""The shipped edit workflows (SD1.5, SDXL, SD3.5, Flux; DiffuseIT on Flux), exactly as a user opens them, run
through ComfyUI's executor with tiny models.

``workflow_api.to_api`` converts the UI-format file as the frontend's ``graphToPrompt`` does; the model loaders are
swapped for the test-only tiny checkpoint of the same family, Load Image for a seeded test image, the image
savers for capture nodes; the speed knobs are turned down by the browser test's own ``harness.SPEED_OVERRIDES``. Everything else (our nodes,
their widget values, the links) is the file's. The browser test (test_browser_workflows.py) runs the same files
in the real frontend on random-weight checkpoints the stock loaders detect; for the workflows it cannot execute
there (see ``harness.VALIDATE_ONLY``) this is the run.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import workflow_api
from browser import harness
from conftest import REPO
from test_graph import execute_in_process, executor_env  # noqa: F401  (the fixture)

WORKFLOWS = REPO / "example_workflows"
#: workflow -> tiny checkpoint kind (the family its loaders load)
FAMILIES = {
    "text_edit_sd15": "sd15",
    "text_edit_sdxl": "sdxl",
    "text_edit_sd35": "sd3",
    "text_edit_flux": "flux_dev",
    "diffuseit_text_guided_flux": "flux_dev",
}
#: the summary output's slot on each guided sampler
SUMMARY_SLOT = {"ZeroConGuidedSampler": 3, "ZeroConDiffuseITSampler": 2}
LOADERS = {  # class -> {old output slot: TinyCheckpoint slot (MODEL 0, CLIP 1, VAE 2)}
    "CheckpointLoaderSimple": {0: 0, 1: 1, 2: 2},
    "UNETLoader": {0: 0},
    "DualCLIPLoader": {0: 1},
    "CLIPLoader": {0: 1},
    "TripleCLIPLoader": {0: 1},
    "VAELoader": {0: 2},
}


def tiny_prompt(name: str, kind: str) -> dict:
    prompt = workflow_api.to_api(json.loads((WORKFLOWS / f"{name}.json").read_text()))
    for cls, slots in LOADERS.items():
        workflow_api.swap(prompt, cls, "ZeroConTest_TinyCheckpoint", {"kind": kind, "seed": 0}, slots)
    workflow_api.swap(prompt, "LoadImage", "ZeroConTest_Image", {"width": 80, "height": 72, "batch_size": 1, "seed": 1})
    for saver in ("SaveImage", "PreviewImage"):
        for key, node in prompt.items():
            if node["class_type"] == saver:
                prompt[key] = {
                    "class_type": "ZeroConTest_Capture",
                    "inputs": {"value": node["inputs"]["images"], "key": key},
                }
    for key in [k for k, v in prompt.items() if v["class_type"] in SUMMARY_SLOT]:
        slot = SUMMARY_SLOT[prompt[key]["class_type"]]
        prompt[f"summary_{key}"] = {
            "class_type": "ZeroConTest_Capture",
            "inputs": {"value": [key, slot], "key": "summary"},
        }
    workflow_api.set_widgets(prompt, "model", "tiny-blip", ["ZeroConBLIPLoader"], only_if_larger=False)
    workflow_api.set_widgets(prompt, "model", "tiny-dino", ["ZeroConDINOLoader"], only_if_larger=False)
    workflow_api.set_widgets(prompt, "allow_download", False, ["ZeroConDINOLoader"], only_if_larger=False)
    for widget, value, types in harness.SPEED_OVERRIDES:
        workflow_api.set_widgets(prompt, widget, value, types)
    return prompt


@pytest.fixture(scope="module")
def extras(executor_env, tmp_path_factory):  # noqa: F811
    """ComfyUI's comfy_extras nodes (PreviewAny, FluxGuidance, ...) registered, as a server start does, and a tiny
    DINO in a temporary models/dino (restored afterwards)."""
    import asyncio
    import copy

    import folder_paths
    from test_metrics_node import save_tiny_dino

    import nodes as comfy_nodes

    if "PreviewAny" not in comfy_nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(comfy_nodes.init_builtin_extra_nodes())
    dino = tmp_path_factory.mktemp("models") / "dino"
    save_tiny_dino(dino / "tiny-dino")
    saved = copy.deepcopy(folder_paths.folder_names_and_paths["dino"])
    folder_paths.add_model_folder_path("dino", str(dino), is_default=True)
    yield executor_env
    folder_paths.folder_names_and_paths["dino"] = saved


def test_conversion_maps_widgets_by_position(extras):
    """The converter puts each saved value on its input (a shifted mapping would put 'cat' on 'mode', etc.)."""
    prompt = workflow_api.to_api(json.loads((WORKFLOWS / "text_edit_sd15.json").read_text()))
    by_type = {v["class_type"]: v["inputs"] for v in prompt.values()}
    assert by_type["ZeroConEditDirection"]["source"] == "cat" and by_type["ZeroConEditDirection"]["target"] == "dog"
    assert by_type["ZeroConDDIMInversion"]["steps"] == 50 and by_type["ZeroConDDIMInversion"]["convention"] == "current"
    assert isinstance(by_type["ZeroConGuidedSampler"]["model"], list)  # a link, not a widget
    assert not any(v["class_type"] in workflow_api.FRONTEND_ONLY for v in prompt.values())


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_shipped_workflow_runs_in_the_executor(extras, name):
    captured = extras
    captured.clear()
    prompt = tiny_prompt(name, FAMILIES[name])
    execute_in_process(prompt)
    images = [v for k, v in captured.items() if isinstance(v, torch.Tensor) and v.ndim == 4]
    assert len(images) >= (1 if name.startswith("diffuseit") else 2), sorted(captured)
    for img in images:
        assert img.shape[-1] == 3 and torch.isfinite(img).all()
    # the guidance chain really ran at every step it was meant to (cross-attention + PatchNCE, on the DiTs through the
    # joint attention; DiffuseIT's DINO terms through the 16-channel VAE)
    assert re.search(r"guidance applied at (\d+)/\1 steps", captured["summary"]), captured["summary"]
