"""The browser end-to-end session: temp ComfyUI + models + headless Chromium, and one workflow run.

Used by ``tests/comfyui/test_browser_workflows.py``; the steps are plain functions so a failing step says
which one failed.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import checkpoints
from .comfy_server import PACK_FOLDER, ComfyServer, history_errors, make_base
from .frontend import Frontend, find_chromium, playwright_available
from .model_files import prepare, write_input_image
from .roundtrip import graph_differences
from .workflow_specs import SAMPLE_RESULT, TEXT_RESULT_TYPES

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/comfyui: workflow_api
import workflow_api  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
WORKFLOWS = REPO / "example_workflows"

# Speed knobs the test turns down through the frontend's widgets (like a user editing them) before queueing:
# the files keep their real defaults (512 px, 50 steps, 300 sentences...). (widget name, value, node types or
# None for any node); only values larger than the test value are lowered. Extend for new nodes.
SPEED_OVERRIDES = [
    ("width", 64, None),
    ("height", 64, None),
    ("steps", 2, None),
    ("num_sentences", 3, None),
    ("batch_size", 8, ("ZeroConEditDirection",)),
    ("reg_outer", 1, None),
    ("reg_rolls", 1, None),
    ("patches", 16, None),
    ("max_new_tokens", 4, None),
    ("resample", 1, None),  # DiffuseIT's resampling repeats
    ("dino_size", 64, ("ZeroConDinoStructureGuidance", "ZeroConDinoStyleGuidance")),  # DINO's input size (224)
]

# Frontend-only node types (never sent to the server).
VIRTUAL_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}

# Workflows the test loads, converts and validates in the frontend but does not queue, and why (the executor test
# tests/comfyui/test_workflow_executor.py runs the same graph with tiny models instead).
_T5_COST = (
    "Flux's text encoder is T5-XXL at full size: a random fp8 copy is 4.7 GB and each prompt encode takes about 90 s "
    "on 2 CPU cores, several minutes per run"
)
VALIDATE_ONLY = {"text_edit_flux": _T5_COST, "diffuseit_text_guided_flux": _T5_COST}

# Workflows that need a second run with other nodes active (a file saved by the first run is loaded by the
# second): the nodes muted in the file are switched on, these types are muted, combos are refreshed.
SECOND_RUN_MUTE = {"direction_save_and_reuse": ("ZeroConEditDirection", "ZeroConSaveEditDirection")}


def workflow_files() -> list[Path]:
    return sorted(p for p in WORKFLOWS.glob("*.json"))


def unavailable() -> str | None:
    """Why the browser tests cannot run here (None when they can)."""
    if not find_chromium():
        return "no Chromium (apt-get install -y chromium, or set ZEROCON_CHROMIUM)"
    why = playwright_available()
    if why:
        return why
    if not workflow_files():
        return f"no workflow files in {WORKFLOWS}"
    return None


#: Stock loader nodes whose file-name widgets select the model files the test must provide.
LOADER_TYPES = ("CheckpointLoaderSimple", "UNETLoader", "VAELoader", "CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader")


def checkpoint_kinds(files) -> list[str]:
    """Which random model files the workflows need (by the file names their loaders select)."""
    names = set()
    for f in files:
        for node in json.loads(Path(f).read_text()).get("nodes", []):
            if node.get("type") in LOADER_TYPES:
                names.update(v for v in node.get("widgets_values") or [] if str(v).endswith(".safetensors"))
    by_name = {v: k for k, v in checkpoints.FILE_NAMES.items()}
    by_name.update({name: "flux" for name in checkpoints.FLUX_FILES})
    unknown = sorted(n for n in names if n not in by_name)
    if unknown:
        raise RuntimeError(
            f"the workflows load checkpoints the test cannot build: {unknown}; use one of "
            f"{sorted(by_name)} (tests/comfyui/browser/checkpoints.py)"
        )
    return sorted(by_name[n] for n in names)


@dataclass
class Session:
    comfyui: Path
    python: str
    base: Path
    server: ComfyServer
    frontend: Frontend
    object_info: dict
    keep: bool = False
    timings: dict = field(default_factory=dict)

    def output_nodes(self) -> set[str]:
        return {k for k, v in self.object_info.items() if v.get("output_node")}


def start_session(comfyui: Path, python: str, log=print) -> Session:
    t0 = time.time()
    base = make_base(Path(tempfile.mkdtemp(prefix="zerocon-browser-")), REPO)
    server = None
    try:
        kinds = checkpoint_kinds(workflow_files())
        used = prepare(base, comfyui, python, kinds=kinds, log=log)
        write_input_image(base)
        t_models = time.time() - t0
        server = ComfyServer(comfyui, python, base).start()
        t_server = time.time() - t0 - t_models
        info = server.get("/object_info", timeout=120)
        fe = Frontend(server.url, log_path=base / "browser.log")
        try:
            fe.open()
        except BaseException:
            fe.close()
            raise
        log(
            f"models {t_models:.0f}s ({', '.join(sorted(used))}); server {t_server:.0f}s at {server.url}; "
            f"frontend ready after {time.time() - t0:.0f}s; base {base}"
        )
        return Session(comfyui, python, base, server, fe, info, timings={"setup": time.time() - t0})
    except BaseException:
        if server is not None:
            log("--- ComfyUI log tail ---\n" + server.log_tail())
            server.stop()
        shutil.rmtree(base, ignore_errors=True)
        raise


def stop_session(s: Session, failed: bool, log=print) -> None:
    try:
        s.frontend.close()
    finally:
        s.server.stop()
        if failed or s.keep or os.environ.get("ZEROCON_KEEP_BROWSER_BASE"):
            log(f"kept the temp ComfyUI base (server log, browser console): {s.base}")
        else:
            shutil.rmtree(s.base, ignore_errors=True)


def check_loaded(s: Session, workflow: dict, name: str) -> dict:
    """Load through app.loadGraphData; raise AssertionError on missing nodes, dialogs, invalid or changed widgets."""
    types = {n["type"] for n in workflow["nodes"]}
    registered = set(s.frontend.js("() => Object.keys(LiteGraph.registered_node_types)"))
    not_registered = sorted(types - registered)
    errors_before = len(s.frontend.page_errors)
    state = s.frontend.load(workflow)
    problems = []
    new_errors = s.frontend.page_errors[errors_before:]
    if new_errors:
        problems.append(f"JavaScript errors while loading: {new_errors}")
    if not_registered:
        problems.append(f"node types not registered in the frontend: {not_registered}")
    if state["missing"]:
        problems.append(f"missing-nodes list from loadGraphData: {state['missing']}")
    if state["overlays"]["dialogs"]:
        problems.append(f"dialogs after loading: {state['overlays']['dialogs']}")
    missing_toasts = [t for t in state["overlays"]["toasts"] if " is missing" in t or "errors found" in t]
    if missing_toasts:  # frontend 1.49 says what is missing in a notification, not in a dialog
        problems.append(f"notifications after loading: {missing_toasts}")
    if state["invalidCombos"]:
        problems.append(f"combo values not among the options: {state['invalidCombos']}")
    diffs = graph_differences(workflow, s.frontend.serialize())
    if diffs:
        problems.append("the frontend changed the graph while loading: " + "; ".join(diffs))
    if state["nodes"] != len(workflow["nodes"]):
        problems.append(f"{state['nodes']} nodes after loading, {len(workflow['nodes'])} in the file")
    if problems:
        raise AssertionError(f"{name}: " + "\n".join(problems))
    return state


def apply_speed_overrides(s: Session) -> list[dict]:
    changes = []
    for widget, value, types in SPEED_OVERRIDES:
        for t in types or (None,):
            changes.append({"type": t, "name": widget, "value": value, "only_if_larger": True})
    return s.frontend.set_widgets(changes)


def queue_and_wait(s: Session, name: str, timeout: float) -> tuple[dict, dict]:
    """graphToPrompt + queue through the frontend, then wait on /history; returns (prompt, history entry)."""
    res = s.frontend.queue()
    if not res["ok"]:
        raise AssertionError(f"{name}: the server refused the prompt: {json.dumps(res['error'], indent=1)[:6000]}")
    response = res["response"]
    if response.get("node_errors"):
        raise AssertionError(f"{name}: node errors: {json.dumps(response['node_errors'], indent=1)[:6000]}")
    prompt = res["prompt"]
    entry = s.server.wait_history(response["prompt_id"], timeout=timeout)
    errors = history_errors(entry)
    status = entry.get("status", {}).get("status_str")
    if errors or status != "success":
        raise AssertionError(f"{name}: run failed ({status}): {errors}\n--- server log ---\n{s.server.log_tail(6000)}")
    return prompt, entry


def check_outputs(s: Session, name: str, prompt: dict, entry: dict) -> list[str]:
    """Every output node of the prompt produced something; saved / previewed images exist and decode."""
    from PIL import Image

    problems, seen, texts = [], [], []
    outputs = entry.get("outputs", {})
    for nid, node in prompt.items():
        cls = node["class_type"]
        if cls not in s.output_nodes():
            continue
        out = outputs.get(str(nid))
        if not out:
            problems.append(f"output node {nid} ({cls}) produced no output")
            continue
        for img in out.get("images", []):
            folder = {"output": "output", "temp": "temp"}.get(img.get("type"), "output")
            path = s.base / folder / img.get("subfolder", "") / img["filename"]
            if not path.is_file():
                problems.append(f"{cls} {nid}: {path} missing")
                continue
            with Image.open(path) as im:
                im.load()
                size = im.size
            if min(size) < 8 or max(size) > 256:  # the speed overrides make every image small
                problems.append(f"{cls} {nid}: {path.name} is {size[0]} x {size[1]}")
            seen.append(f"{cls}:{path.name}({size[0]}x{size[1]})")
        for text in out.get("text", []):
            seen.append(f"{cls}:text({str(text)[:60]!r})")
            texts.append((cls, str(text)))
    if problems:
        raise AssertionError(f"{name}: " + "; ".join(problems))
    return seen, texts


def run_workflow(s: Session, path: Path, timeout: float, log=print) -> dict:
    """Load, check, speed up, queue, wait, check outputs; the two-stage workflows run twice."""
    name = path.stem
    workflow = json.loads(path.read_text())
    assert workflow.get("version") == 0.4 and isinstance(workflow.get("nodes"), list) and "links" in workflow, (
        f"{name}: not a UI-format (version 0.4) workflow"
    )
    t0 = time.time()
    check_loaded(s, workflow, name)
    converted = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in s.frontend.to_prompt().items()}
    expected = workflow_api.to_api(workflow, s.object_info)
    for key, node in expected.items():  # a frontend-only widget is sent by some frontends only (1.27, not 1.49)
        for widget in workflow_api.FRONTEND_WIDGETS.get(node["class_type"], {}):
            if widget not in converted.get(key, {}).get("inputs", {}):
                node["inputs"].pop(widget, None)
    differing = {
        k: {"frontend": converted.get(k), "to_api": expected.get(k)}
        for k in sorted(set(converted) | set(expected))
        if converted.get(k) != expected.get(k)
    }
    assert not differing, (
        f"{name}: graphToPrompt differs from tests/comfyui/workflow_api.to_api (the executor test's conversion) "
        f"at nodes {sorted(differing)}: {json.dumps(differing, indent=1)[:6000]}"
    )
    if name in VALIDATE_ONLY:
        problems = workflow_api.validate(converted, s.object_info)
        assert not problems, f"{name}: the converted prompt would be rejected: {problems}"
        log(f"[{name}] loaded, converted and validated ({len(converted)} nodes); not queued: {VALIDATE_ONLY[name]}")
        return {
            "name": name,
            "runs": [],
            "validated": True,
            "prompt_classes": sorted({v["class_type"] for v in converted.values()}),
        }
    changes = apply_speed_overrides(s)
    log(
        f"[{name}] loaded OK ({len(workflow['nodes'])} nodes); speed overrides: "
        + ", ".join(f"{c['type']}.{c['name']} {c['before']}->{c['after']}" for c in changes)
    )
    prompt, entry = queue_and_wait(s, name, timeout)
    active = [n for n in workflow["nodes"] if n.get("mode", 0) == 0 and n["type"] not in VIRTUAL_TYPES]
    assert len(prompt) == len(active), (
        f"{name}: graphToPrompt gave {len(prompt)} nodes, {len(active)} active in the file"
    )
    seen, texts = check_outputs(s, name, prompt, entry)
    shown = check_shown(s, name, entry, prompt)
    runs = [
        {"seconds": round(time.time() - t0, 1), "nodes": len(prompt), "outputs": seen, "texts": texts, "shown": shown}
    ]
    log(f"[{name}] run 1 OK in {runs[0]['seconds']}s: {seen}")
    muted = [n["id"] for n in workflow["nodes"] if n.get("mode", 0) == 2]
    if muted:
        t1 = time.time()
        s.frontend.set_modes(
            [{"id": i, "mode": 0} for i in muted] + [{"type": t, "mode": 2} for t in SECOND_RUN_MUTE.get(name, ())]
        )
        s.frontend.refresh_combos()
        bad = s.frontend.state()["invalidCombos"]
        assert not bad, f"{name}: after the first run, combo values still invalid: {bad}"
        prompt, entry = queue_and_wait(s, name + " (run 2)", timeout)
        seen, texts = check_outputs(s, name, prompt, entry)
        shown = check_shown(s, name + " (run 2)", entry, prompt)
        runs.append(
            {
                "seconds": round(time.time() - t1, 1),
                "nodes": len(prompt),
                "outputs": seen,
                "texts": texts,
                "shown": shown,
            }
        )
        log(
            f"[{name}] run 2 (muted nodes on, {list(SECOND_RUN_MUTE.get(name, ()))} off) OK in "
            f"{runs[1]['seconds']}s: {seen}"
        )
    return {"name": name, "runs": runs, "prompt_classes": sorted({v["class_type"] for v in prompt.values()})}


def renderers(s: Session) -> list[str]:
    """The node renderers this frontend offers: the canvas, and Vue "Nodes 2.0" where users can switch it on."""
    return ["canvas", "vue"] if s.frontend.vue_available() else ["canvas"]


def check_no_overlaps(s: Session, workflow: dict, name: str) -> dict:
    """Load ``workflow`` on a fresh page and check, on every renderer, that no two nodes' boxes intersect: as
    loaded, and with a text result on every node of ``TEXT_RESULT_TYPES`` (what a run adds). Under Vue the boxes
    are the nodes' elements in the DOM; on the canvas, each node's title bar and body. Returns what was checked."""
    fe = s.frontend
    fe.reload()  # nothing of the previous graph (e.g. a late image preview) resizes this one
    try:
        check_loaded(s, workflow, name)
        problems, checked = [], {}
        order = renderers(s)
        for stage in ("as loaded", "with results"):
            if stage == "with results":
                fe.simulate_results(TEXT_RESULT_TYPES, SAMPLE_RESULT)
            for renderer in order:
                assert fe.set_renderer(renderer), f"{name}: could not switch to the {renderer} renderer"
                fe.fit_view()
                boxes = fe.node_boxes()
                if renderer == "vue" and len(boxes) != len(workflow["nodes"]):
                    problems.append(f"{renderer}: {len(boxes)} node elements for {len(workflow['nodes'])} nodes")
                bad = fe.overlaps()
                if bad:
                    problems.append(
                        f"{renderer}, {stage}: " + "; ".join(f"{o['a']} and {o['b']} {o['overlap']}" for o in bad)
                    )
                checked[f"{renderer} {stage}"] = len(boxes)
            order = order[::-1]  # back to where we came from, with the results shown
        if problems:
            raise AssertionError(f"{name}: nodes overlap:\n" + "\n".join(problems))
        return checked
    finally:
        fe.set_renderer("canvas")


def shown_results(entry: dict, prompt: dict) -> dict[str, str]:
    """{node id: text} of the ZeroCon nodes that ran and returned a text result (``ui.PreviewText``). Nodes taken
    from ComfyUI's cache (the same inputs in an earlier test) are left out: the frontend is sent no result for them
    (some ComfyUI versions still list their earlier result in /history)."""
    cached = set()
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_cached":
            cached.update(str(n) for n in data.get("nodes", []))
    out = {}
    for nid, data in (entry.get("outputs") or {}).items():
        node = prompt.get(str(nid)) or prompt.get(nid) or {}
        text = data.get("text") if isinstance(data, dict) else None
        if str(nid) in cached:
            continue
        if text is not None and str(node.get("class_type", "")).startswith("ZeroCon"):
            out[str(nid)] = "\n".join(str(t) for t in text) if isinstance(text, list) else str(text)
    return out


def check_shown(s: Session, name: str, entry: dict, prompt: dict) -> dict:
    """After a run: the nodes that returned a text result show it on every renderer (``check_results_shown``), and
    their types are in ``TEXT_RESULT_TYPES`` (the layout keeps room for the box only on those). Returns
    {"nodes": {id: text}, renderer: [ids shown]}."""
    shown = shown_results(entry, prompt)
    unknown = sorted({prompt[n]["class_type"] for n in shown} - set(TEXT_RESULT_TYPES))
    assert not unknown, (
        f"{name}: {unknown} showed a text result but are not in workflow_specs.TEXT_RESULT_TYPES: add them there "
        "and rebuild the workflows (build_workflows.py), so the layout keeps room for the result"
    )
    shots = s.base / "screenshots" if os.environ.get("ZEROCON_BROWSER_SCREENSHOTS") else None
    return {"nodes": shown, **check_results_shown(s, shown, name.replace(" ", "_"), shots)}


def check_results_shown(s: Session, expected: dict[str, str], name: str, shots: Path | None = None) -> dict:
    """Every node of ``expected`` shows its text result on the node, labelled "result", under every renderer:
    the box is visible, inside the node, and holds the text the run returned; and no node covers another one
    with the run's results shown. Returns {renderer: node ids}."""
    fe = s.frontend
    problems, seen = [], {}
    if shots is not None:
        shots.mkdir(parents=True, exist_ok=True)
    try:
        for renderer in renderers(s):
            assert fe.set_renderer(renderer), f"{name}: could not switch to the {renderer} renderer"
            seen[renderer] = []
            for nid, text in expected.items():
                fe.center_on(nid)
                box = next((b for b in fe.result_boxes() if b["id"] == nid), None)
                if box is None:
                    problems.append(f"{renderer}: node {nid} has no result box")
                elif not (box["visible"] and box["inNode"] and box["text"] == text and box["label"] == "result"):
                    problems.append(f"{renderer}: node {nid} ({box['type']}) shows {box} instead of {text!r}")
                else:
                    seen[renderer].append(nid)
                if shots is not None:
                    fe.page.screenshot(path=str(shots / f"{name}-{renderer}-node{nid}.png"))
            fe.fit_view()
            bad = fe.overlaps()  # the run's results (text, image previews) cover no other node
            if bad:
                problems.append(f"{renderer}: after the run, " + "; ".join(f"{o['a']} and {o['b']}" for o in bad))
    finally:
        fe.set_renderer("canvas")
    if problems:
        raise AssertionError(f"{name}: text results not shown:\n" + "\n".join(problems))
    return seen


def pack_folder() -> str:
    return PACK_FOLDER
