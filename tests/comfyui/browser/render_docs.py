"""Render every example_workflows/*.json with the real ComfyUI frontend to a PNG (README pictures), run by hand.

    COMFYUI_PATH=~/ComfyUI ~/venvs/comfy/bin/python tests/comfyui/browser/render_docs.py [--out docs/workflows]

Starts a temporary ComfyUI (``--cpu``, 127.0.0.1, temp base directory, the pack symlinked into
custom_nodes), loads each file through ``app.loadGraphData``, fits the view (*Fit view* command), and
screenshots the canvas. Also writes ``example_workflows/<name>.jpg``, which ComfyUI's template browser shows as
the workflow's thumbnail. No model files are needed (only the node definitions).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(HERE.parent))  # tests/comfyui: the "browser" package

from browser.comfy_server import PACK_FOLDER, ComfyServer, make_base  # noqa: E402
from browser.frontend import Frontend  # noqa: E402
from browser.model_files import write_input_image  # noqa: E402


def _template_browser(fe: Frontend, path: Path) -> None:
    """The template browser (Workflow > Browse Templates) opened on this pack's workflows."""
    import time

    fe.page.set_viewport_size({"width": 1600, "height": 1000})
    fe.js("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    fe.page.get_by_text("Custom Nodes").first.wait_for(timeout=30000)
    fe.page.get_by_text(PACK_FOLDER, exact=True).first.click()
    time.sleep(2)
    fe.page.screenshot(path=str(path))
    fe.page.keyboard.press("Escape")
    fe.close_overlays()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help="workflow names (default: every example_workflows/*.json)")
    ap.add_argument("--out", default=str(REPO / "docs" / "workflows"))
    ap.add_argument("--width", type=int, default=3200)
    ap.add_argument("--height", type=int, default=1800)
    ap.add_argument("--no-thumbnails", action="store_true", help="do not write example_workflows/<name>.jpg")
    a = ap.parse_args(argv)
    files = sorted((REPO / "example_workflows").glob("*.json"))
    if a.names:
        files = [f for f in files if f.stem in a.names]
    comfy = Path(os.environ.get("COMFYUI_PATH", str(Path.home() / "ComfyUI"))).expanduser()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="zerocon-render-") as tmp:
        # A clean canvas: no minimap, no canvas info text, no zoom toolbar.
        # Full detail at any zoom (MinFontSizeForLOD 1: no low-quality rendering of small text).
        base = make_base(
            Path(tmp),
            REPO,
            {
                "Comfy.Minimap.Visible": False,
                "Comfy.Graph.CanvasInfo": False,
                "Comfy.Graph.CanvasMenu": False,
                "LiteGraph.Canvas.MinFontSizeForLOD": 1,
            },
        )
        write_input_image(base)
        with ComfyServer(comfy, sys.executable, base) as server:
            fe = Frontend(server.url, viewport=(a.width, a.height), log_path=base / "browser.log")
            try:
                fe.open()
                if not a.names:  # first, before any workflow tab is opened
                    shot = out / "template_browser.png"
                    _template_browser(fe, shot)
                    print(f"wrote {shot}")
                    fe.page.set_viewport_size({"width": a.width, "height": a.height})
                for f in files:
                    fe.reload()  # one page per workflow: nothing of the previous graph changes this one
                    state = fe.load(json.loads(f.read_text()))
                    if state["missing"]:
                        print(f"{f.name}: missing node types {state['missing']}", file=sys.stderr)
                    fe.fit_view()
                    png = out / f"{f.stem}.png"
                    fe.screenshot(png)
                    print(f"wrote {png}")
                    if not a.no_thumbnails:
                        from PIL import Image

                        img = Image.open(png).convert("RGB")
                        img.thumbnail((800, 450))
                        jpg = f.with_suffix(".jpg")
                        img.save(jpg, quality=85, optimize=True)
                        print(f"wrote {jpg}")
            finally:
                fe.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
