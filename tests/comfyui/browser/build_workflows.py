"""Build workflows/*.json from ``workflow_specs.py`` in the real ComfyUI frontend (run by hand).

    COMFYUI_PATH=~/ComfyUI ~/venvs/comfy/bin/python tests/comfyui/browser/build_workflows.py [name ...]

Starts a temporary ComfyUI (``--cpu``, 127.0.0.1, temp base directory, the pack symlinked into
custom_nodes), opens the frontend in headless Chromium, builds each graph with the frontend's LiteGraph
API, fits the view, and writes what *Workflow > Export* writes (``graphToPrompt().workflow`` as
``JSON.stringify(.., null, 2)``). Then it loads every written file back and checks that a second export
gives the same nodes, links and widget values. No model files are needed.
"""

from __future__ import annotations

import argparse
import json
import os
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
from browser.workflow_specs import SPECS  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help=f"which workflows (default: all of {list(SPECS)})")
    ap.add_argument("--out", default=str(REPO / "workflows"))
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
                    text = fe.export_workflow()
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
