"""The pack loads the way ComfyUI loads a custom-node folder, and every node is well described.

``nodes.load_custom_node(<repo>)`` is ComfyUI's own loader (what ``main.py`` runs for each folder in
``custom_nodes/``); ``GET_NODE_INFO_V1`` is what ``/object_info`` returns for a V3 node (server.py
``node_info``). test_graph.py also checks ``/object_info`` of a real server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import COMFYUI, REPO, pack_module

TEXT_NODES = {
    "ZeroConBLIPLoader",
    "ZeroConBLIPCaption",
    "ZeroConEditDirection",
    "ZeroConApplyEditDirection",
    "ZeroConSaveEditDirection",
    "ZeroConLoadEditDirection",
}
SAMPLING_NODES = {
    "ZeroConDDIMInversion",
    "ZeroConGuidedSampler",
    "ZeroConGuider",
    "ZeroConGuidedDDIMSampler",
    "ZeroConCrossAttentionGuidance",
    "ZeroConPatchNCEGuidance",
}
CATEGORY = "image/translation/zerocon"
CORE_TYPES = {
    "MODEL",
    "CLIP",
    "VAE",
    "CONDITIONING",
    "LATENT",
    "IMAGE",
    "STRING",
    "INT",
    "FLOAT",
    "BOOLEAN",
    "COMBO",
    "SIGMAS",
    "SAMPLER",
    "GUIDER",
    "MASK",
    "NOISE",
}


@pytest.fixture(scope="module")
def registry():
    """Load the repository folder with ComfyUI's ``load_custom_node``; returns ComfyUI's node mapping."""
    import nodes as comfy_nodes

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(level=logging.WARNING)
    logging.getLogger().addHandler(handler)
    logging.getLogger("zerocon").addHandler(handler)
    try:
        ok = asyncio.run(comfy_nodes.load_custom_node(str(REPO)))
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger("zerocon").removeHandler(handler)
    return ok, comfy_nodes.NODE_CLASS_MAPPINGS, comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS, records


def zerocon_ids(mapping) -> list[str]:
    return sorted(k for k in mapping if k.startswith("ZeroCon") and not k.startswith("ZeroConTest_"))


def test_pack_loads_through_comfyui_without_warnings(registry):
    ok, mapping, display, records = registry
    assert ok is True
    problems = [
        r.getMessage()
        for r in records
        if "zerocon" in r.getMessage().lower() or r.name == "zerocon" or str(REPO) in r.getMessage()
    ]
    assert not problems, problems
    ids = set(zerocon_ids(mapping))
    assert TEXT_NODES | SAMPLING_NODES <= ids, sorted((TEXT_NODES | SAMPLING_NODES) - ids)
    for node_id in ids:
        cls = mapping[node_id]
        assert cls.RELATIVE_PYTHON_MODULE == f"custom_nodes.{REPO.name}"
        assert display[node_id].startswith("ZeroCon ")


def test_entry_point_is_v3_only_and_import_is_lazy():
    """Importing the pack's __init__ (as ComfyUI does) imports nothing; there is no V1 mapping to shadow V3."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('zc_pack_probe', {str(REPO / '__init__.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['zc_pack_probe'] = m; spec.loader.exec_module(m)\n"
        "heavy = [n for n in ('torch', 'transformers', 'comfy', 'comfy_api', 'folder_paths') if n in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(m.comfy_entrypoint) and not hasattr(m, 'NODE_CLASS_MAPPINGS')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_every_node_module_is_collected():
    package = pack_module("nodes")
    on_disk = sorted(p.stem for p in (REPO / "nodes" / "classes").glob("*_nodes.py"))
    assert len(on_disk) == len(package.NODE_MODULES)
    missing = [m for m in on_disk if m not in package.NODE_MODULES]
    assert not missing, f"nodes/{missing} not listed in nodes.NODE_MODULES"


def test_one_broken_module_costs_only_its_own_nodes(monkeypatch, caplog):
    package = pack_module("nodes")
    real_import = package.importlib.import_module

    def fake_import(name, *args):
        if name.endswith(".broken_nodes"):
            raise RuntimeError("boom")
        if name.endswith(".needs_dep_nodes"):
            raise ModuleNotFoundError("No module named 'some_dependency'", name="some_dependency")
        return real_import(name, *args)

    monkeypatch.setattr(
        package, "NODE_MODULES", ("broken_nodes", "needs_dep_nodes", "not_there_nodes") + package.NODE_MODULES
    )
    monkeypatch.setattr(package.importlib, "import_module", fake_import)
    with caplog.at_level(logging.DEBUG, logger="zerocon"):
        found = package.collect_nodes()
    ids = {n.GET_SCHEMA().node_id for n in found}
    assert TEXT_NODES <= ids
    assert "broken_nodes.py failed to import" in caplog.text
    assert "missing dependency 'some_dependency'" in caplog.text
    assert "no module nodes/classes/not_there_nodes.py" in caplog.text


def test_object_info_every_input_and_output_has_a_tooltip(registry):
    _, mapping, _, _ = registry
    for node_id in zerocon_ids(mapping):
        info = mapping[node_id].GET_NODE_INFO_V1()  # what /object_info serves for a V3 node
        json.dumps(info)  # must be JSON-serialisable for the server
        assert info["name"] == node_id
        assert info["category"] == CATEGORY, node_id
        assert info["description"], node_id
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert isinstance(spec[1], dict) and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert all(info["output_tooltips"]), f"{node_id} has an output without tooltip"
        for io_type in list(info["output"]) + [
            v[0] for s in ("required", "optional") for v in info["input"].get(s, {}).values()
        ]:
            if isinstance(io_type, str):
                assert io_type in CORE_TYPES or io_type.startswith("ZEROCON_"), (
                    f"{node_id}: un-namespaced type {io_type}"
                )


def test_model_folders_are_registered(registry):
    import folder_paths

    for key in ("blip", "dino", "edit_directions"):
        assert os.path.join(folder_paths.models_dir, key) in folder_paths.get_folder_paths(key)
    assert ".safetensors" in folder_paths.folder_names_and_paths["edit_directions"][1]


def test_comfyui_checkout_is_the_one_under_test():
    import nodes as comfy_nodes

    assert Path(comfy_nodes.__file__).resolve().parent == COMFYUI
