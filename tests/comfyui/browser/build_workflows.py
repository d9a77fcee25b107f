"""Build example_workflows/*.json from ``workflow_specs.py`` in the real ComfyUI frontend (run by hand).

    COMFYUI_PATH=~/ComfyUI ~/venvs/comfy/bin/python tests/comfyui/browser/build_workflows.py [name ...]

Starts a temporary ComfyUI (``--cpu``, 127.0.0.1, temp base directory, the pack symlinked into
custom_nodes), opens the frontend in headless Chromium, builds each graph with the frontend's LiteGraph
API, fits the view, and writes what *Workflow > Export* writes (``graphToPrompt().workflow`` as
``JSON.stringify(.., null, 2)``) with every node's pack id (``workflow_specs.stamp_pack_ids``: this
pack's version from pyproject.toml, ComfyUI's from the checkout). Then it loads every written file back and
checks that a second export gives the same nodes, links and widget values. No model files are needed.
"""

from __future__ import annotations

import argparse
import json
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
from browser.workflow_specs import SPECS, stamp_pack_ids  # noqa: E402


def versions(comfy: Path) -> tuple[str, str]:
    """(this pack's version from pyproject.toml, the ComfyUI checkout's version)."""
    pack = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    core = re.search(r'__version__ = "([^"]+)"', (comfy / "comfyui_version.py").read_text()).group(1)
    return pack, core


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help=f"which workflows (default: all of {list(SPECS)})")
    ap.add_argument("--out", default=str(REPO / "example_workflows"))
    a = ap.parse_args(argv)
    names = a.names or list(SPECS)
    comfy = Path(os.environ.get("COMFYUI_PATH", str(Path.home() / "ComfyUI"))).expanduser()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="zerocon-build-") as tmp:
        base = make_base(Path(tmp), REPO)
        write_input_image(base)
        with ComfyServer(comfy, sys.executable, base) as server:
            fe = Frontend(server.url, log_path=base / "browser.log")
            try:
                fe.open()
                for name in names:
                    spec = SPECS[name]()
                    spec["id"] = str(
                        uuid.uuid5(uuid.NAMESPACE_URL, f"https://github.com/zerocon/ComfyUI-ZeroCon/workflows/{name}")
                    )
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
