"""Every example_workflows/*.json loads and runs in a real ComfyUI, driven through its real frontend in a real browser.

One session for the module (``tests/comfyui/browser/harness.py``):

1. A temp ComfyUI base directory (``--base-directory``: models, custom_nodes, input, output, user) with this
   repository symlinked as ``custom_nodes/ComfyUI-ZeroCon``; nothing is written into the ComfyUI checkout.
2. Model files: random-weight checkpoints that the stock *Load Checkpoint* detects as SD1.5 / SDXL
   (``browser/checkpoints.py``; built once and cached under the temp dir, keyed by a hash), tiny random
   BLIP / DINO / CLIP-metric folders under the names the loaders default to, a 96 x 80 input image.
3. ``main.py --cpu --listen 127.0.0.1 --port <free>``; Debian's Chromium, headless, through Playwright.
4. Per workflow: ``app.loadGraphData(file)``; no missing node types (the frontend's own list), no dialog, every
   combo value among its options, and the graph the frontend holds equals the file (no widget value dropped
   or changed). Then the speed knobs are turned down through the widgets (64 px, 2 steps, ...; see
   ``SPEED_OVERRIDES``), ``app.graphToPrompt()`` converts the graph and ``app.api.queuePrompt`` queues it;
   ``/history`` must report success with an output from every output node. Workflows with muted nodes
   (save a file, then load it) run a second time with those nodes on.
5. The template browser's list (``app.api.getWorkflowTemplates()``) has every workflow under the pack, and
   the missing-model paths tell the user which file goes in which folder.
6. The server and the browser are stopped in a ``finally``.

Skipped, loudly, without Chromium (``apt-get install -y chromium``) or the ``playwright`` package
(``pip install playwright`` in ComfyUI's environment; no browser download is used). The reason is also written
to ``$ZEROCON_REPORT_DIR/browser-workflows.txt``.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import pytest
from browser import harness

FILES = harness.workflow_files()
TIMEOUT = float(os.environ.get("ZEROCON_BROWSER_TIMEOUT", "1800"))
WHY_NOT = harness.unavailable()
_results: dict[str, str] = {}


def _report(text: str) -> None:
    sys.stderr.write(f"\n[browser e2e] {text}\n")
    out = os.environ.get("ZEROCON_REPORT_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out, "browser-workflows.txt"), "a") as f:
            f.write(text + "\n")


def _log(text: str) -> None:
    sys.stderr.write(f"[browser e2e] {text}\n")
    sys.stderr.flush()


needs_browser = pytest.mark.skipif(WHY_NOT is not None, reason=f"browser workflow tests SKIPPED: {WHY_NOT}")


@pytest.fixture(scope="module")
def session():
    from conftest import COMFYUI

    _report(
        f"RUNNING: {len(FILES)} workflows ({', '.join(f.stem for f in FILES)}) in ComfyUI {COMFYUI} "
        f"with {sys.executable} and {harness.find_chromium()}"
    )
    s = harness.start_session(COMFYUI, sys.executable, log=_log)
    failed = True
    try:
        yield s
        failed = any(v.startswith("FAILED") for v in _results.values())
    finally:
        harness.stop_session(s, failed, log=_log)
        _report("; ".join(f"{k}: {v}" for k, v in _results.items()) or "no results")


def test_skip_reason_is_reported():
    """Always runs (even when the rest is skipped) so the report says whether the browser tests ran."""
    if WHY_NOT is not None:
        _report(f"SKIPPED: {WHY_NOT}")


@needs_browser
@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_workflow_loads_and_runs(session, path):
    t0 = time.time()
    try:
        result = harness.run_workflow(session, path, TIMEOUT, log=_log)
    except BaseException:
        _results[path.stem] = f"FAILED after {time.time() - t0:.0f}s"
        raise
    if result.get("validated"):
        _results[path.stem] = f"loaded, converted and validated in {time.time() - t0:.0f}s (not queued)"
        return
    _results[path.stem] = "passed in " + " + ".join(f"{r['seconds']:.0f}s" for r in result["runs"])
    if path.stem == "direction_save_and_reuse":
        saved = session.base / "models" / "edit_directions" / "cat_to_dog.safetensors"
        assert saved.is_file(), f"the first run did not write {saved}"
    if path.stem == "compare_and_measure":
        texts = [t for r in result["runs"] for cls, t in r["texts"] if cls == "ZeroConEditMetrics"]
        assert len(texts) == 2 and all("CLIP score" in t and "structure distance" in t for t in texts), texts
        assert not any("n/a" in t for t in texts), f"a metric was not computed: {texts}"


@needs_browser
def test_template_browser_lists_every_workflow(session):
    """ComfyUI serves example_workflows/ to the template browser (the folder name app/custom_node_manager.py looks for first)."""
    templates = session.frontend.js("() => window.app.api.getWorkflowTemplates()")
    listed = sorted(templates.get(harness.pack_folder(), []))
    assert listed == sorted(f.stem for f in FILES), templates
    for f in FILES:
        served = session.server.get(f"/api/workflow_templates/{harness.pack_folder()}/{f.name}")
        assert served == json.loads(f.read_text()), f"{f.name} is served differently"
    _results["template browser"] = f"lists {len(listed)}"


def _first(workflow: dict, node_type: str) -> dict:
    return next(n for n in workflow["nodes"] if n["type"] == node_type)


@needs_browser
def test_missing_checkpoint_names_file_and_folder(session):
    """A workflow whose checkpoint is missing: the frontend's missing-models dialog says which file goes where."""
    path = harness.WORKFLOWS / "text_edit_sd15.json"
    wf = copy.deepcopy(json.loads(path.read_text()))
    ckpt = _first(wf, "CheckpointLoaderSimple")
    missing = "zerocon-missing-checkpoint.safetensors"
    ckpt["widgets_values"][0] = missing
    ckpt["properties"]["models"][0]["name"] = missing
    state = session.frontend.load(wf)
    dialogs = "\n".join(state["overlays"]["dialogs"])
    session.frontend.close_overlays()
    assert f"checkpoints / {missing}" in dialogs, f"no missing-model dialog naming the folder: {state['overlays']}"
    _results["missing checkpoint"] = "dialog names checkpoints/"


@needs_browser
def test_missing_blip_folder_error_names_folder_and_model(session):
    """A missing BLIP folder (offline): the run fails with a message naming the folder and the model to put there."""
    path = harness.WORKFLOWS / "text_edit_sd15.json"
    wf = json.loads(path.read_text())
    harness.check_loaded(session, wf, path.stem)
    harness.apply_speed_overrides(session)
    session.frontend.set_widgets(
        [{"type": "ZeroConBLIPLoader", "name": "model", "value": "blip-image-captioning-large"}]
    )
    res = session.frontend.queue()
    assert res["ok"] and not res["response"].get("node_errors"), res
    entry = session.server.wait_history(res["response"]["prompt_id"], timeout=600)
    errors = "\n".join(harness.history_errors(entry))
    folder = session.base / "models" / "blip" / "blip-image-captioning-large"
    assert str(folder) in errors and "Salesforce/blip-image-captioning-large" in errors, errors
    _results["missing BLIP folder"] = "error names the folder and the model"


@needs_browser
def test_missing_clip_metric_folder_names_the_right_model(session):
    """A missing CLIP-metric folder: the error names the folder and the model that belongs in it."""
    path = harness.WORKFLOWS / "compare_and_measure.json"
    wf = json.loads(path.read_text())
    harness.check_loaded(session, wf, path.stem)
    harness.apply_speed_overrides(session)
    session.frontend.set_widgets(
        [{"type": "ZeroConCLIPMetricLoader", "name": "model", "value": "clip-vit-base-patch16"}]
    )
    res = session.frontend.queue()
    assert res["ok"] and not res["response"].get("node_errors"), res
    entry = session.server.wait_history(res["response"]["prompt_id"], timeout=600)
    errors = "\n".join(harness.history_errors(entry))
    folder = session.base / "models" / "clip_metric" / "clip-vit-base-patch16"
    assert str(folder) in errors, errors
    assert "openai/clip-vit-base-patch16" in errors and "clip-vit-large-patch14" not in errors, errors
