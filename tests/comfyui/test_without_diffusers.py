"""The pack loads in ComfyUI with diffusers unimportable (diffusers is only in the ``cli`` extra).

A fresh interpreter of ComfyUI's environment gets a ``sys.meta_path`` finder that refuses ``diffusers``
(as if it were not installed), then loads the repository with ComfyUI's own ``nodes.load_custom_node``
and runs a node of every module that touches the engine's model code. Every node must be registered,
exactly as in a normal load, and diffusers must never have been asked for.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import COMFYUI, REPO, pack_module

PROBE = r"""
import asyncio, importlib.abc, json, logging, sys
asked = []

class NoDiffusers(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "diffusers" or name.startswith("diffusers."):
            asked.append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, NoDiffusers())
try:
    import diffusers  # noqa: F401
    raise SystemExit("the blocker did not block")
except ModuleNotFoundError:
    asked.clear()

sys.path.insert(0, COMFYUI)
from comfy.cli_args import args
args.cpu = True
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger().addHandler(Keep(level=logging.WARNING))
logging.getLogger("zerocon").addHandler(Keep(level=logging.WARNING))
import nodes
ok = asyncio.run(nodes.load_custom_node(REPO))
ids = sorted(k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("ZeroCon"))
pack = sys.modules[REPO.replace(".", "_x_")]
# Run what the nodes run at execution time without a model file: folder checks, the engine modules.
import importlib
for name in ("nodes.glue.loaders", "nodes.classes.blip_nodes", "nodes.classes.dino_nodes", "nodes.classes.metrics_nodes", "nodes.classes.sampling_nodes",
             "nodes.classes.diffuseit_nodes", "nodes.classes.direction_nodes", "zerocon_core.text.captioning", "zerocon_core.evaluation.metrics",
             "zerocon_core.method.sampler", "zerocon_core.method.inversion", "zerocon_core.diffuseit.guidance", "zerocon_core.text.direction"):
    importlib.import_module(f"{pack.__name__}.{name}")
try:
    pack.nodes.classes.blip_nodes.ZeroConBLIPLoader.execute("no-such-blip", "fp32", "cpu", False)
except FileNotFoundError as exc:
    folder_error = str(exc)
print(json.dumps({"ok": ok, "ids": ids, "asked": asked, "warnings": records, "folder_error": folder_error,
                  "diffusers_loaded": any(m.split(".")[0] == "diffusers" for m in sys.modules)}))
"""


def test_pack_loads_and_runs_without_diffusers():
    code = f"COMFYUI = {str(COMFYUI)!r}\nREPO = {str(REPO)!r}\n" + PROBE
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = sorted(n.GET_SCHEMA().node_id for n in pack_module("nodes").collect_nodes())
    assert result["ok"] is True
    assert result["ids"] == expected, (sorted(set(expected) - set(result["ids"])), result["warnings"])
    assert not result["asked"] and not result["diffusers_loaded"], result["asked"]
    assert not [w for w in result["warnings"] if "zerocon" in w.lower() or "diffusers" in w.lower()], result
    assert "no-such-blip" in result["folder_error"]
