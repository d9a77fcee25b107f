"""Print a Markdown reference of every ZeroCon node (inputs, defaults, tooltips, outputs) from the V3 schemas.

COMFYUI_PATH=~/ComfyUI <comfy-python> tools/node_reference.py > docs/nodes.md
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMFYUI = Path(os.environ.get("COMFYUI_PATH", str(Path.home() / "ComfyUI"))).expanduser().resolve()


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


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
    out = ["# ZeroCon node reference", "", "Generated from the nodes' schemas by `tools/node_reference.py`.", ""]
    for cls in asyncio.run(ext.get_node_list()):
        info = cls.GET_NODE_INFO_V1()
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
    sys.stdout.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
