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
   (save a file, then load it) run a second time with those nodes on. After each run, every ZeroCon node that
   returned a text result shows it on the node (web/zerocon_text.js), in a box labelled "result", on the classic
   canvas and, where the frontend offers it (1.49: Settings > "Modern Node Design (Nodes 2.0)"), under the Vue
   renderer. ``ZEROCON_BROWSER_SCREENSHOTS=1`` saves a picture of each such node per renderer in the temp base
   (kept with ``ZEROCON_KEEP_BROWSER_BASE=1``).
5. No two nodes overlap, on every renderer (under Vue: the nodes' elements in the DOM), as loaded and with the
   text results a run adds.
6. The template browser's list (``app.api.getWorkflowTemplates()``) has every workflow under the pack, and
   a missing checkpoint is reported with its file and folder (frontend 1.27: the missing-models dialog; 1.49:
   a notification whose "View details" lists the missing model with its folder).
7. The server and the browser are stopped in a ``finally``.

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
    shown_on = sorted({r for run in result["runs"] for r in run["shown"] if r != "nodes"})
    n_shown = len({n for run in result["runs"] for n in run["shown"]["nodes"]})
    _results[path.stem] = "passed in " + " + ".join(f"{r['seconds']:.0f}s" for r in result["runs"])
    _results[path.stem] += f", {n_shown} text results shown on {' and '.join(shown_on) or 'no renderer'}"
    if path.stem == "direction_save_and_reuse":
        saved = session.base / "models" / "edit_directions" / "cat_to_dog.safetensors"
        assert saved.is_file(), f"the first run did not write {saved}"
    if path.stem == "compare_and_measure":
        texts = [t for r in result["runs"] for cls, t in r["texts"] if cls == "ZeroConEditMetrics"]
        assert len(texts) == 2 and all("CLIP score" in t and "structure distance" in t for t in texts), texts
        assert not any("n/a" in t for t in texts), f"a metric was not computed: {texts}"


@needs_browser
@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_nodes_do_not_overlap(session, path):
    """No node covers another one, on every renderer (Vue "Nodes 2.0": from the DOM), before and after a run."""
    checked = harness.check_no_overlaps(session, json.loads(path.read_text()), path.stem)
    _results[f"{path.stem} layout"] = "no overlaps (" + ", ".join(checked) + ")"


@needs_browser
def test_frontend_script_uses_only_the_public_api(session):
    """Loading the page gives no notice that an extension imported an internal or deprecated frontend module."""
    notices = [m for m in session.frontend.console if "internal module" in m or "deprecated legacy API" in m]
    notices += [m for m in session.frontend.console if "[ComfyUI Deprecated] Importing" in m]
    assert not notices, notices


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
    """A workflow whose checkpoint is missing: the frontend says which file goes in which folder. Frontend 1.27
    opens its missing-models dialog ("checkpoints / <file>"); 1.49 shows a notification "<file> is missing" /
    "<node> is missing a required model file." whose "View details" opens the workflow's error panel listing the
    missing model with its folder (and a Download button from the node's models url)."""
    path = harness.WORKFLOWS / "text_edit_sd15.json"
    wf = copy.deepcopy(json.loads(path.read_text()))
    ckpt = _first(wf, "CheckpointLoaderSimple")
    missing = "zerocon-missing-checkpoint.safetensors"
    ckpt["widgets_values"][0] = missing
    ckpt["properties"]["models"][0]["name"] = missing
    fe = session.frontend
    fe.reload()
    try:
        state = fe.load(wf)
        dialogs = "\n".join(state["overlays"]["dialogs"])
        toasts = [t for t in state["overlays"]["toasts"] if missing in t]
        if dialogs:
            assert f"checkpoints / {missing}" in dialogs, (
                f"the missing-model dialog does not name the folder: {dialogs}"
            )
            _results["missing checkpoint"] = "dialog names checkpoints/"
            return
        assert toasts, f"neither a missing-model dialog nor a notification naming {missing}: {state['overlays']}"
        assert f"{missing} is missing" in toasts[0] and "is missing a required model file" in toasts[0], toasts
        fe.page.get_by_role("button", name="View details").first.click()
        details = None
        for _ in range(50):
            details = fe.text_around([missing, "checkpoints", "Missing Models"])
            if details:
                break
            time.sleep(0.1)
        assert details, f"'View details' shows no panel naming {missing} and its folder checkpoints"
        _results["missing checkpoint"] = "notification; its details name the file and checkpoints/: " + " | ".join(
            ln.strip() for ln in details.splitlines() if ln.strip()
        )
    finally:
        fe.reload()


def _run_with_a_missing_folder(session, workflow: str, loader: str, models_dir: str, name: str):
    """Load ``workflow``, point ``loader``'s model at ``name`` (absent), queue it: (the run's errors, the folder
    models/<models_dir>/<name>)."""
    path = harness.WORKFLOWS / f"{workflow}.json"
    wf = json.loads(path.read_text())
    harness.check_loaded(session, wf, path.stem)
    harness.apply_speed_overrides(session)
    session.frontend.set_widgets([{"type": loader, "name": "model", "value": name}])
    res = session.frontend.queue()
    assert res["ok"] and not res["response"].get("node_errors"), res
    entry = session.server.wait_history(res["response"]["prompt_id"], timeout=600)
    return "\n".join(harness.history_errors(entry)), session.base / "models" / models_dir / name


@needs_browser
def test_missing_blip_folder_error_names_folder_and_model(session):
    """A missing BLIP folder (offline): the run fails with a message naming the folder and the model to put there."""
    errors, folder = _run_with_a_missing_folder(
        session, "text_edit_sd15", "ZeroConBLIPLoader", "blip", "blip-image-captioning-large"
    )
    assert str(folder) in errors and "Salesforce/blip-image-captioning-large" in errors, errors
    _results["missing BLIP folder"] = "error names the folder and the model"


@needs_browser
def test_missing_clip_metric_folder_names_the_right_model(session):
    """A missing CLIP-metric folder: the error names the folder and the model that belongs in it."""
    errors, folder = _run_with_a_missing_folder(
        session, "compare_and_measure", "ZeroConCLIPMetricLoader", "clip_metric", "clip-vit-base-patch16"
    )
    assert str(folder) in errors, errors
    assert "openai/clip-vit-base-patch16" in errors and "clip-vit-large-patch14" not in errors, errors
