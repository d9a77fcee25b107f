"""Print a Markdown reference of every ZeroCon node (inputs, defaults, tooltips, outputs) from the V3 schemas.

COMFYUI_PATH=~/ComfyUI <comfy-python> tools/node_reference.py > docs/nodes.md

The reference shows a fresh install: the menus that list local files (model folders, saved edit directions)
are rendered with those folders empty. tests/comfyui/test_node_reference.py fails when docs/nodes.md is not
what this prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMFYUI = Path(os.environ.get("COMFYUI_PATH", str(Path.home() / "ComfyUI"))).expanduser().resolve()
# The folder_paths keys whose files show up in the pack's menus (nodes/glue/paths.py registers them).
LOCAL_KEYS = ("blip", "dino", "clip_metric", "edit_directions")


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


@contextlib.contextmanager
def empty_model_folders():
    """Point the pack's model-folder keys at empty temporary folders (restored afterwards)."""
    import folder_paths

    saved = {k: copy.deepcopy(folder_paths.folder_names_and_paths[k]) for k in LOCAL_KEYS}
    with tempfile.TemporaryDirectory(prefix="zerocon-ref-") as tmp:
        try:
            for key, (_, extensions) in saved.items():
                folder_paths.folder_names_and_paths[key] = ([os.path.join(tmp, key)], set(extensions))
            folder_paths.filename_list_cache.clear()
            yield
        finally:
            folder_paths.folder_names_and_paths.update(saved)
            folder_paths.filename_list_cache.clear()


def render(node_classes) -> str:
    """The Markdown reference of ``node_classes`` (V3 node classes, in menu order)."""
    out = ["# ZeroCon node reference", "", "Generated from the nodes' schemas by `tools/node_reference.py`.", ""]
    with empty_model_folders():
        infos = [cls.GET_NODE_INFO_V1() for cls in node_classes]
    for info in infos:
        out += [f"## {info['display_name']} (`{info['name']}`)", "", _cell(info.get("description", "")), ""]
        out += ["| input | type | default | what it does |", "|---|---|---|---|"]
        for section in ("required", "optional"):
            for key, spec_ in info["input"].get(section, {}).items():
                typ = spec_[0] if isinstance(spec_[0], str) else "choice: " + ", ".join(map(str, spec_[0]))
                opts = spec_[1] if len(spec_) > 1 else {}
                if isinstance(opts, dict) and "options" in opts:
                    typ = "choice: " + ", ".join(map(str, opts["options"]))
                default = opts.get("default", "") if isinstance(opts, dict) else ""
                tip = opts.get("tooltip", "") if isinstance(opts, dict) else ""
                flag = "" if section == "required" else " (optional)"
                out.append(f"| `{key}`{flag} | {_cell(typ)} | {_cell(default)} | {_cell(tip)} |")
        outs = info.get("output", [])
        names = info.get("output_name", outs)
        tips = info.get("output_tooltips") or [""] * len(outs)
        out += [
            "",
            "Outputs: "
            + "; ".join(f"`{n}` ({t})" + (f": {_cell(tt)}" if tt else "") for n, t, tt in zip(names, outs, tips)),
            "",
        ]
    return "\n".join(out) + "\n"


def main() -> int:
    sys.path.insert(0, str(COMFYUI))
    from comfy.cli_args import args

    args.cpu = True
    name = str(REPO).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py")
    pack = importlib.util.module_from_spec(spec)
    sys.modules[name] = pack
    spec.loader.exec_module(pack)
    ext = asyncio.run(pack.comfy_entrypoint())
    sys.stdout.write(render(asyncio.run(ext.get_node_list())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
