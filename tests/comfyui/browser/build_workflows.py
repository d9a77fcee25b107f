"""Build example_workflows/*.json from ``workflow_specs.py`` in the real ComfyUI frontend (run by hand).

    COMFYUI_PATH=~/ComfyUI-0.3.64 ~/venvs/comfy-0.3.64/bin/python tests/comfyui/browser/build_workflows.py \
        --measure-on ~/ComfyUI-0.33.0=~/venvs/comfy-0.33/bin/python [name ...]

Starts a temporary ComfyUI (``--cpu``, 127.0.0.1, temp base directory, the pack symlinked into
custom_nodes), opens the frontend in headless Chromium, builds each graph with the frontend's LiteGraph
API, fits the view, and writes what *Workflow > Export* writes (``graphToPrompt().workflow`` as
``JSON.stringify(.., null, 2)``) with every node's pack id (``workflow_specs.stamp_pack_ids``: this
pack's version from pyproject.toml, ComfyUI's from the checkout). Then it loads every written file back and
checks that a second export gives the same nodes, links and widget values. No model files are needed.

The layout: every node gets a slot in its column as high as the node is on each frontend measured, on the classic
canvas and under Vue "Nodes 2.0" where that frontend has it, with its text result shown (``page.js::measure``).
The frontends measured are COMFYUI_PATH's (which also exports: build with the oldest supported ComfyUI, whose
export every later frontend loads), each ``--measure-on CHECKOUT[=PYTHON]``, and the checkouts of
``ZEROCON_COMFYUI_TARGETS`` (``path=python;...``, what tools/test.sh sets). Node ids, widget values and links do
not depend on the layout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(HERE.parent))  # tests/comfyui: the "browser" package

from browser.comfy_server import ComfyServer, make_base  # noqa: E402
from browser.frontend import Frontend  # noqa: E402
from browser.model_files import write_input_image  # noqa: E402
from browser.roundtrip import graph_differences  # noqa: E402
from browser.workflow_specs import SAMPLE_RESULT, SPECS, TEXT_RESULT_TYPES, stamp_pack_ids  # noqa: E402


def versions(comfy: Path) -> tuple[str, str]:
    """(this pack's version from pyproject.toml, the ComfyUI checkout's version)."""
    pack = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    core = re.search(r'__version__ = "([^"]+)"', (comfy / "comfyui_version.py").read_text()).group(1)
    return pack, core


def measure_targets(export: Path, extra: list[str]) -> list[tuple[Path, str]]:
    """The other ComfyUI checkouts (with their Python) to measure the layout on: ``--measure-on`` values
    (``CHECKOUT[=PYTHON]``, default this Python) and ZEROCON_COMFYUI_TARGETS, without the export checkout."""
    found: dict[Path, str] = {}
    entries = list(extra) + [t for t in os.environ.get("ZEROCON_COMFYUI_TARGETS", "").split(";") if t]
    for entry in entries:
        path, _, python = entry.partition("=")
        comfy = Path(path).expanduser().resolve()
        if comfy != export.resolve() and comfy not in found:
            found[comfy] = str(Path(python).expanduser()) if python else sys.executable
    return list(found.items())


def spec_of(name: str) -> dict:
    spec = SPECS[name]()
    spec["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"https://github.com/zerocon/ComfyUI-ZeroCon/workflows/{name}"))
    return spec


def measure_all(fe: Frontend, names: list[str], where: str, into: dict) -> None:
    """Measure every workflow's nodes on ``fe``; each node key's slot in ``into[name]`` is the largest height seen."""
    version = fe.js("() => window.__COMFYUI_FRONTEND_VERSION__ ?? 'unknown'")
    renderers = "canvas + Vue nodes" if fe.vue_available() else "canvas"
    for name in names:
        fe.reload()  # one page per graph: nothing of the previous graph changes this one
        sizes = fe.measure(spec_of(name), TEXT_RESULT_TYPES, SAMPLE_RESULT)
        slots = into.setdefault(name, {})
        for key, measured in sizes.items():
            height = max(h for _, h in measured.values())
            slots[key] = max(slots.get(key, 0), math.ceil(height))
    print(f"measured {len(names)} workflows on {where} (frontend {version}, {renderers})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help=f"which workflows (default: all of {list(SPECS)})")
    ap.add_argument("--out", default=str(REPO / "example_workflows"))
    ap.add_argument(
        "--measure-on",
        action="append",
        default=[],
        metavar="CHECKOUT[=PYTHON]",
        help="also measure the layout on this ComfyUI checkout's frontend (run with PYTHON, default this one)",
    )
    a = ap.parse_args(argv)
    names = a.names or list(SPECS)
    comfy = Path(os.environ.get("COMFYUI_PATH", str(Path.home() / "ComfyUI"))).expanduser()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    slots: dict[str, dict[str, int]] = {}
    for other, python in measure_targets(comfy, a.measure_on):
        with tempfile.TemporaryDirectory(prefix="zerocon-measure-") as tmp:
            base = make_base(Path(tmp), REPO)
            write_input_image(base)
            with ComfyServer(other, python, base) as server:
                fe = Frontend(server.url, log_path=base / "browser.log")
                try:
                    fe.open()
                    measure_all(fe, names, str(other), slots)
                finally:
                    fe.close()
    with tempfile.TemporaryDirectory(prefix="zerocon-build-") as tmp:
        base = make_base(Path(tmp), REPO)
        write_input_image(base)
        with ComfyServer(comfy, sys.executable, base) as server:
            fe = Frontend(server.url, log_path=base / "browser.log")
            try:
                fe.open()
                measure_all(fe, names, str(comfy), slots)
                for name in names:
                    spec = spec_of(name)
                    spec["slots"] = slots[name]
                    fe.reload()
                    fe.build(spec)
                    fe.fit_view()
                    workflow = stamp_pack_ids(json.loads(fe.export_workflow()), *versions(comfy))
                    text = json.dumps(workflow, indent=2, ensure_ascii=False)  # what JSON.stringify(.., null, 2) writes
                    path = out / f"{name}.json"
                    path.write_text(text + "\n")
                    print(f"wrote {path} ({len(json.loads(text)['nodes'])} nodes)")
                for name in names:
                    path = out / f"{name}.json"
                    saved = json.loads(path.read_text())
                    state = fe.load(saved)
                    again = json.loads(fe.export_workflow())
                    diffs = graph_differences(saved, again)
                    if state["missing"] or diffs:
                        print(f"{path}: missing={state['missing']} differences={diffs}", file=sys.stderr)
                        return 1
                    print(f"{path}: reloads identically")
            finally:
                fe.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
